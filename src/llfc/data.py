"""Dataset registry: ``digits`` (default, bundled with scikit-learn), ``mnist``, ``fashion-mnist``,
``cifar10``, ``cifar100``, ``tiny-imagenet`` and the character-level text ``tinyshakespeare``
(windows of characters, see :class:`TextDataset`).

Every dataset is held in memory as one uint8 (or float) image tensor of shape (N, C, H, W) and an
int64 label tensor of shape (N,). Items are float32 images normalised with the dataset's channel
mean/std, shape (C, H, W), and int64 labels. Training-set augmentation (random crop with padding 4
and horizontal flip, the standard CIFAR recipe; paper-digest §5.3) is applied per sample with
torchvision transforms and draws from torch's global RNG, so a seeded run is reproducible.

The data root may be read-only and may hold only the original ``.gz`` files of MNIST /
Fashion-MNIST (as ``../shared/data`` does): they are decompressed into a cache folder
(``$LLFC_CACHE``, default ``~/.cache/llfc``), never into the data root.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from llfc.errors import ConfigError, DataNotFoundError, unknown_name


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a registered dataset.

    Attributes:
        name: registry name.
        input_shape: (C, H, W) of one image.
        num_classes: number of labels.
        mean, std: per-channel normalisation constants (on the [0, 1] scale).
        augment: whether training-set augmentation (crop + flip) is the default.
        needs_files: False only for datasets bundled with a Python package.
        modality: "image" (items (C, H, W) float32, label int64) or "text" (items: int64 token
            windows (T,) and next-token targets (T,); input_shape = (T,), num_classes = vocabulary
            size).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    needs_files: bool = True
    modality: str = "image"


def _crop_flip(size: int):
    """The standard CIFAR augmentation: random crop with padding 4, horizontal flip."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()])


class ArrayDataset(Dataset):
    """Images and labels held as tensors, normalised on access.

    Args:
        images: (N, C, H, W) tensor, uint8 (divided by 255) or float (already on [0, 1]).
        labels: (N,) int64 tensor.
        mean, std: per-channel normalisation constants.
        augment: if True, apply random crop (padding 4) and horizontal flip per sample.

    Items: ``(x, y)`` with x float32 (C, H, W) and y an int64 scalar tensor. Batched access
    (:meth:`batch`, and ``__getitems__``, which DataLoader uses) normalises a whole batch in one
    operation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, augment: bool = False):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        c = images.shape[1]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
        self.augment = augment
        self._aug: Callable | None = _crop_flip(images.shape[-1]) if augment else None

    def __len__(self) -> int:
        return len(self.images)

    def with_augment(self, augment: bool) -> ArrayDataset:
        """The same images (shared, not copied) with augmentation switched on or off."""
        if augment == self.augment:
            return self
        ds = ArrayDataset.__new__(ArrayDataset)
        ds.__dict__.update(self.__dict__)
        ds.augment = bool(augment)
        ds._aug = _crop_flip(self.images.shape[-1]) if augment else None
        return ds

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # a new tensor: normalise it in place
            return x.float().div_(255.0).sub_(self._mean).div_(self._std)
        return (x.float() - self._mean) / self._std

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``idx`` as one batch: ``(x, y)``, x float32 (B, C, H, W) normalised (and
        augmented, per sample, if ``augment``), y int64 (B,)."""
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        x = self.images[idx_t]
        if self._aug is not None:
            x = torch.stack([self._aug(xi) for xi in x])
        return self._to_float(x), self.labels[idx_t]

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, idx):
        x, y = self.batch(idx)
        return list(zip(x.unbind(0), y.unbind(0)))


# --------------------------------------------------------------------------------------------
# registry

_INFO: dict[str, DatasetInfo] = {}
_LOADERS: dict[str, Callable[[str, Path | None, bool], tuple[torch.Tensor, torch.Tensor]]] = {}


def register_dataset(info: DatasetInfo):
    """Decorator registering ``loader(split, root, download) -> (images, labels)`` for ``info``."""

    def wrap(fn):
        _INFO[info.name] = info
        _LOADERS[info.name] = fn
        return fn

    return wrap


