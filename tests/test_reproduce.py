"""The experiment catalogue (llfc.reproduce): every config loads, resolves, builds its model, and
runs its first iterations end to end (dry run) on tiny synthetic data of the right shape."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

import llfc.data
from llfc import reproduce
from llfc.config import ExperimentConfig
from llfc.data import dataset_info
from llfc.errors import ConfigError, UnknownNameError
from llfc.models import create_model
from llfc.train import TrainConfig

ALL = [(s, e.name) for s in reproduce.SCALES for e in reproduce.list_experiments(s)]
PAPER = ["cifar10-mlp", "cifar10-resnet20-spawn", "cifar10-resnet20ln-permute",
         "cifar10-vgg16-spawn", "cifar10-vit", "mnist-mlp", "tinyimagenet-resnet50-spawn",
         "tinyshakespeare-gpt"]
REPO = Path(__file__).resolve().parents[1]
HAS_PERMUTATION = importlib.util.find_spec("llfc.permutation") is not None


def test_catalogue():
    assert [e.name for e in reproduce.list_experiments("paper")] == PAPER
    cpu = [e.name for e in reproduce.list_experiments("cpu")]
    assert set(PAPER) <= set(cpu) and "digits-mlp" in cpu
    for scale, name in ALL:
        e = next(x for x in reproduce.list_experiments(scale) if x.name == name)
        assert e.description and e.reference and e.cost_cpu != "unknown" and e.cost_gpu != "unknown"
        assert yaml.safe_load(e.path.read_text())["name"] == name
        link = REPO / "configs" / scale / f"{name}.yaml"  # repository-root view of the same file
        if (REPO / "configs").is_dir():
            assert link.resolve() == e.path.resolve(), f"configs/{scale}/{name}.yaml must link to {e.path}"
    text = reproduce.format_list("paper")
    for name in PAPER:
        assert name in text
    assert "Table 2" in text and "Table 3" in text


def test_unknown_names():
    with pytest.raises(UnknownNameError, match="cifar10-vgg16-spawn"):
        reproduce.load("vgg", "paper")
    with pytest.raises(ConfigError, match="paper"):
        reproduce.list_experiments("gpu")
    with pytest.raises(ConfigError, match="nope"):
        reproduce.apply_overrides(reproduce.load("mnist-mlp", "cpu"), {"nope": 1})


def test_paper_settings():
    """The published settings (paper-digest §5) are what the paper configs say."""
    spawn = {"cifar10-vgg16-spawn": 5, "cifar10-resnet20-spawn": 5, "tinyimagenet-resnet50-spawn": 14}
    for name in PAPER:
        c = reproduce.load(name, "paper").resolved()
        assert "independent" in c.pairs  # the non-LMC control rides along in every experiment
        if name in spawn:
            assert c.spawn_epoch == spawn[name] and "spawn" in c.pairs
            t = c.train
            assert (t["optimizer"], t["lr"], t["momentum"], t["weight_decay"], t["batch_size"],
                    t["epochs"], list(t["milestones"]), t["gamma"], t["augment"]) == \
                   ("sgd", 0.1, 0.9, 1e-4, 128, 160, [80, 120], 0.1, True)
    assert reproduce.load("cifar10-vgg16-spawn", "paper").model == "vgg16_bn"
    ln = reproduce.load("cifar10-resnet20ln-permute", "paper")
    assert (ln.model, ln.model_args["width"]) == ("resnet20_ln", 32)
    assert {"permutation-weight", "permutation-activation"} <= set(ln.pairs)
    for name in ("mnist-mlp", "cifar10-mlp"):
        assert reproduce.load(name, "paper").model_args["widths"] == [512, 512, 512]


@pytest.mark.parametrize("scale,name", ALL)
def test_config_resolves_and_model_builds(scale, name):
    cfg = reproduce.load(name, scale)
    c = cfg.resolved()
    TrainConfig.from_dict(c.train)  # valid training recipe
    assert ExperimentConfig.from_dict(yaml.safe_load(c.to_yaml())).resolved() == c
    info = dataset_info(c.dataset)
    if info.modality == "text":  # windows of dataset_args' context; next-token logits per position
        shape = (int(c.dataset_args.get("context", info.input_shape[0])),)
        with torch.device("meta"):
            m = create_model(c.model, input_shape=shape, num_classes=info.num_classes, **c.model_args)
            out = m.eval()(torch.zeros(2, *shape, dtype=torch.long))
        assert tuple(out.shape) == (2, *shape, info.num_classes)
    else:
        with torch.device("meta"):  # shape check without allocating (ResNet-20 x32 has 297M parameters)
            m = create_model(c.model, input_shape=info.input_shape, num_classes=info.num_classes,
                             **c.model_args)
            out = m.eval()(torch.empty(2, *info.input_shape))
        assert tuple(out.shape) == (2, info.num_classes)
    d = reproduce.dry_run_config(c)
    assert d.train["max_batches_per_epoch"] == 2 and d.train["epochs"] <= 2
    assert d.measure.test_samples <= 64 and d.measure.train_samples <= 64
    TrainConfig.from_dict(d.train)


# ------------------------------------------------------------------------------------------
# dry runs on synthetic data

N_TRAIN, N_TEST = 40, 24

# paper-width models that are too heavy for a CPU test even for a few batches: the dry run
# narrows them (the full-width models are shape-checked above on the meta device). ResNet-50 has
# ~170 probes at 64x64 resolution; its paper-scale dry run measures the 16 block outputs only, the
# cpu-scale one the ReLU outputs and block outputs (every probe kind is dry-run on the ResNet-20s;
# the report of 170 probes alone took 13 s).
NARROW = {
    ("paper", "cifar10-vgg16-spawn"): {"model_args": {"width": 0.125, "hidden": 32}},
    ("paper", "cifar10-resnet20ln-permute"): {"model_args": {"width": 0.5}},
    ("paper", "tinyimagenet-resnet50-spawn"): {"model_args": {"width": 0.0625},
                                               "measure": {"kinds": ["residual"]}},
    ("paper", "cifar10-resnet20-spawn"): {"model_args": {"width": 0.5}},
    ("cpu", "tinyimagenet-resnet50-spawn"): {"model_args": {"width": 0.0625},
                                             "measure": {"kinds": ["post", "residual"]}},
}
for _key in [("paper", "cifar10-vit"), ("paper", "tinyshakespeare-gpt"), ("cpu", "cifar10-vit"),
             ("cpu", "mnist-vit"), ("cpu", "tinyshakespeare-gpt")]:  # transformers: 1 narrow block
    NARROW[_key] = {"model_args": {"width": 16, "depth": 1, "heads": 2}}
for _key in [("paper", "tinyshakespeare-gpt"), ("cpu", "tinyshakespeare-gpt")]:  # short windows
    NARROW[_key]["dataset_args"] = {"context": 16}


@pytest.fixture
def fake_data(monkeypatch):
    """Replace every dataset loader by random uint8 images of the dataset's shape."""
    def make(name):
        info = dataset_info(name)

        def load(split, root, download):
            n = N_TRAIN if split == "train" else N_TEST
            g = torch.Generator().manual_seed(0 if split == "train" else 1)
            x = torch.randint(0, 256, (n, *info.input_shape), generator=g, dtype=torch.uint8)
            return x, torch.randint(0, info.num_classes, (n,), generator=g)
        return load

    for name in llfc.data.list_datasets():
        monkeypatch.setitem(llfc.data._LOADERS, name, make(name))
    # text: a random text long enough for N_TEST test windows of the longest context (256)
    g = torch.Generator().manual_seed(2)
    text = "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (10 * N_TEST * 257 + 10,), generator=g))
    monkeypatch.setattr(llfc.data, "read_text", lambda name, root, download=False: text)


