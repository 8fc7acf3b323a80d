"""Execution of an :class:`~llfc.config.ExperimentConfig`: data + models → pairs (train / spawn /
align) → one streaming measurement pass per pair → results.json, CSV tables, figures, summary.

Layout of a run directory::

    config.yaml           the resolved configuration
    environment.json      versions, platform, device, seeds
    pairs/<pair>/...      checkpoints (safetensors + JSON) and training logs
    results.json          every measurement (schema: docs/results.md)
    *.csv, *.png          tables and figures
    summary.txt           the table printed at the end

A run interrupted during training resumes from its last per-epoch checkpoint when the same
command is run again (same config, same --out).
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from llfc import __version__
from llfc.checkpoint import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from llfc.config import ExperimentConfig
from llfc.data import dataset_info, get_dataset
from llfc.engine import measure_pair
from llfc.probe import FeatureExtractor
from llfc.errors import ConfigError, IncompatibleModelsError, OutputExistsError
from llfc.checkpoint import check_finite, strip_prefix
from llfc.interpolate import check_alphas, check_compatible, default_alphas, path_states
from llfc.metrics.angles import principal_angles_per_layer
from llfc.report import plot_all, summary_table, write_tables
from llfc.stitching import stitching_errors
from llfc.seeding import derive_seed, environment, seed_everything
from llfc.train import ModelSpec, TrainConfig, independent_pair, spawn_pair

SCHEMA_VERSION = 1
PAIR_LABELS = {
    "spawn": "spawned",
    "independent": "independent (no alignment)",
    "permutation-weight": "permuted: weight matching",
    "permutation-activation": "permuted: activation matching",
    "permutation-ste": "permuted: straight-through estimator",
}
PERMUTATION_KINDS = ("permutation-weight", "permutation-activation", "permutation-ste")


def resolve_device(device: str) -> torch.device:
    """"auto" → CUDA when available, else CPU; "cuda" without a GPU is an error.

    Raises:
        ConfigError: CUDA requested but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available; use "
                          "--device cpu, or --device auto to fall back to the CPU.")
    return torch.device(device)


def prepare_out_dir(out: Path, overwrite: bool, config_text: str | None = None) -> str:
    """Check the output folder; returns "new", "resume" or "overwrite".

    A folder holding ``results.json`` is refused unless ``overwrite`` (nothing is deleted: files
    are replaced one by one as the new run writes them). A folder holding an unfinished run of the
    same config is resumed; of another config, refused.

    Raises:
        OutputExistsError: as described.
    """
    out = Path(out)
    if (out / "results.json").exists():
        if not overwrite:
            raise OutputExistsError(
                f"{out} already holds results (results.json). Choose another --out, or pass "
                f"--overwrite to replace them (files are replaced as the new run writes them)."
            )
        return "overwrite"
    if (out / "config.yaml").exists() and config_text is not None and not overwrite:
        if (out / "config.yaml").read_text() != config_text:
            raise OutputExistsError(
                f"{out} holds an unfinished run of a different configuration (config.yaml "
                f"differs). Choose another --out, or pass --overwrite to start afresh there."
            )
        return "resume"
    if out.exists() and any(out.iterdir()) and (out / "config.yaml").exists() is False and not overwrite:
        raise OutputExistsError(
            f"{out} exists and is not empty, and does not look like an llfc run. Choose another "
            f"--out (or an empty folder), or pass --overwrite."
        )
    return "new"


def _loader(ds, batch_size: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


def _train_subset(train_eval, n: int, seed: int):
    if n <= 0:
        return None
    n = min(n, len(train_eval))
    g = torch.Generator().manual_seed(derive_seed(seed, "train-subset"))
    idx = torch.randperm(len(train_eval), generator=g)[:n].sort().values.tolist()
    return Subset(train_eval, idx)


def check_input_shape(model: nn.Module, dataset, model_desc: str, dataset_name: str) -> None:
    """Run ``model`` on one sample of ``dataset``; a shape error becomes a clear ConfigError.

    Raises:
        ConfigError: the images' size or channel count does not fit the model (says which).
    """
    x = dataset[0][0].unsqueeze(0)
    declared = getattr(model, "input_shape", None)
    try:
        with torch.no_grad():
            model.eval()(x)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"{dataset_name} images have shape {tuple(x.shape[1:])} (channels, height, width), "
            f"which {model_desc} cannot take ({str(e).splitlines()[0]}). Build the model for this "
            f"dataset's input shape and number of classes, or use the dataset it was trained on."
        ) from None