def list_datasets() -> list[str]:
    """Sorted names of the registered datasets."""
    return sorted(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    """Facts about dataset ``name``.

    Raises:
        UnknownNameError: listing the valid names.
    """
    if name not in _INFO:
        raise unknown_name("dataset", name, _INFO)
    return _INFO[name]


def default_data_root() -> Path:
    """``$LLFC_DATA_ROOT`` if set, else ``./data``."""
    return Path(os.environ.get("LLFC_DATA_ROOT", "data"))


def cache_dir() -> Path:
    """Writable cache for decompressed files: ``$LLFC_CACHE`` or ``~/.cache/llfc``."""
    return Path(os.environ.get("LLFC_CACHE", Path.home() / ".cache" / "llfc"))


def get_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    augment: bool | None = None,
    options: dict | None = None,
) -> ArrayDataset | TextDataset:
    """Load ``split`` ("train" or "test") of dataset ``name``.

    Args:
        name: a registered dataset (see :func:`list_datasets`).
        split: "train" or "test".
        root: data folder in torchvision's layout; default :func:`default_data_root`.
        download: let torchvision download missing files (needs internet).
        augment: crop+flip augmentation; default the dataset's own default, train split only.
        options: dataset options; text datasets take ``context`` (window length T) and
            ``stride`` (see :func:`get_text_dataset`); image datasets take none.

    Returns:
        an :class:`ArrayDataset`, or a :class:`TextDataset` for text datasets.

    Raises:
        UnknownNameError: unknown dataset.
        ConfigError: unknown split; an option the dataset does not take.
        DataNotFoundError: the files are not in ``root`` (names the folder and the two fixes).
    """
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    rootp = Path(root) if root is not None else default_data_root()
    if info.modality == "text":
        return get_text_dataset(name, split, rootp, download, **(options or {}))
    if options:
        raise ConfigError(
            f"dataset {name!r} takes no options, got {sorted(options)}; remove "
            f"dataset_args (--dataset-args; only text datasets take context/stride)."
        )
    images, labels = _LOADERS[name](split, rootp, download)
    if augment is None:
        augment = info.augment and split == "train"
    if tuple(images.shape[1:]) != info.input_shape:
        raise DataNotFoundError(
            f"{name} {split} images in {rootp} have shape {tuple(images.shape[1:])}, expected "
            f"{info.input_shape}; the folder holds some other data."
        )
    return ArrayDataset(images, labels, info.mean, info.std, augment=augment)


def _missing(name: str, folder: Path, what: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"{name} not found: looked for {what} in {folder.resolve()}. Either pass the folder that "
        f"holds it with --data-root DIR (torchvision's layout, e.g. DIR/MNIST/raw/*.gz or "
        f"DIR/cifar-10-batches-py/), or add --download to fetch it from the internet into the "
        f"data root."
    )


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled: no files needed)