@pytest.mark.parametrize("scale,name", ALL)
def test_dry_run_end_to_end(scale, name, fake_data, tmp_path):
    torch.set_num_threads(1)
    cfg = reproduce.load(name, scale)
    over = dict(NARROW.get((scale, name), {}))
    pairs = list(cfg.pairs)
    if not HAS_PERMUTATION:  # llfc.permutation not merged yet: dry-run the other pairs
        pairs = [p for p in pairs if not p.startswith("permutation")]
        over["pairs"] = pairs
    logs = []
    res = reproduce.run(name, tmp_path / "run", scale=scale, device="cpu", dry_run=True,
                        progress=False, overrides=over, log=logs.append)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["train"]["max_batches_per_epoch"] == 2
    # every dry run says so: results.json, summary.txt, the printed summary and the top of report.html
    assert saved["dry_run"] is True
    assert (tmp_path / "run" / "summary.txt").read_text().startswith("DRY RUN")
    assert any(line.lstrip().startswith("DRY RUN") for line in logs)
    html = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert html.index('class="dry-run"') < html.index('<section id="summary">')
    if pairs == ["finetune"]:  # Cross-Task Linearity (llfc.finetune): its own results schema
        assert {"finetune-k1", "control"} <= set(res["pairs"])
        for pr in saved["pairs"].values():
            assert pr["ctl"] and all(0.0 <= e <= 1.0 for e in pr["errors"]["A"].values())
        return
    # the header names the training data actually used, not just the dataset's size
    batch = saved["config"]["train"]["batch_size"]
    assert any(re.search(rf"\(2 batches of {batch} per epoch from \d+ train / ", line) for line in logs), logs
    assert set(res["pairs"]) == set(pairs)
    n_test = N_TEST
    if dataset_info(cfg.dataset).modality == "text":  # test windows of the fake text, at most 64
        n_test = min(64, len(llfc.data.get_dataset(cfg.dataset, "test", tmp_path,
                                                    options=saved["config"]["dataset_args"])))
    for kind, pr in saved["pairs"].items():
        err = pr["lmc"]["test"]["error"]
        assert len(err) == 5 and all(0.0 <= e <= 1.0 for e in err)
        assert pr["n_samples"] == n_test
        assert pr["llfc"], kind
    if "spawn" in pairs:
        assert saved["pairs"]["spawn"]["spawn_epoch"] == 1


# ------------------------------------------------------------------------------------------
# real data (LLFC_DATA_ROOT), skipped when absent

@pytest.mark.slow
@pytest.mark.parametrize("name,folder", [("mnist-mlp", "MNIST"), ("cifar10-vgg16-spawn", "cifar-10-batches-py")])
def test_dry_run_real_data(name, folder, tmp_path):
    root = os.environ.get("LLFC_DATA_ROOT")
    if not root or not (Path(root) / folder).is_dir():
        pytest.skip(f"set LLFC_DATA_ROOT to a folder holding {folder}/")
    torch.set_num_threads(1)
    over = {} if HAS_PERMUTATION else {"pairs": [p for p in reproduce.load(name, "cpu").pairs
                                                  if not p.startswith("permutation")]}
    res = reproduce.run(name, tmp_path / "run", scale="cpu", data_root=root, device="cpu",
                        dry_run=True, progress=False, overrides=over, log=lambda s: None)
    for pr in res["pairs"].values():
        assert pr["n_samples"] == 64
        # two batches of training: far from trained, but the LMC curve is finite
        assert all(0.0 <= e <= 1.0 for e in pr["lmc"]["test"]["error"])
