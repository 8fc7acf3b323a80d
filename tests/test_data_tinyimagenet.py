"""Tiny-ImageNet loader on a small generated folder in the official layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llfc.data as data
from llfc.data import dataset_info, get_dataset
from llfc.errors import DataNotFoundError

WNIDS = ["n03", "n01", "n02"]  # deliberately unsorted: labels follow the sorted order


def _img(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)


def _write(path: Path, arr: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    path.write_bytes(buf.getvalue())


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """3 classes × 4 train images, 2 val images per class; PNG content under .JPEG names
    (lossless, so pixels round-trip exactly), plus one real JPEG and one grayscale image."""
    monkeypatch.setenv("LLFC_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "root" / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    expected = {"train": {}, "test": {}}
    for ci, w in enumerate(WNIDS):
        label = sorted(WNIDS).index(w)
        for j in range(4):
            arr = _img(100 * ci + j)
            _write(base / "train" / w / "images" / f"{w}_{j}.JPEG", arr, "PNG")
            expected["train"][f"{w}_{j}.JPEG"] = (arr, label)
    lines = []
    for k in range(6):
        w = WNIDS[k % 3]
        arr = _img(1000 + k)
        _write(base / "val" / "images" / f"val_{k}.JPEG", arr, "PNG")
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
        expected["test"][f"val_{k}.JPEG"] = (arr, sorted(WNIDS).index(w))
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "root", base, expected


def _raw(split, root):
    ds = get_dataset("tiny-imagenet", split, root=root, augment=False)
    return ds.images, ds.labels


def test_info():
    info = dataset_info("tiny-imagenet")
    assert info.input_shape == (3, 64, 64) and info.num_classes == 200 and info.augment
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)


def test_labels_and_pixels_round_trip(tiny):
    root, base, expected = tiny
    for split, n in (("train", 12), ("test", 6)):
        images, labels = _raw(split, root)
        assert images.shape == (n, 3, 64, 64) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64
        # train files are listed class by class in sorted-wnid order, sorted names within
        if split == "train":
            order = sorted(expected["train"], key=lambda f: (f.split("_")[0], f))
        else:
            order = [f"val_{k}.JPEG" for k in range(6)]
        for i, fname in enumerate(order):
            arr, label = expected[split][fname]
            assert labels[i].item() == label, fname
            assert torch.equal(images[i], torch.from_numpy(arr).permute(2, 0, 1)), fname
    # wnids sorted: n01 → 0, n02 → 1, n03 → 2
    _, labels = _raw("train", root)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_items_are_normalised(tiny):
    root, _, expected = tiny
    ds = get_dataset("tiny-imagenet", "test", root=root, augment=False)
    x, y = ds[0]
    arr, label = expected["test"]["val_0.JPEG"]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    ref = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x, ref)
    assert y.item() == label


def test_real_jpeg_and_grayscale(tiny):
    root, base, _ = tiny
    smooth = np.zeros((64, 64, 3), dtype=np.uint8)
    smooth[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 4
    smooth[..., 1] = 128
    smooth[..., 2] = np.arange(64, dtype=np.uint8)[:, None] * 2
    _write(base / "val" / "images" / "val_0.JPEG", smooth, "JPEG")  # a true JPEG
    gray = np.full((64, 64), 77, dtype=np.uint8)
    p = base / "val" / "images" / "val_1.JPEG"
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG")
    p.write_bytes(buf.getvalue())
    images, _ = _raw("test", root)
    err = (images[0].float() - torch.from_numpy(smooth).permute(2, 0, 1).float()).abs()
    assert err.mean() < 3.0  # lossy, but close
    assert (images[1] == 77).all()  # one channel → three equal channels


def test_second_load_uses_cache(tiny, monkeypatch):
    root, _, _ = tiny
    first, labels = _raw("train", root)
    cached = list((Path(data.cache_dir()) / "data" / "tiny-imagenet").glob("*-train.safetensors"))
    assert len(cached) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data, "_decode_rgb", boom)
    again, labels2 = _raw("train", root)
    assert torch.equal(first, again) and torch.equal(labels, labels2)


def test_cache_rebuilt_when_images_added(tiny):
    root, base, _ = tiny
    _raw("train", root)
    _write(base / "train" / "n01" / "images" / "n01_9.JPEG", _img(7), "PNG")
    images, labels = _raw("train", root)
    assert len(images) == 13 and labels.tolist().count(0) == 5


def test_missing_annotations(tiny):
    root, base, _ = tiny
    (base / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataNotFoundError, match="val_annotations.txt"):
        _raw("test", root)


def test_missing_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match="tiny-imagenet-200"):
        _raw("train", tmp_path)
    with pytest.raises(DataNotFoundError, match="cs231n"):
        get_dataset("tiny-imagenet", "train", root=tmp_path, download=True)


def test_wrong_size_and_corrupt_images(tiny):
    root, base, _ = tiny
    _write(base / "train" / "n02" / "images" / "n02_0.JPEG", _img(1)[:32], "PNG")
    with pytest.raises(DataNotFoundError, match=r"n02_0\.JPEG.*32×64"):
        _raw("train", root)
    (base / "train" / "n02" / "images" / "n02_0.JPEG").write_bytes(b"not an image")
    with pytest.raises(DataNotFoundError, match="cannot be decoded"):
        _raw("train", root)


def test_annotation_with_unknown_wnid(tiny):
    root, base, _ = tiny
    ann = base / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_9.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataNotFoundError, match="line 7"):
        _raw("test", root)