class Measurer:
    """Measures pairs of one architecture on fixed data (test set + train subset).

    Args:
        model: an instance of the architecture (weights unused).
        test_set: dataset of the LLFC/LMC measurement (the paper uses the test set).
        train_subset: optional dataset for the train-set LMC curve.
        alphas: α grid (contains 0 and 1).
        measure: :class:`llfc.config.MeasureConfig`.
        bn_train: training dataset (no augmentation) for the BN ``reset`` mode.
    """

    def __init__(self, model: nn.Module, test_set, train_subset, alphas: Sequence[float], measure,
                 device: torch.device, bn_train=None, progress: bool = True, seed: int = 0):
        self.model, self.alphas, self.m, self.device, self.progress = model, list(alphas), measure, device, progress
        check_input_shape(model, test_set, f"model {type(model).__name__}", "the test")
        FeatureExtractor(model, kinds=measure.kinds, names=measure.probes)  # unknown probes fail now
        self.test = _loader(test_set, measure.batch_size)
        self.train = _loader(train_subset, measure.batch_size) if train_subset is not None else None
        self.bn_batches = None
        if measure.bn_mode == "reset":
            g = torch.Generator().manual_seed(derive_seed(seed, "bn-reset"))
            dl = DataLoader(bn_train, batch_size=measure.batch_size, shuffle=True, generator=g)
            self.bn_batches = [x for (x, _), _i in zip(dl, range(measure.bn_batches))]

    def __call__(self, sd_a: dict, sd_b: dict, name: str) -> dict[str, Any]:
        check_compatible(sd_a, sd_b)
        check_finite(sd_a, f"model A of pair {name!r}")
        check_finite(sd_b, f"model B of pair {name!r}")
        states = path_states(self.model, sd_a, sd_b, self.alphas, self.m.bn_mode, self.bn_batches,
                             self.device)
        t0 = time.perf_counter()
        res = measure_pair(self.model, sd_a, sd_b, self.test, self.alphas, states=states,
                           kinds=self.m.kinds, names=self.m.probes, conditions=self.m.conditions,
                           absolute=self.m.absolute_cos, device=self.device, progress=self.progress,
                           desc=f"measure {name} (test)")
        lmc = {"test": res.pop("lmc")}
        if self.train is not None:
            tr = measure_pair(self.model, sd_a, sd_b, self.train, self.alphas, states=states,
                              llfc=False, conditions=False, device=self.device,
                              progress=self.progress, desc=f"measure {name} (train subset)")
            lmc["train"] = tr["lmc"]
        res["lmc"] = lmc
        if self.m.stitching:
            res["stitching"] = stitching_errors(self.model, sd_a, sd_b, self.test, device=self.device,
                                                progress=self.progress)
        if self.m.angles_k:
            res["principal_angles"] = [
                {"name": k, "k": int(v["k"]), "left": v["left"].tolist(), "right": v["right"].tolist()}
                for k, v in principal_angles_per_layer(sd_a, sd_b, self.m.angles_k).items()]
        res["bn_mode"] = self.m.bn_mode
        res["cosine"] = "1-|cos| (official code)" if self.m.absolute_cos else "1-cos (signed)"
        res["seconds"] = time.perf_counter() - t0
        return res


def write_report(results: dict, out: Path, log: Callable[[str], None] = print) -> str:
    """results.json, CSV tables, figures and summary.txt into ``out``; returns the summary."""
    atomic_write_json(out / "results.json", results)
    write_tables(results["pairs"], out)
    plot_all(results["pairs"], out)
    text = summary_table(results["pairs"])
    atomic_write_text(out / "summary.txt", text + "\n")
    return text


def _results_header(kind: str, cfg_dict: dict, env: dict, extra: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llfc_version": __version__,
        "environment": env,
        "config": cfg_dict,
        **extra,
        "pairs": {},
    }