@register_dataset(DatasetInfo("digits", (1, 8, 8), 10, mean=(0.3,), std=(0.4,), needs_files=False))
def _load_digits(split: str, root: Path | None, download: bool):
    """scikit-learn's 1,797 8×8 digits; fixed stratified split (75% train / 25% test, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.25, random_state=0, stratify=d.target)
    sel = torch.as_tensor(tr if split == "train" else te)
    return x[sel], y[sel]


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (torchvision layout; reads the original .gz files read-only)

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _mnist_like(name: str, folder_name: str, split: str, root: Path, download: bool):
    from torchvision.datasets import mnist as tvm

    raw = root / folder_name / "raw"
    files = _MNIST_FILES[split]
    if not all((raw / f).exists() or (raw / (f + ".gz")).exists() for f in files) and download:
        cls = tvm.MNIST if folder_name == "MNIST" else tvm.FashionMNIST
        try:
            cls(str(root), train=split == "train", download=True)
        except (RuntimeError, OSError) as e:
            raise DataNotFoundError(
                f"could not download {name} into {root.resolve()} ({e}). Without internet, put the "
                f"original files in DIR/{folder_name}/raw/ and pass --data-root DIR."
            ) from None
    paths = []
    for f in files:
        if (raw / f).exists():
            paths.append(raw / f)
        elif (raw / (f + ".gz")).exists():
            paths.append(_decompressed(name, raw / (f + ".gz")))
        else:
            raise _missing(name, raw, f"{f}.gz (or {f})")
    try:
        images = tvm.read_image_file(str(paths[0])).unsqueeze(1)
        labels = tvm.read_label_file(str(paths[1])).long()
    except (AssertionError, RuntimeError, ValueError) as e:
        raise DataNotFoundError(
            f"{name} files in {raw.resolve()} are not valid IDX files ({e}); replace them with the original downloads."
        ) from None
    return images, labels


def _decompressed(name: str, src: Path) -> Path:
    """The decompressed copy of ``src`` (a .gz) in the cache. The cache entry is keyed by the
    source's resolved path, size and modification time, so another folder's (or a replaced) file
    never serves a stale copy.

    Raises:
        DataNotFoundError: the .gz file is corrupted or truncated (nothing is left in the cache).
    """
    import hashlib

    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dst = cache_dir() / "data" / "gunzip" / key / src.name[:-3]
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".tmp")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            tmp.unlink(missing_ok=True)
            raise DataNotFoundError(
                f"{name}: {src} is not a valid gzip file ({e}); it is corrupted or truncated. "
                f"Replace it with the original download (or pass --download)."
            ) from None
        except OSError as e:
            if getattr(e, "filename", None) == os.fspath(src):
                raise  # the source cannot be read: not the cache's fault
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise _cache_error(dst.parent, e) from None
        os.replace(tmp, dst)
    return dst


def _cache_error(folder: Path, e: OSError) -> ConfigError:
    """The error for a cache that cannot be written: names ``$LLFC_CACHE``, the folder and the fix."""
    now = f"$LLFC_CACHE is {os.environ['LLFC_CACHE']}" if "LLFC_CACHE" in os.environ else "$LLFC_CACHE is not set"
    return ConfigError(
        f"llfc cannot write its cache of decompressed data in {folder} ({e.strerror or e}). The cache is "
        f"$LLFC_CACHE, default ~/.cache/llfc ({now}): point it at a writable folder with free space, e.g. "
        f"export LLFC_CACHE=/tmp/llfc-cache."
    )


@register_dataset(DatasetInfo("mnist", (1, 28, 28), 10, mean=(0.1307,), std=(0.3081,)))
def _load_mnist(split, root, download):
    """MNIST, normalised with (0.1307, 0.3081) as in the official LLFC code (paper-digest §5.3)."""
    return _mnist_like("mnist", "MNIST", split, root, download)


@register_dataset(DatasetInfo("fashion-mnist", (1, 28, 28), 10, mean=(0.2860,), std=(0.3530,)))
def _load_fashion(split, root, download):
    """Fashion-MNIST (Zalando), torchvision layout ``FashionMNIST/raw``."""
    return _mnist_like("fashion-mnist", "FashionMNIST", split, root, download)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's python-pickle layout, read by torchvision)

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)


def _cifar(name: str, cls_name: str, folder: str, split: str, root: Path, download: bool):
    import torchvision.datasets as tvd

    if not (root / folder).is_dir() and not download:
        raise _missing(name, root, f"the folder {folder}/")
    cls = getattr(tvd, cls_name)
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataNotFoundError(
            f"{name} in {(root / folder).resolve()} is incomplete or corrupted ({e}). Replace it "
            f"with the original files (torchvision's layout) or pass --download."
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.long)


@register_dataset(DatasetInfo("cifar10", (3, 32, 32), 10, mean=_CIFAR_MEAN, std=_CIFAR_STD, augment=True))
def _load_cifar10(split, root, download):
    """CIFAR-10, normalised as in the official LLFC code; crop+flip on the train split."""
    return _cifar("cifar10", "CIFAR10", "cifar-10-batches-py", split, root, download)


@register_dataset(
    DatasetInfo(
        "cifar100",
        (3, 32, 32),
        100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        augment=True,
    )
)
def _load_cifar100(split, root, download):
    """CIFAR-100 (fine labels); crop+flip on the train split."""
    return _cifar("cifar100", "CIFAR100", "cifar-100-python", split, root, download)


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet (Stanford CS231n; folder layout of tiny-imagenet-200.zip, decoded with Pillow)

_TINY_FOLDER = "tiny-imagenet-200"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _tiny_file_list(split: str, base: Path) -> tuple[list[Path], list[int], list[Path]]:
    """(image paths, labels, files whose timestamps fingerprint the cache) for ``split``.

    Labels are indices into the sorted wnids (the order torchvision's ``ImageFolder`` gives the
    class folders of ``train/``).
    """
    name = "tiny-imagenet"
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        raise DataNotFoundError(
            f"{name}: {wnids_file.resolve()} is missing; the folder {base.resolve()} is not a "
            f"complete copy of {_TINY_URL} (unzip it into the data root)."
        )
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            folder = base / "train" / w / "images"
            if not folder.is_dir():
                raise DataNotFoundError(
                    f"{name}: the class folder {folder.resolve()} (listed in wnids.txt) is "
                    f"missing; re-extract {_TINY_URL} into the data root."
                )
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            paths += files
            labels += [index[w]] * len(files)
        return paths, labels, [wnids_file, base / "train"]
    # "test" is Tiny-ImageNet's labelled validation set (its test set has no labels)
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataNotFoundError(
            f"{name}: {ann.resolve()} is missing; it holds the labels of the validation images "
            f"(llfc's test split). Re-extract {_TINY_URL} into the data root."
        )
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index:
            raise DataNotFoundError(
                f"{name}: line {lineno} of {ann.resolve()} does not name an image and a wnid "
                f"listed in wnids.txt ({line.strip()!r}); the file is corrupted, re-extract "
                f"{_TINY_URL}."
            )
        paths.append(base / "val" / "images" / fields[0].strip())
        labels.append(index[fields[1].strip()])
    return paths, labels, [wnids_file, ann]


def _decode_rgb(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Decode one image file (format sniffed from its content) to a (3, H, W) uint8 tensor."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))  # grayscale images → 3 equal channels
    except FileNotFoundError:
        raise DataNotFoundError(f"tiny-imagenet: image {path.resolve()} is missing; re-extract {_TINY_URL}.") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataNotFoundError(
            f"tiny-imagenet: image {path.resolve()} cannot be decoded ({e}); the file is "
            f"corrupted, re-extract {_TINY_URL}."
        ) from None
    if arr.shape[:2] != size:
        raise DataNotFoundError(
            f"tiny-imagenet: image {path.resolve()} is {arr.shape[0]}×{arr.shape[1]} pixels, "
            f"expected {size[0]}×{size[1]}; the folder holds other data than {_TINY_URL}."
        )
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _tiny_cache_path(base: Path, split: str) -> Path:
    import hashlib

    key = hashlib.sha1(str(base.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "data" / "tiny-imagenet" / f"{key}-{split}.safetensors"


def _tiny_fingerprint(paths: list[Path], stamp_files: list[Path]) -> str:
    stamps = ",".join(str(p.stat().st_mtime_ns) for p in stamp_files)
    return f"n={len(paths)};mtimes={stamps}"


@register_dataset(DatasetInfo("tiny-imagenet", (3, 64, 64), 200, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, augment=True))
def _load_tiny_imagenet(split, root, download):
    """Tiny-ImageNet: 200 classes, 64×64 RGB; 100,000 train and 10,000 validation images.

    Reads ``root/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG,
    val/val_annotations.txt}`` (the layout of the official zip). llfc's "test" split is the
    labelled validation set. Labels index the sorted wnids (= ``ImageFolder`` order on train/).
    Images are decoded with Pillow (format sniffed from content; grayscale → RGB) and the
    decoded uint8 tensors are cached as ``<cache_dir()>/data/tiny-imagenet/<sha1(folder)>-<split>
    .safetensors`` (rebuilt when the number of images or the timestamps of wnids.txt and of the
    train folder / val annotations change), so only the first load decodes.
    Normalisation: ImageNet mean/std; crop(pad 4)+flip augmentation on train by default.

    Raises:
        DataNotFoundError: missing folder, wnids.txt, class folder, val_annotations.txt or
            image; an undecodable or wrongly sized image. ``download`` is not supported.
    """
    from safetensors.torch import load_file, save_file

    base = root / _TINY_FOLDER
    if not base.is_dir():
        if download:
            raise DataNotFoundError(
                f"tiny-imagenet cannot be downloaded by llfc (torchvision has no downloader for "
                f"it). Download {_TINY_URL}, unzip it into {root.resolve()} (giving "
                f"{base.resolve()}), and pass that data root."
            )
        raise _missing("tiny-imagenet", root, f"the folder {_TINY_FOLDER}/ (from {_TINY_URL})")
    paths, labels, stamp_files = _tiny_file_list(split, base)
    if not paths:
        raise DataNotFoundError(
            f"tiny-imagenet: no images found for the {split} split in {base.resolve()}; re-extract {_TINY_URL}."
        )
    fingerprint = _tiny_fingerprint(paths, stamp_files)
    cache = _tiny_cache_path(base, split)
    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") == fingerprint and meta.get("source") == str(base.resolve()):
            t = load_file(str(cache))
            return t["images"], t["labels"]
    from tqdm import tqdm

    h, w = 64, 64
    images = torch.empty((len(paths), 3, h, w), dtype=torch.uint8)
    for i, p in enumerate(tqdm(paths, desc=f"decoding tiny-imagenet {split}", unit="img", disable=len(paths) < 1000)):
        images[i] = _decode_rgb(p, (h, w))
    labels_t = torch.tensor(labels, dtype=torch.long)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        save_file(
            {"images": images, "labels": labels_t},
            str(tmp),
            metadata={"fingerprint": fingerprint, "source": str(base.resolve())},
        )
        os.replace(tmp, cache)
    except OSError:  # an unwritable cache only costs speed
        try:
            tmp.unlink(missing_ok=True)
        except (OSError, NameError):
            pass
    return images, labels_t


# --------------------------------------------------------------------------------------------
# character-level text (Tiny Shakespeare; the corpus of char-rnn and nanoGPT)

_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_TEXT_FILES = {"tinyshakespeare": ("tinyshakespeare/input.txt", _SHAKESPEARE_URL)}
TEXT_TRAIN_FRACTION = 0.9


class CharVocab:
    """Character vocabulary: the sorted distinct characters of a text, id = position.

    Args:
        chars: the characters (sorted and deduplicated here).

    Raises (``encode``):
        ConfigError: a character that is not in the vocabulary (names it and its position).
    """

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str, where: str = "the text") -> torch.Tensor:
        """Token ids of ``text``: int64 tensor (len(text),)."""
        try:
            return torch.tensor([self.index[c] for c in text], dtype=torch.long)
        except KeyError as e:
            pos = text.index(e.args[0])
            raise ConfigError(
                f"{where} holds the character {e.args[0]!r} (at position {pos}) that is not in the "
                f"vocabulary of {len(self)} characters the model was built for; remove or replace "
                f"it, or build the vocabulary (and the model) from a text that contains it."
            ) from None

    def decode(self, ids) -> str:
        """The text of token ids (any iterable of ints)."""
        return "".join(self.chars[int(i)] for i in ids)


class TextDataset(Dataset):
    """Fixed-length windows of a token sequence as samples (nanoGPT's character LM data).

    Sample i is ``x = ids[s·i : s·i + T]`` and ``y = ids[s·i + 1 : s·i + T + 1]`` (the next
    character at every position), s = ``stride`` (default T: non-overlapping windows).

    Args:
        ids: int64 token ids (L,).
        context: window length T (≥ 1).
        vocab: the :class:`CharVocab` (its size is the model's number of classes).
        name: dataset name (for :attr:`info` and messages).
        split: "train" or "test" (for messages).
        stride: offset between consecutive windows (≥ 1).

    Attributes:
        info: a :class:`DatasetInfo` with input_shape (T,) and num_classes = len(vocab).

    Items: ``(x, y)``, both int64 (T,).

    Raises:
        ConfigError: T or stride < 1; a text shorter than one window (L < T + 1).
    """

    def __init__(
        self,
        ids: torch.Tensor,
        context: int,
        vocab: CharVocab,
        name: str = "text",
        split: str = "train",
        stride: int | None = None,
    ):
        context = int(context)
        stride = context if stride is None else int(stride)
        if context < 1 or stride < 1:
            raise ConfigError(
                f"{name} {split}: context and stride must be ≥ 1, got context={context}, stride={stride}."
            )
        if len(ids) < context + 1:
            raise ConfigError(
                f"{name} {split}: the text has {len(ids)} characters, shorter than one window of "
                f"context={context} plus its next character; use a shorter context "
                f"(llfc run --dataset-args '{{\"context\": N}}', dataset_args: {{context: N}} in a config, "
                f"with N < {len(ids)}) or a longer text."
            )
        self.ids, self.context, self.stride, self.vocab = ids, context, stride, vocab
        self.augment = False  # text has no augmentation
        self.n = (len(ids) - 1 - context) // stride + 1
        self.info = DatasetInfo(name, (context,), len(vocab), mean=(), std=(), modality="text")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, idx):
        start = torch.as_tensor(idx, dtype=torch.long) * self.stride
        if len(start) and (start.min() < 0 or start.max() >= self.n * self.stride):
            raise IndexError(f"window index out of range [0, {self.n})")
        w = self.ids[start[:, None] + torch.arange(self.context + 1)]
        return list(zip(w[:, :-1].unbind(0), w[:, 1:].unbind(0)))


def read_text(name: str, root: Path, download: bool = False) -> str:
    """The whole text of text dataset ``name`` from ``root`` (fetched first with ``download``).

    Raises:
        DataNotFoundError: the file is missing (names it, the URL and the fixes) or unreadable.
    """
    rel, url = _TEXT_FILES[name]
    path = root / rel
    if not path.is_file() and download:
        import urllib.request

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
            os.replace(tmp, path)
        except OSError as e:
            raise DataNotFoundError(
                f"could not download {name} from {url} into {path} ({e}). Without internet, save "
                f"that file as DIR/{rel} and pass --data-root DIR."
            ) from None
    if not path.is_file():
        raise _missing(name, path.parent, f"{path.name} (the file {url})")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataNotFoundError(
            f"{name}: {path} cannot be read as UTF-8 text ({e}); replace it with the original file {url}."
        ) from None


def get_text_dataset(
    name: str, split: str, root: Path, download: bool = False, context: int = 128, stride: int | None = None
) -> TextDataset:
    """Split ``split`` of a character-level text dataset, as windows of ``context`` characters.

    The vocabulary is the set of characters of the whole text (so both splits share it); the
    first 90% of the characters are the train split and the last 10% the test split, by
    position, as in nanoGPT's ``data/shakespeare_char/prepare.py``.

    Raises:
        ConfigError: an unknown option value; a split shorter than one window.
        DataNotFoundError: the text file is missing.
    """
    text = read_text(name, root, download)
    vocab = CharVocab(text)
    ids = vocab.encode(text, f"{name} ({root / _TEXT_FILES[name][0]})")
    cut = int(len(ids) * TEXT_TRAIN_FRACTION)
    part = ids[:cut] if split == "train" else ids[cut:]
    return TextDataset(part, context, vocab, name, split, stride)


@register_dataset(DatasetInfo("tinyshakespeare", (128,), 65, mean=(), std=(), modality="text"))
def _load_tinyshakespeare(split, root, download):  # pragma: no cover - text goes through get_text_dataset
    raise AssertionError("text datasets are loaded by get_text_dataset")