def run_experiment(cfg: ExperimentConfig, out: str | Path, *, overwrite: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run one experiment end to end into ``out`` (see the module docstring).

    Raises:
        LLFCError subclasses for bad input (unknown names, missing data, existing results,
        incompatible or non-finite checkpoints, invalid α); nothing already written is lost.
    """
    cfg = cfg.resolved()
    alphas = check_alphas(default_alphas(cfg.alphas) if isinstance(cfg.alphas, int) else cfg.alphas,
                          cfg.allow_extrapolation)
    device = resolve_device(cfg.device)
    out = Path(out)
    cfg_text = cfg.to_yaml()
    mode = prepare_out_dir(out, overwrite, cfg_text)
    if "finetune" in cfg.pairs:  # Cross-Task Linearity: parent + fine-tuned children (llfc.finetune)
        from llfc.finetune import run_finetune

        return run_finetune(cfg, out, mode, device, progress=progress, log=log)
    info = dataset_info(cfg.dataset)
    # data first: a missing dataset must fail before anything is written
    train_set = get_dataset(cfg.dataset, "train", cfg.data_root, cfg.download)
    train_eval = get_dataset(cfg.dataset, "train", cfg.data_root, False, augment=False)
    test_set = get_dataset(cfg.dataset, "test", cfg.data_root, False)
    if cfg.measure.test_samples:
        test_set = Subset(test_set, list(range(min(cfg.measure.test_samples, len(test_set)))))
    # everything that can be checked is checked before anything is written
    spec = ModelSpec(cfg.model, {"input_shape": list(info.input_shape), "num_classes": info.num_classes,
                                 **cfg.model_args})
    tcfg = TrainConfig.from_dict({**cfg.train, "device": str(device)})
    seed_everything(cfg.seed)
    arch = spec()
    measurer = Measurer(arch, test_set, _train_subset(train_eval, cfg.measure.train_samples, cfg.seed),
                        alphas, cfg.measure, device, bn_train=train_eval, progress=progress, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "overwrite":
        _remove_stale_outputs(out, cfg.pairs, log)
    atomic_write_text(out / "config.yaml", cfg_text)
    seeds = {
        "master": cfg.seed,
        "spawn": [derive_seed(cfg.seed, "spawn", t) for t in ("init", "data_parent", "data_a", "data_b")],
        "independent": [derive_seed(cfg.seed, "independent", t) for t in ("init_a", "data_a", "init_b", "data_b")],
    }
    env = {**environment(device), "seeds": seeds}
    atomic_write_json(out / "environment.json", env)
    log(f"llfc {__version__}: {cfg.dataset} ({len(train_set)} train / {len(test_set)} test), model "
        f"{cfg.model} {cfg.model_args}, pairs {', '.join(cfg.pairs)}, {len(alphas)} α values, "
        f"device {device} → {out} ({mode})")
    results = _results_header("llfc.run", cfg.to_dict(), env, {
        "dataset": {"name": cfg.dataset, "n_train": len(train_set), "n_test": len(test_set)},
        "model": {**spec.to_meta(), "n_params": sum(p.numel() for p in arch.parameters())},
    })
    resume = mode == "resume"
    pairs_dir = out / "pairs"
    states: dict[str, tuple[dict, dict]] = {}
    logs: dict[str, Any] = {}
    wants_indep = any(p in cfg.pairs for p in ("independent", *PERMUTATION_KINDS))
    if "spawn" in cfg.pairs:
        log(f"[spawn] training a parent for {cfg.spawn_epoch} epoch(s), then two children to epoch "
            f"{tcfg.epochs}")
        a, b, lg = spawn_pair(spec, train_set, test_set, tcfg, int(cfg.spawn_epoch), seeds["spawn"],
                              pairs_dir / "spawn", resume=resume, overwrite=mode == "overwrite",
                              progress=progress, meta={"dataset": cfg.dataset})
        states["spawn"], logs["spawn"] = (_cpu_sd(a), _cpu_sd(b)), lg
    if wants_indep:
        log(f"[independent] training two models from different seeds for {tcfg.epochs} epoch(s)")
        a, b, lg = independent_pair(spec, train_set, test_set, tcfg, seeds["independent"],
                                    pairs_dir / "independent", resume=resume,
                                    overwrite=mode == "overwrite", progress=progress,
                                    meta={"dataset": cfg.dataset})
        states["independent"], logs["independent"] = (_cpu_sd(a), _cpu_sd(b)), lg
    for kind in PERMUTATION_KINDS:
        if kind in cfg.pairs:
            method = kind.split("-")[1]
            log(f"[{kind}] aligning the independent pair's B onto A by {method} matching")
            sd_a, sd_b = states["independent"]
            aligned, report = align_state_dicts(arch, sd_a, sd_b, method, train_eval, cfg, device)
            save_checkpoint(pairs_dir / kind / "b_aligned", aligned,
                            {"model": spec.to_meta(), "dataset": cfg.dataset, "aligned_to": "independent/a",
                             "method": method, "llfc_version": __version__})
            atomic_write_json(pairs_dir / kind / "alignment.json", report)
            states[kind], logs[kind] = (sd_a, aligned), {"alignment": report}
    for name in [p for p in ("spawn", "independent", *PERMUTATION_KINDS) if p in cfg.pairs]:
        log(f"[{name}] measuring LMC, LLFC and the conditions")
        sd_a, sd_b = states[name]
        pr = measurer(sd_a, sd_b, name)
        pr["kind"], pr["label"] = name, PAIR_LABELS[name]
        if name == "spawn":
            pr["spawn_epoch"] = cfg.spawn_epoch
        if "alignment" in logs.get(name, {}):
            pr["alignment"] = logs[name]["alignment"]
        else:
            pr["train_logs"] = logs.get(name)
        results["pairs"][name] = pr
    text = write_report(results, out, log)
    log("\n" + text)
    log(f"\nresults, tables and figures in {out}")
    return results


_OUTPUT_FILES = ("results.json", "summary.txt", "lmc.png", "llfc.png", "weak_additivity.png",
                 "commutativity.png", "stitching.png", "lmc.csv", "barriers.csv", "llfc.csv",
                 "weak_additivity.csv", "commutativity.csv", "stitching.csv", "principal_angles.csv")


def _remove_stale_outputs(out: Path, pairs: Sequence[str], log: Callable[[str], None]) -> None:
    """With --overwrite: remove the previous run's llfc outputs (its result files and the pair
    folders this run will not rewrite), saying what is removed; other files are left alone."""
    import shutil

    removed = []
    for name in _OUTPUT_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    pdir = out / "pairs"
    if pdir.is_dir():
        for d in sorted(pdir.iterdir()):
            if d.is_dir() and d.name not in pairs:
                shutil.rmtree(d)
                removed.append(f"pairs/{d.name}/")
    if removed:
        log(f"--overwrite: removed the previous run's {', '.join(removed)}")


def _cpu_sd(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def align_state_dicts(arch: nn.Module, sd_a: dict, sd_b: dict, method: str, train_eval,
                      cfg: ExperimentConfig, device) -> tuple[dict, dict]:
    """Permute B's hidden units onto A's (Git Re-Basin; LLFC paper §5.2). Returns the aligned
    state dict and a JSON-ready report."""
    from llfc.permutation import align

    ma = _model_with(arch, sd_a)
    mb = _model_with(arch, sd_b)
    example = torch.stack([train_eval[i][0] for i in range(min(8, len(train_eval)))])
    loader, kwargs = None, {}
    if method in ("activation", "ste"):
        n = min(cfg.align.activation_samples, len(train_eval))
        loader = _loader(Subset(train_eval, list(range(n))), cfg.align.batch_size)
    if method == "weight":
        kwargs = {"restarts": cfg.align.restarts, "max_iter": cfg.align.max_iter}
    elif method == "ste":
        kwargs = {"epochs": cfg.align.ste_epochs, "lr": cfg.align.ste_lr}
    res = align(ma, mb, example, method=method, loader=loader, seed=cfg.seed, **kwargs)
    return {k: v.detach().cpu() for k, v in res.state_dict.items()}, res.report


def _model_with(arch: nn.Module, sd: dict) -> nn.Module:
    import copy

    m = copy.deepcopy(arch)
    m.load_state_dict(sd)
    return m.eval()


def _load_pair_member(path: str | Path, model: str | None, model_args: dict | None):
    """(state_dict, meta) of a checkpoint; a bare .safetensors file without its JSON sidecar is
    accepted when the architecture is given (``model``, ``model_args``)."""
    from llfc.checkpoint import checkpoint_paths

    from llfc.errors import CheckpointError

    wpath, jpath = checkpoint_paths(path)
    if wpath.is_file() and not jpath.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not model:
            raise CheckpointError(
                f"{wpath} has no JSON sidecar ({jpath.name}) recording its architecture. For a plain "
                f"state dict saved with safetensors, pass --model NAME [--model-args JSON] --dataset "
                f"NAME; for an llfc checkpoint, restore the missing .json file.")
        try:
            return load_file(str(wpath)), {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{wpath} is not a readable safetensors file ({e}).") from None
    sd, meta = load_checkpoint(path)
    return sd, meta


def analyze_checkpoints(path_a: str | Path, path_b: str | Path, out: str | Path, *,
                        dataset: str | None = None, data_root: str | None = None,
                        model: str | None = None, model_args: dict | None = None,
                        download: bool = False, alphas: int | Sequence[float] = 11,
                        allow_extrapolation: bool = False, measure=None, device: str = "cpu",
                        overwrite: bool = False, progress: bool = True, seed: int = 0,
                        log: Callable[[str], None] = print) -> dict:
    """Measure two existing checkpoints (``llfc analyze A B``).

    The architecture comes from A's JSON sidecar, or from ``model`` / ``model_args`` (then plain
    ``.safetensors`` state dicts without sidecars are accepted, e.g. your own models saved with
    ``safetensors.torch.save_file(model.state_dict(), path)``); the dataset from ``dataset`` or
    the sidecar.

    Raises:
        CheckpointError: missing / corrupted files; IncompatibleModelsError: different
        architectures or shapes (the first differing parameter is named); NonFiniteWeightsError;
        ConfigError for α outside [0, 1] without ``allow_extrapolation``; OutputExistsError.
    """
    from llfc.config import MeasureConfig
    from llfc.models import create_model

    measure = measure or MeasureConfig()
    grid = check_alphas(default_alphas(alphas) if isinstance(alphas, int) else alphas, allow_extrapolation)
    out = Path(out)
    prepare_out_dir(out, overwrite)
    sd_a, meta_a = _load_pair_member(path_a, model, model_args)
    sd_b, meta_b = _load_pair_member(path_b, model, model_args)
    sd_a, sd_b = strip_prefix(sd_a), strip_prefix(sd_b)
    dataset = dataset or meta_a.get("dataset")
    if model:
        if not dataset:
            raise ConfigError("with --model, pass --dataset NAME too (it sets the input shape).")
        info0 = dataset_info(dataset)
        ma = mb = {"name": model, "kwargs": {"input_shape": list(info0.input_shape),
                                             "num_classes": info0.num_classes, **(model_args or {})}}
    else:
        ma, mb = meta_a.get("model"), meta_b.get("model")
    if not ma:
        raise IncompatibleModelsError(
            f"{path_a}: no architecture is recorded (no JSON sidecar with \"model\": {{name, "
            f"kwargs}}). Pass --model NAME [--model-args JSON] --dataset NAME, or save checkpoints "
            f"with llfc.checkpoint.save_checkpoint(path, state_dict, meta={{'model': ...}}).")
    if mb and (mb.get("name") != ma.get("name")):
        raise IncompatibleModelsError(
            f"the checkpoints are different architectures: {path_a} is {ma.get('name')!r} and "
            f"{path_b} is {mb.get('name')!r}. Pair two checkpoints of one architecture.")
    check_compatible(sd_a, sd_b, (str(path_a), str(path_b)))
    if not dataset:
        raise ConfigError("the checkpoints do not record their dataset; pass --dataset NAME.")
    dev = resolve_device(device)
    arch = create_model(ma["name"], **ma.get("kwargs", {}))
    info = dataset_info(dataset)
    shape = tuple(ma.get("kwargs", {}).get("input_shape", info.input_shape))
    if shape != tuple(info.input_shape):
        raise ConfigError(
            f"the checkpoints' model {ma['name']!r} was built for {shape} images (channels, height, "
            f"width) but dataset {dataset!r} has {tuple(info.input_shape)} images. Pass the "
            f"--dataset the models were trained on."
        )
    train_eval = get_dataset(dataset, "train", data_root, download, augment=False)
    test_set = get_dataset(dataset, "test", data_root, False)
    if measure.test_samples:
        test_set = Subset(test_set, list(range(min(measure.test_samples, len(test_set)))))
    if measure.test_samples is not None and measure.test_samples < 1:
        raise ConfigError(f"--test-samples must be ≥ 1 (omit it to use the whole test set), got {measure.test_samples}.")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(dev)
    analyze_cfg = {"a": str(path_a), "b": str(path_b), "dataset": dataset, "data_root": data_root,
                   "model": ma, "alphas": grid, "measure": dict(vars(measure)), "seed": seed}
    import yaml

    atomic_write_text(out / "config.yaml", yaml.safe_dump(analyze_cfg, sort_keys=False))
    atomic_write_json(out / "environment.json", env)
    results = _results_header("llfc.analyze", analyze_cfg, env,
                              {"dataset": {"name": dataset, "n_test": len(test_set)}, "model": ma})
    measurer = Measurer(arch, test_set, _train_subset(train_eval, measure.train_samples, seed), grid,
                        measure, dev, bn_train=train_eval, progress=progress, seed=seed)
    pr = measurer(sd_a, sd_b, "A vs B")
    pr["kind"], pr["label"] = "checkpoints", f"{Path(path_a).name} vs {Path(path_b).name}"
    pr["checkpoints"] = {"A": str(path_a), "B": str(path_b)}
    results["pairs"]["A vs B"] = pr
    text = write_report(results, out, log)
    log("\n" + text)
    log(f"\nresults, tables and figures in {out}")
    return results


def align_checkpoints(path_a: str | Path, path_b: str | Path, out: str | Path, *, method: str = "weight",
                      dataset: str | None = None, data_root: str | None = None, seed: int = 0,
                      overwrite: bool = False, activation_samples: int = 10000, batch_size: int = 500,
                      log: Callable[[str], None] = print) -> dict:
    """``llfc align A B --method weight|activation --out C``: permute B's hidden units onto A's
    (Git Re-Basin; LLFC paper §5.2) and write ``C.safetensors`` + ``C.json`` (the aligned B, same
    architecture metadata as B) and ``C.report.json`` (objective, per-group movement, per-layer
    Eq. 9 factors before / after).

    Raises:
        OutputExistsError: C exists and not ``overwrite``; CheckpointError,
        IncompatibleModelsError, NonFiniteWeightsError, UnsupportedOperationError as for
        :func:`llfc.permutation.align`.
    """
    from llfc.checkpoint import checkpoint_exists
    from llfc.models import create_model
    from llfc.permutation import align

    out = Path(out)
    if out.suffix == ".safetensors":
        out = out.with_suffix("")
    if checkpoint_exists(out) and not overwrite:
        raise OutputExistsError(f"{out}.safetensors already exists; choose another --out or pass --overwrite.")
    sd_a, meta_a = load_checkpoint(path_a)
    sd_b, meta_b = load_checkpoint(path_b)
    ma = meta_a.get("model") or meta_b.get("model")
    if not ma:
        raise IncompatibleModelsError(f"{path_a}: its JSON sidecar does not record the architecture; "
                                      f"save it with llfc.checkpoint.save_checkpoint(..., meta={{'model': ...}}).")
    check_compatible(sd_a, sd_b, (str(path_a), str(path_b)))
    check_finite(sd_a, str(path_a))
    check_finite(sd_b, str(path_b))
    arch = create_model(ma["name"], **ma.get("kwargs", {}))
    dataset = dataset or meta_a.get("dataset") or meta_b.get("dataset")
    shape = ma.get("kwargs", {}).get("input_shape")
    loader = None
    if method in ("activation", "ste"):
        if not dataset:
            raise ConfigError(f"{method} matching needs training data: pass --dataset NAME.")
        train_eval = get_dataset(dataset, "train", data_root, False, augment=False)
        n = min(activation_samples, len(train_eval))
        loader = _loader(Subset(train_eval, list(range(n))), batch_size)
        example = torch.stack([train_eval[i][0] for i in range(4)])
    else:
        if shape is None:
            shape = list(dataset_info(dataset).input_shape) if dataset else None
        if shape is None:
            raise ConfigError("cannot tell the input shape: the checkpoint records neither the model's "
                              "input_shape nor a dataset; pass --dataset NAME.")
        example = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed))
    res = align(_model_with(arch, sd_a), _model_with(arch, sd_b), example, method=method,
                loader=loader, seed=seed)
    meta = {**meta_b, "aligned_to": str(path_a), "alignment_method": method, "llfc_version": __version__}
    save_checkpoint(out, {k: v.detach().cpu() for k, v in res.state_dict.items()}, meta)
    atomic_write_json(Path(str(out) + ".report.json"), res.report)
    log(f"aligned {path_b} onto {path_a} by {method} matching → {out}.safetensors "
        f"(report: {out}.report.json)")
    return res.report
