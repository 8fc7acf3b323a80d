"""Execution of an :class:`~llfc.config.ExperimentConfig`: data + models → pairs (train / spawn /
align) → one streaming measurement pass per pair → results.json, CSV tables, figures, summary.

Layout of a run directory::

    config.yaml           the resolved configuration
    environment.json      versions, platform, device, seeds
    pairs/<pair>/...      checkpoints (safetensors + JSON) and training logs
    results.json          every measurement (schema: docs/results.md)
    *.csv, *.png          tables and figures
    summary.txt           the table printed at the end
    report.html           one self-contained page with all of the above (open it in a browser)

A run interrupted during training resumes from its last per-epoch checkpoint when the same
command is run again (same config, same --out).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from llfc import __version__, distributed
from llfc.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    check_finite,
    fit_key_prefix,
    save_checkpoint,
    strip_prefix,
)
from llfc.config import AlignConfig, ExperimentConfig
from llfc.data import dataset_info, default_data_root, get_dataset
from llfc.engine import measure_pair
from llfc.errors import CheckpointError, ConfigError, IncompatibleModelsError, OutputExistsError
from llfc.interpolate import check_alphas, check_compatible, default_alphas, path_states
from llfc.metrics.angles import principal_angles_per_layer
from llfc.probe import FeatureExtractor
from llfc.report import plot_all, summary_table, write_tables
from llfc.report.html import render_run_report
from llfc.report.summary import dry_run_note
from llfc.reproduce import is_dry_run
from llfc.seeding import derive_seed, environment, seed_everything
from llfc.stitching import STITCH_POINTS, stitching_errors
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
    """ "auto" → CUDA when available, else CPU; "cuda" without a GPU is an error.

    Raises:
        ConfigError: CUDA requested but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was requested but no CUDA GPU is available; use "
            "--device cpu, or --device auto to fall back to the CPU."
        )
    return torch.device(device)


def prepare_out_dir(out: Path, overwrite: bool, config_text: str | None = None) -> str:
    """Check the output folder; returns "new", "resume" or "overwrite". Writes nothing.

    A folder holding ``results.json`` is refused unless ``overwrite``. A folder holding an
    unfinished run of the same config is resumed; of another config, refused. With ``overwrite``
    any non-empty folder gives "overwrite": the caller starts afresh there (after every other
    check has passed, it removes the previous run's llfc outputs; other files are left alone).

    Raises:
        OutputExistsError: as described (the message names the CLI flags and the Python arguments).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file, not a folder; choose another --out (out= in Python).")
    if out.is_dir() and any(out.iterdir()) and overwrite:
        return "overwrite"
    if (out / "results.json").exists():
        raise OutputExistsError(
            f"{out} already holds results (results.json). Choose another --out, or pass "
            f"--overwrite (overwrite=True in Python) to replace them."
        )
    if (out / "config.yaml").exists():
        if config_text is not None and (out / "config.yaml").read_text() != config_text:
            raise OutputExistsError(
                f"{out} holds an unfinished run of a different configuration (config.yaml "
                f"differs). Run the original command again to resume it, choose another --out, or "
                f"pass --overwrite (overwrite=True in Python) to start afresh there."
            )
        return "resume"
    if out.is_dir() and any(out.iterdir()):
        raise OutputExistsError(
            f"{out} exists and is not empty, and does not look like an unfinished llfc run. Choose "
            f"another --out (or an empty folder), or pass --overwrite (overwrite=True in Python)."
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


def first_test_samples(test_set, measure, dataset_name: str):
    """The measurement's test data: the first ``measure.test_samples`` samples of ``test_set`` (all of it
    when None), and ``measure`` with the count actually used. A count beyond the size of the test set is
    clipped to it, with a warning, so that config.yaml and results.json record what was measured.

    Returns:
        ``(dataset, measure)``: ``test_set`` or a ``Subset`` of it; a :class:`llfc.config.MeasureConfig`.
    """
    n = measure.test_samples
    if not n:
        return test_set, measure
    if n > len(test_set):
        warnings.warn(
            f"--test-samples {n} (test_samples in Python) is more than {dataset_name}'s {len(test_set)} test "
            f"samples: measuring all {len(test_set)} (recorded as test_samples: {len(test_set)}).",
            stacklevel=2,
        )
        n = len(test_set)
    return Subset(test_set, list(range(n))), dataclasses.replace(measure, test_samples=n)


def check_input_shape(model: nn.Module, dataset, model_desc: str, dataset_name: str) -> None:
    """Run ``model`` on one sample of ``dataset``; a shape error becomes a clear ConfigError.

    Raises:
        ConfigError: the images' size or channel count does not fit the model (says which).
    """
    x = dataset[0][0].unsqueeze(0)
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
        train_eval: the training set without augmentation: the train-set LMC curve is measured on
            ``measure.train_samples`` samples of it (a subset drawn with a seed derived from ``seed``;
            no curve when 0), and the BN ``reset`` mode draws its batches from it.
        alphas: α grid (α weights A); validated by :func:`llfc.interpolate.check_alphas` (0, 0.25,
            0.5, 0.75 and 1 added).
        measure: :class:`llfc.config.MeasureConfig`.
        device: where the forward passes run.
        progress: tqdm bars.
        seed: the master seed (train subset and BN-reset batches).
        allow_extrapolation: accept α outside [0, 1] (``allow_extrapolation`` of the config,
            ``--allow-extrapolation``).

    Raises:
        ConfigError: an α outside [0, 1] without ``allow_extrapolation``, the test data does not fit
            the model, unknown probes or stitch points.
    """

    def __init__(
        self,
        model: nn.Module,
        test_set,
        train_eval,
        alphas: Sequence[float],
        measure,
        device: torch.device,
        progress: bool = True,
        seed: int = 0,
        allow_extrapolation: bool = False,
    ):
        self.alphas = check_alphas(alphas, allow_extrapolation)
        self.model, self.m, self.device, self.progress = model, measure, device, progress
        self.seed, self.allow_extrapolation = seed, allow_extrapolation
        check_input_shape(model, test_set, f"model {type(model).__name__}", "the test")
        FeatureExtractor(model, kinds=measure.kinds, names=measure.probes)  # unknown probes fail now
        if measure.stitching and measure.stitch_points not in STITCH_POINTS:
            raise ConfigError(
                f"unknown stitch points {measure.stitch_points!r} (--stitch-points); valid: {', '.join(STITCH_POINTS)}."
            )
        # under torchrun each rank measures its unpadded shard; the sums are combined after the pass
        self.sharded = distributed.is_active()
        shard = lambda ds: distributed.shard_dataset(ds, measure.batch_size)  # noqa: E731
        self.test = _loader(shard(test_set), measure.batch_size)
        train_subset = _train_subset(train_eval, measure.train_samples, seed)
        self.train = _loader(shard(train_subset), measure.batch_size) if train_subset is not None else None
        self.bn_batches = None
        if measure.bn_mode == "reset":
            g = torch.Generator().manual_seed(derive_seed(seed, "bn-reset"))
            dl = DataLoader(train_eval, batch_size=measure.batch_size, shuffle=True, generator=g)
            self.bn_batches = [x for (x, _), _i in zip(dl, range(measure.bn_batches))]

    @classmethod
    def for_config(
        cls, model: nn.Module, test_set, train_eval, cfg: ExperimentConfig, device: torch.device, progress: bool
    ) -> Measurer:
        """The measurer of an :class:`ExperimentConfig`: its α grid (:meth:`ExperimentConfig.alpha_grid`),
        ``allow_extrapolation``, ``measure`` and master seed.

        Raises:
            as the constructor and :meth:`ExperimentConfig.alpha_grid`.
        """
        return cls(
            model,
            test_set,
            train_eval,
            cfg.alpha_grid(),
            cfg.measure,
            device,
            progress=progress,
            seed=cfg.seed,
            allow_extrapolation=cfg.allow_extrapolation,
        )

    def describe(self) -> str:
        """What each pair's measurement covers, in words (for the progress log): LMC on the test set (and the
        train subset), LLFC, and, where enabled, the conditions, stitching and principal angles."""
        parts = ["LMC (test set" + (" and train subset)" if self.train is not None else ")"), "LLFC"]
        if self.m.conditions:
            parts.append("its conditions (weak additivity, commutativity)")
        if self.m.stitching:
            parts.append("stitching")
        if self.m.angles_k:
            parts.append("principal angles")
        return ", ".join(parts[:-1]) + " and " + parts[-1]

    def entry(
        self, sd_a: dict, sd_b: dict, name: str, extra: dict, kind: str | None = None, label: str | None = None
    ) -> dict[str, Any]:
        """One pair's entry of results.json (schema docs/results.md): :meth:`__call__`'s measurements,
        then ``kind`` (default ``name``), ``label`` (default ``PAIR_LABELS[kind]``) and the ``extra`` keys,
        in that order.

        Raises:
            as :meth:`__call__`.
        """
        pr = self(sd_a, sd_b, name)
        kind = kind or name
        pr["kind"], pr["label"] = kind, label or PAIR_LABELS[kind]
        pr.update(extra)
        return pr

    def __call__(self, sd_a: dict, sd_b: dict, name: str) -> dict[str, Any]:
        check_compatible(sd_a, sd_b)
        check_finite(sd_a, f"model A of pair {name!r}")
        check_finite(sd_b, f"model B of pair {name!r}")
        states = path_states(self.model, sd_a, sd_b, self.alphas, self.m.bn_mode, self.bn_batches, self.device)
        t0 = time.perf_counter()
        res = measure_pair(
            self.model,
            sd_a,
            sd_b,
            self.test,
            self.alphas,
            states=states,
            allow_extrapolation=self.allow_extrapolation,
            kinds=self.m.kinds,
            names=self.m.probes,
            conditions=self.m.conditions,
            absolute=self.m.absolute_cos,
            per_token=self.m.per_token,
            device=self.device,
            progress=self.progress,
            desc=f"measure {name} (test)",
            sharded=self.sharded,
        )
        lmc = {"test": res.pop("lmc")}
        if self.train is not None:
            tr = measure_pair(
                self.model,
                sd_a,
                sd_b,
                self.train,
                self.alphas,
                states=states,
                allow_extrapolation=self.allow_extrapolation,
                llfc=False,
                conditions=False,
                device=self.device,
                progress=self.progress,
                desc=f"measure {name} (train subset)",
                sharded=self.sharded,
            )
            lmc["train"] = tr["lmc"]
            lmc["train"]["subset"] = {
                "n_samples": tr["n_samples"],
                "master_seed": self.seed,
                "seed": derive_seed(self.seed, "train-subset"),
            }
        res["lmc"] = lmc
        if self.m.stitching:
            res["stitching"] = stitching_errors(
                self.model,
                sd_a,
                sd_b,
                self.test,
                device=self.device,
                progress=self.progress,
                points=self.m.stitch_points,
                sharded=self.sharded,
            )
        if self.m.angles_k:
            res["principal_angles"] = [
                {"name": k, "k": int(v["k"]), "left": v["left"].tolist(), "right": v["right"].tolist()}
                for k, v in principal_angles_per_layer(sd_a, sd_b, self.m.angles_k).items()
            ]
        res["bn_mode"] = self.m.bn_mode
        res["cosine"] = "1-|cos| (official code)" if self.m.absolute_cos else "1-cos (signed)"
        res["seconds"] = time.perf_counter() - t0
        return res


def write_outputs(pairs: dict, out: Path, *, figures: bool = True, note: str | None = None) -> str:
    """The CSV tables, figures (unless ``figures`` is False) and summary.txt of measured pairs (entries of
    results.json's ``pairs``) into ``out``; returns the summary (``note`` is printed above its table)."""
    write_tables(pairs, out)
    if figures:
        plot_all(pairs, out)
    text = summary_table(pairs, note=note)
    atomic_write_text(out / "summary.txt", text + "\n")
    return text


def write_report(results: dict, out: Path, log: Callable[[str], None] = print) -> str:
    """results.json, CSV tables, figures, summary.txt and report.html into ``out``; returns the summary."""
    atomic_write_json(out / "results.json", results)
    text = write_outputs(results["pairs"], out, note=dry_run_note(results))
    render_run_report(out)
    return text


def results_header(kind: str, cfg_dict: dict, env: dict, extra: dict) -> dict:
    """The top of a results.json (schema docs/results.md), its ``pairs`` still empty.

    Args:
        kind: what wrote it (``llfc.run``, ``llfc.analyze``, ``llfc.sweep-point``).
        cfg_dict: the configuration as a plain dict (``config``).
        env: :func:`llfc.seeding.environment` plus seeds (``environment``).
        extra: further top-level keys (dataset, model, ...), placed after ``config``.

    Returns:
        ``{"schema_version", "kind", "created" (UTC, ISO 8601), "llfc_version", "dry_run" (the config is
        :func:`llfc.reproduce.dry_run_config`'s), "environment", "config", **extra, "pairs": {}}``.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llfc_version": __version__,
        "dry_run": is_dry_run(cfg_dict),
        "environment": env,
        "config": cfg_dict,
        **extra,
        "pairs": {},
    }


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run one experiment end to end into ``out`` (see the module docstring).

    Raises:
        LLFCError subclasses for bad input (unknown names, missing data, existing results,
        incompatible or non-finite checkpoints, invalid α); nothing already written is lost.
    """
    cfg = cfg.resolved()
    log, progress = _rank_output(log, progress)
    device = resolve_device(cfg.device)
    out = Path(out)
    if "finetune" in cfg.pairs:  # Cross-Task Linearity: parent + fine-tuned children (llfc.finetune)
        from llfc.finetune import run_finetune

        return run_finetune(cfg, out, _prepare_run(cfg, out, overwrite)[1], device, progress=progress, log=log)
    info = dataset_info(cfg.dataset)
    # data first: a missing dataset must fail before anything is written, and config.yaml records the
    # number of test samples measured
    dopt = cfg.dataset_args or None
    train_set = get_dataset(cfg.dataset, "train", cfg.data_root, cfg.download, options=dopt)
    train_eval = get_dataset(cfg.dataset, "train", cfg.data_root, False, augment=False, options=dopt)
    test_set: Any = get_dataset(cfg.dataset, "test", cfg.data_root, False, options=dopt)  # or a Subset
    info = getattr(test_set, "info", info)  # a text dataset's shape (context,) and vocabulary size
    test_set, measure = first_test_samples(test_set, cfg.measure, cfg.dataset)
    cfg = dataclasses.replace(cfg, measure=measure)
    cfg_text, mode = _prepare_run(cfg, out, overwrite)
    # everything that can be checked is checked before anything is written
    assert cfg.model is not None and cfg.spawn_epoch is not None  # set by cfg.resolved()
    spec = ModelSpec(
        cfg.model, {"input_shape": list(info.input_shape), "num_classes": info.num_classes, **(cfg.model_args or {})}
    )
    tcfg = TrainConfig.from_dict({**cfg.train, "device": str(device)})
    seed_everything(cfg.seed)
    arch = spec()
    run_meta = {
        "dataset": cfg.dataset,
        "run": {"seed": cfg.seed, "data_root": str(Path(cfg.data_root or default_data_root()).resolve())},
    }
    if any(k in cfg.pairs for k in PERMUTATION_KINDS):  # a model llfc cannot permute is refused now
        from llfc.permutation import derive_spec

        derive_spec(arch, torch.stack([train_eval[i][0] for i in range(min(2, len(train_eval)))]))
    measurer = Measurer.for_config(arch, test_set, train_eval, cfg, device, progress)
    main = distributed.is_main()  # rank 0 alone writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if mode == "overwrite":
            _remove_stale_outputs(out, cfg.pairs, log)
        atomic_write_text(out / "config.yaml", cfg_text)
    seeds: dict[str, Any] = {
        "master": cfg.seed,
        "spawn": [derive_seed(cfg.seed, "spawn", t) for t in ("init", "data_parent", "data_a", "data_b")],
        "independent": [derive_seed(cfg.seed, "independent", t) for t in ("init_a", "data_a", "init_b", "data_b")],
    }
    env = {**environment(device), "seeds": seeds, "world_size": distributed.world_size()}
    if main:
        atomic_write_json(out / "environment.json", env)
    used = (
        f"{tcfg.max_batches_per_epoch} batches of {tcfg.batch_size} per epoch from {len(train_set)} train"
        if tcfg.max_batches_per_epoch
        else f"{len(train_set)} train"
    )
    log(
        f"llfc {__version__}: {cfg.dataset} ({used} / {len(test_set)} test), model "
        f"{cfg.model} {cfg.model_args}, pairs {', '.join(cfg.pairs)}, {len(measurer.alphas)} α values, "
        f"device {device} → {out} ({mode})"
    )
    results = results_header(
        "llfc.run",
        cfg.to_dict(),
        env,
        {
            "dataset": {"name": cfg.dataset, "n_train": len(train_set), "n_test": len(test_set)},
            "model": {**spec.to_meta(), "n_params": sum(p.numel() for p in arch.parameters())},
        },
    )
    resume = mode == "resume"
    pairs_dir = out / "pairs"
    states: dict[str, tuple[dict, dict]] = {}
    logs: dict[str, Any] = {}
    wants_indep = any(p in cfg.pairs for p in ("independent", *PERMUTATION_KINDS))
    try:
        if "spawn" in cfg.pairs:
            log(f"[spawn] training a parent for {cfg.spawn_epoch} epoch(s), then two children to epoch {tcfg.epochs}")
            a, b, lg = spawn_pair(
                spec,
                train_set,
                test_set,
                tcfg,
                int(cfg.spawn_epoch),
                seeds["spawn"],
                pairs_dir / "spawn",
                resume=resume,
                overwrite=mode == "overwrite",
                progress=progress,
                meta=run_meta,
            )
            states["spawn"], logs["spawn"] = (_cpu_sd(a), _cpu_sd(b)), lg
        if wants_indep:
            log(f"[independent] training two models from different seeds for {tcfg.epochs} epoch(s)")
            a, b, lg = independent_pair(
                spec,
                train_set,
                test_set,
                tcfg,
                seeds["independent"],
                pairs_dir / "independent",
                resume=resume,
                overwrite=mode == "overwrite",
                progress=progress,
                meta=run_meta,
            )
            states["independent"], logs["independent"] = (_cpu_sd(a), _cpu_sd(b)), lg
    except (CheckpointError, OutputExistsError) as e:
        if not resume:
            raise
        raise type(e)(
            f"{e} To give up the unfinished run in {out} and start afresh, run the same "
            f"command with --overwrite (overwrite=True in Python)."
        ) from None
    for kind in PERMUTATION_KINDS:
        if kind in cfg.pairs:
            method = kind.split("-")[1]
            log(f"[{kind}] aligning the independent pair's B onto A by {method} matching")
            sd_a, sd_b = states["independent"]
            aligned, report = align_state_dicts(arch, sd_a, sd_b, method, train_eval, cfg, device)
            if main:
                save_checkpoint(
                    pairs_dir / kind / "b_aligned",
                    aligned,
                    {
                        "model": spec.to_meta(),
                        **run_meta,
                        "aligned_to": "independent/a",
                        "method": method,
                        "llfc_version": __version__,
                    },
                )
                atomic_write_json(pairs_dir / kind / "alignment.json", report)
            states[kind], logs[kind] = (sd_a, aligned), {"alignment": report}
    for name in [p for p in ("spawn", "independent", *PERMUTATION_KINDS) if p in cfg.pairs]:
        log(f"[{name}] measuring {measurer.describe()}")
        extra: dict[str, Any] = {"spawn_epoch": cfg.spawn_epoch} if name == "spawn" else {}
        if "alignment" in logs.get(name, {}):
            extra["alignment"] = logs[name]["alignment"]
        else:
            extra["train_logs"] = logs.get(name)
        results["pairs"][name] = measurer.entry(*states[name], name, extra)
    text = write_report(results, out, log) if main else summary_table(results["pairs"])
    distributed.barrier()  # no rank finishes before results.json is complete
    log("\n" + text)
    log(f"\nresults, tables and figures in {out}")
    return results


def _prepare_run(cfg: ExperimentConfig, out: Path, overwrite: bool) -> tuple[str, str]:
    """(config.yaml text, :func:`prepare_out_dir`'s mode) of a run, every rank agreeing on both."""
    cfg_text = cfg.to_yaml()
    mode = prepare_out_dir(out, overwrite, cfg_text)
    distributed.check_same(
        cfg_text, "the configuration (config.yaml)", "Launch every rank with the same command and config file."
    )
    distributed.barrier()  # every rank has looked at --out before rank 0 writes there
    return cfg_text, mode


def _rank_output(log: Callable[[str], None], progress: bool) -> tuple[Callable[[str], None], bool]:
    """Rank 0 alone prints and draws progress bars; the other ranks stay silent."""
    if distributed.is_main():
        return log, progress
    return (lambda *_a, **_k: None), False


_OUTPUT_FILES = (
    "results.json",
    "summary.txt",
    "lmc.png",
    "llfc.png",
    "weak_additivity.png",
    "commutativity.png",
    "stitching.png",
    "lmc.csv",
    "barriers.csv",
    "llfc.csv",
    "weak_additivity.csv",
    "commutativity.csv",
    "stitching.csv",
    "principal_angles.csv",
    "report.html",
)


def _remove_stale_outputs(out: Path, pairs: Sequence[str], log: Callable[[str], None]) -> None:
    """With --overwrite: remove the previous run's llfc outputs (its result files, config,
    environment and every pair folder: the run trains afresh), saying what is removed; other
    files are left alone."""
    import shutil

    removed = []
    for name in (*_OUTPUT_FILES, "config.yaml", "environment.json"):
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    pdir = out / "pairs"
    if pdir.is_dir():
        for d in sorted(pdir.iterdir()):
            if d.is_dir():
                shutil.rmtree(d)
                removed.append(f"pairs/{d.name}/")
    if removed:
        log(f"--overwrite: removed the previous run's {', '.join(removed)}")


def _cpu_sd(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def align_state_dicts(
    arch: nn.Module, sd_a: dict, sd_b: dict, method: str, train_eval, cfg: ExperimentConfig, device
) -> tuple[dict, dict]:
    """Permute B's hidden units onto A's (Git Re-Basin; LLFC paper §5.2). Returns the aligned
    state dict and a JSON-ready report."""
    from llfc.permutation import align

    ma = _model_with(arch, sd_a)
    mb = _model_with(arch, sd_b)
    example = torch.stack([train_eval[i][0] for i in range(min(8, len(train_eval)))])
    loader, kwargs = None, dict[str, Any]()
    if method in ("activation", "ste"):
        n = min(cfg.align.activation_samples, len(train_eval))
        subset: Dataset = Subset(train_eval, list(range(n)))
        if method == "activation" and distributed.is_active():  # statistics merged over ranks
            subset, kwargs = distributed.shard_dataset(subset, cfg.align.batch_size), {"sharded": True}
        loader = _loader(subset, cfg.align.batch_size)
    if method == "weight":
        kwargs = {"restarts": cfg.align.restarts, "max_iter": cfg.align.max_iter}
    elif method == "ste":
        kwargs = {"epochs": cfg.align.ste_epochs, "lr": cfg.align.ste_lr}
    res = align(ma, mb, example, method=method, loader=loader, seed=cfg.seed, **kwargs)
    aligned = {k: v.detach().cpu() for k, v in res.state_dict.items()}
    distributed.check_same(
        aligned,
        f"the weights aligned by {method} matching",
        "Run every rank with the same thread count and library versions.",
    )
    return aligned, res.report


def _model_with(arch: nn.Module, sd: dict) -> nn.Module:
    import copy

    m = copy.deepcopy(arch)
    m.load_state_dict(sd)
    return m.eval()


def _load_pair_member(path: str | Path, model: str | None, model_args: dict | None = None):
    """(state_dict, meta) of a checkpoint (:func:`llfc.checkpoint.load_weights`: an llfc checkpoint,
    a plain ``.safetensors`` file or a PyTorch ``.pt`` / ``.pth`` state dict); a plain file, which
    records no architecture, needs ``model``."""
    from llfc.checkpoint import load_weights
    from llfc.errors import CheckpointError

    sd, meta = load_weights(path)
    if not meta and not model:
        raise CheckpointError(
            f"{path} is a plain state dict: it records no architecture (no llfc JSON sidecar). Pass "
            f"--model NAME [--model-args JSON] --dataset NAME (model=, model_args=, dataset= in "
            f"Python); for an llfc checkpoint, restore its missing .json file."
        )
    return sd, meta


def _check_weights_fit(arch: nn.Module, sd: dict, path, given_model: bool) -> None:
    """The weights in ``path`` have exactly the built model's keys and shapes (else a clear error)."""
    from llfc.checkpoint import check_state_dict_matches

    try:
        check_state_dict_matches(arch.state_dict(), sd, str(path))
    except IncompatibleModelsError as e:
        if not given_model:
            raise
        raise IncompatibleModelsError(
            f"{e} Pass the --model, --model-args and --dataset the weights were trained with "
            f"(see `llfc list` and `llfc probes MODEL`)."
        ) from None


def _dataset_options(ma: dict, dataset: str) -> dict | None:
    """The options of ``dataset`` for the checkpoints' model ``ma`` (``{"name", "kwargs"}``): a text
    dataset's windows of the model's context, else None. Reads no data.

    Raises:
        ConfigError: the model was built for images of another shape than the dataset's.
    """
    info = dataset_info(dataset)
    shape = tuple(ma.get("kwargs", {}).get("input_shape", info.input_shape))
    if info.modality == "text":
        return {"context": int(shape[-1])}  # windows the model takes
    if shape != tuple(info.input_shape):
        raise ConfigError(
            f"the checkpoints' model {ma['name']!r} was built for {shape} images (channels, height, "
            f"width) but dataset {dataset!r} has {tuple(info.input_shape)} images. Pass the "
            f"--dataset the models were trained on."
        )
    return None


def _build_arch(name: str, kwargs: dict) -> nn.Module:
    from llfc.models import create_model

    try:
        return create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model {name!r} with arguments {kwargs} ({e}); check --model-args.") from None


def _same_weights(sd_a: dict, sd_b: dict) -> bool:
    return sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def analyze_checkpoints(
    path_a: str | Path,
    path_b: str | Path,
    out: str | Path,
    *,
    dataset: str | None = None,
    data_root: str | None = None,
    model: str | None = None,
    model_args: dict | None = None,
    download: bool = False,
    alphas: int | Sequence[float] = 11,
    allow_extrapolation: bool = False,
    measure=None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    seed: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure two existing checkpoints (``llfc analyze A B``).

    The architecture comes from A's JSON sidecar, or from ``model`` / ``model_args`` (then plain
    state dicts without sidecars are accepted: ``.safetensors`` saved with
    ``safetensors.torch.save_file(model.state_dict(), path)`` or PyTorch ``.pt`` / ``.pth`` saved
    with ``torch.save(model.state_dict(), path)``); the dataset from ``dataset`` or the sidecar.

    Checkpoints written by ``llfc run`` record the run's master seed and data root; they are the
    defaults of ``seed`` (else 0) and ``data_root``, so that the train subset of the train-set
    LMC curve and the BatchNorm-reset batches are the run's and its results are reproduced.

    Everything is checked before anything is written into ``out``: the weights against the
    built model (keys and shapes), the data against the model's input.

    Raises:
        CheckpointError: missing / corrupted files; IncompatibleModelsError: different
        architectures or shapes (the first differing parameter is named), or weights that do not
        fit ``model`` / ``model_args``; NonFiniteWeightsError; ConfigError for α outside [0, 1]
        without ``allow_extrapolation`` or data the model cannot take; OutputExistsError.
    """
    import warnings

    from llfc.config import MeasureConfig

    measure = measure or MeasureConfig()
    log, progress = _rank_output(log, progress)
    grid = check_alphas(default_alphas(alphas) if isinstance(alphas, int) else alphas, allow_extrapolation)
    if measure.test_samples is not None and measure.test_samples < 1:
        raise ConfigError(
            f"--test-samples must be ≥ 1 (omit it to use the whole test set), got {measure.test_samples}."
        )
    out = Path(out)
    prepare_out_dir(out, overwrite)
    _check_same_checkpoints(path_a, path_b)
    sd_a, meta_a = _load_pair_member(path_a, model, model_args)
    sd_b, meta_b = _load_pair_member(path_b, model, model_args)
    sd_a, sd_b = strip_prefix(sd_a), strip_prefix(sd_b)
    recorded = meta_a.get("run") or {}
    seed = int(recorded.get("seed", 0)) if seed is None else int(seed)
    if data_root is None and recorded.get("data_root") and Path(recorded["data_root"]).is_dir():
        data_root = recorded["data_root"]  # else $LLFC_DATA_ROOT / ./data, as always
    dataset = dataset or meta_a.get("dataset")
    ma: dict[str, Any] | None
    mb: dict[str, Any] | None
    if model:
        if not dataset:
            raise ConfigError("with --model, pass --dataset NAME too (it sets the input shape).")
        info0 = dataset_info(dataset)
        ma = mb = {
            "name": model,
            "kwargs": {"input_shape": list(info0.input_shape), "num_classes": info0.num_classes, **(model_args or {})},
        }
    else:
        ma, mb = meta_a.get("model"), meta_b.get("model")
    if not ma:
        raise IncompatibleModelsError(
            f'{path_a}: no architecture is recorded (no JSON sidecar with "model": {{name, '
            f"kwargs}}). Pass --model NAME [--model-args JSON] --dataset NAME, or save checkpoints "
            f"with llfc.checkpoint.save_checkpoint(path, state_dict, meta={{'model': ...}})."
        )
    if mb and (mb.get("name") != ma.get("name")):
        raise IncompatibleModelsError(
            f"the checkpoints are different architectures: {path_a} is {ma.get('name')!r} and "
            f"{path_b} is {mb.get('name')!r}. Pair two checkpoints of one architecture."
        )
    arch = _build_arch(ma["name"], ma.get("kwargs", {}))
    sd_a, sd_b = (
        fit_key_prefix(arch.state_dict(), sd_a, str(path_a)),
        fit_key_prefix(arch.state_dict(), sd_b, str(path_b)),
    )
    check_compatible(sd_a, sd_b, (str(path_a), str(path_b)))
    if _same_weights(sd_a, sd_b):
        warnings.warn(
            f"{path_a} and {path_b} hold the same weights: every α gives the same model, "
            f"so every barrier and LLFC distance is 0. Pass two different models.",
            stacklevel=2,
        )
    if not dataset:
        raise ConfigError("the checkpoints do not record their dataset; pass --dataset NAME.")
    dev = resolve_device(device)
    _check_weights_fit(arch, sd_a, path_a, bool(model))
    _check_weights_fit(arch, sd_b, path_b, bool(model))
    dopt = _dataset_options(ma, dataset)
    train_eval = get_dataset(dataset, "train", data_root, download, augment=False, options=dopt)
    test_set: Any = get_dataset(dataset, "test", data_root, False, options=dopt)  # or a Subset of it
    test_set, measure = first_test_samples(test_set, measure, dataset)
    # the data against the model (input shape, probes, BN batches): still nothing written
    measurer = Measurer(
        arch,
        test_set,
        train_eval,
        grid,
        measure,
        dev,
        progress=progress,
        seed=seed,
        allow_extrapolation=allow_extrapolation,
    )
    _check_classes(_model_with(arch, sd_a), test_set, dataset)
    main = distributed.is_main()  # rank 0 alone writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
    env = {**environment(dev), "world_size": distributed.world_size()}
    analyze_cfg = {
        "a": str(path_a),
        "b": str(path_b),
        "dataset": dataset,
        "data_root": data_root,
        "model": ma,
        "alphas": grid,
        "measure": dict(vars(measure)),
        "seed": seed,
    }
    distributed.check_same(analyze_cfg, "the analyze options", "Launch every rank with the same command.")
    import yaml

    if main:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(analyze_cfg, sort_keys=False))
        atomic_write_json(out / "environment.json", env)
    results = results_header(
        "llfc.analyze", analyze_cfg, env, {"dataset": {"name": dataset, "n_test": len(test_set)}, "model": ma}
    )
    results["pairs"]["A vs B"] = measurer.entry(
        sd_a,
        sd_b,
        "A vs B",
        {"checkpoints": {"A": str(path_a), "B": str(path_b)}},
        kind="checkpoints",
        label=f"{Path(path_a).name} vs {Path(path_b).name}",
    )
    text = write_report(results, out, log) if main else summary_table(results["pairs"])
    distributed.barrier()
    log("\n" + text)
    log(f"\nresults, tables and figures in {out}")
    return results


def _check_classes(model: nn.Module, dataset, dataset_name: str) -> None:
    """The model's logits cover every label of one batch of ``dataset`` (else cross-entropy fails
    mid-run)."""
    n = min(256, len(dataset))
    x = torch.stack([dataset[i][0] for i in range(n)])
    y = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(n)])  # labels, or (T,) next tokens
    with torch.no_grad():
        k = model(x[:1]).shape[-1]
    if int(y.max()) >= k:
        raise ConfigError(
            f"the model has {k} outputs but {dataset_name} has labels up to {int(y.max())}; "
            f"build it with num_classes for this dataset (--model-args) or pass the "
            f"--dataset it was trained on."
        )


def _check_same_checkpoints(*paths: str | Path) -> None:
    """Under torchrun: every rank must read byte-identical checkpoint files (SHA-256 compared)."""
    if not distributed.is_active():
        return
    from llfc.checkpoint import checkpoint_paths

    for p in paths:
        distributed.check_same(
            [distributed.file_digest(f) for f in checkpoint_paths(p)],
            f"the checkpoint {p}",
            "Give every rank the same files (a shared file system).",
        )


def align_checkpoints(
    path_a: str | Path,
    path_b: str | Path,
    out: str | Path,
    *,
    method: str = "weight",
    dataset: str | None = None,
    data_root: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    activation_samples: int = 10000,
    batch_size: int = 500,
    model: str | None = None,
    model_args: dict | None = None,
    ste_epochs: int | None = None,
    ste_lr: float | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """``llfc align A B --method weight|activation|ste --out C``: permute B's hidden units onto A's
    (Git Re-Basin; LLFC paper §5.2) and write ``C.safetensors`` + ``C.json`` (the aligned B, same
    architecture metadata as B) and ``C.report.json`` (objective, per-group movement, per-layer
    Eq. 9 factors before / after). When C is an existing folder, the files are written inside it,
    named after B (``C/<B's name>_aligned.safetensors``).

    A and B may be llfc checkpoints, plain ``.safetensors`` or PyTorch ``.pt`` / ``.pth`` state
    dicts; plain files need ``model`` (and ``model_args``, ``dataset``) as for
    :func:`analyze_checkpoints`.

    ``ste_epochs`` / ``ste_lr`` (``--ste-epochs`` / ``--ste-lr``; only with ``method="ste"``): epochs over the
    first ``activation_samples`` training samples and SGD learning rate of the straight-through estimator
    (:func:`llfc.permutation.ste_matching`); default those of :class:`llfc.config.AlignConfig` (1, 0.01).

    Raises:
        ConfigError: STE settings with another method, ste_epochs < 1, ste_lr not > 0.
        OutputExistsError: C exists and not ``overwrite``; CheckpointError,
        IncompatibleModelsError, NonFiniteWeightsError, UnsupportedOperationError as for
        :func:`llfc.permutation.align`.
    """
    from llfc.checkpoint import TORCH_SUFFIXES, checkpoint_exists
    from llfc.permutation import align
    from llfc.permutation.align import example_input_for

    if method != "ste" and (ste_epochs is not None or ste_lr is not None):
        raise ConfigError(
            "--ste-epochs / --ste-lr (ste_epochs=, ste_lr=) are settings of the straight-through estimator: "
            "use them with --method ste (method='ste'), or drop them."
        )
    if ste_epochs is not None and ste_epochs < 1:
        raise ConfigError(f"--ste-epochs (ste_epochs=) must be at least 1, got {ste_epochs}.")
    if ste_lr is not None and not 0 < ste_lr < float("inf"):
        raise ConfigError(f"--ste-lr (ste_lr=) must be a positive number, got {ste_lr}.")
    out = Path(out)
    if out.is_dir():
        stem = Path(path_b).name
        for suffix in (".safetensors", ".json", *TORCH_SUFFIXES):
            stem = stem.removesuffix(suffix)
        out = out / f"{stem}_aligned"
    if out.suffix == ".safetensors":
        out = out.with_suffix("")
    if checkpoint_exists(out) and not overwrite:
        raise OutputExistsError(f"{out}.safetensors already exists; choose another --out or pass --overwrite.")
    log, _ = _rank_output(log, False)
    distributed.check_same(
        (method, dataset, seed, activation_samples, batch_size, ste_epochs, ste_lr),
        "the align options",
        "Launch every rank with the same command.",
    )
    _check_same_checkpoints(path_a, path_b)
    distributed.barrier()  # every rank has looked at --out before rank 0 writes it
    sd_a, meta_a = _load_pair_member(path_a, model, model_args)
    sd_b, meta_b = _load_pair_member(path_b, model, model_args)
    dataset = dataset or meta_a.get("dataset") or meta_b.get("dataset")
    if model:
        if not dataset:
            raise ConfigError("with --model, pass --dataset NAME too (it sets the input shape).")
        info0 = dataset_info(dataset)
        ma: dict[str, Any] = {
            "name": model,
            "kwargs": {"input_shape": list(info0.input_shape), "num_classes": info0.num_classes, **(model_args or {})},
        }
        meta_b = {**meta_b, "model": ma, "dataset": dataset}
    else:
        ma = meta_a.get("model") or meta_b.get("model")
    if not ma:
        raise IncompatibleModelsError(
            f"{path_a}: its JSON sidecar does not record the architecture; "
            f"pass --model NAME [--model-args JSON] --dataset NAME, or save it "
            f"with llfc.checkpoint.save_checkpoint(..., meta={{'model': ...}})."
        )
    arch = _build_arch(ma["name"], ma.get("kwargs", {}))
    sd_a, sd_b = (
        fit_key_prefix(arch.state_dict(), sd_a, str(path_a)),
        fit_key_prefix(arch.state_dict(), sd_b, str(path_b)),
    )
    check_compatible(sd_a, sd_b, (str(path_a), str(path_b)))
    check_finite(sd_a, str(path_a))
    check_finite(sd_b, str(path_b))
    _check_weights_fit(arch, sd_a, path_a, bool(model))
    _check_weights_fit(arch, sd_b, path_b, bool(model))
    shape = ma.get("kwargs", {}).get("input_shape")
    dopt = _dataset_options(ma, dataset) if dataset else None  # data the model cannot take: refused now
    kwargs: dict[str, Any]
    loader, kwargs = None, {}
    if method in ("activation", "ste"):
        if not dataset:
            raise ConfigError(f"{method} matching needs training data: pass --dataset NAME.")
        train_eval = get_dataset(dataset, "train", data_root, False, augment=False, options=dopt)
        check_input_shape(arch, train_eval, f"model {ma['name']!r}", dataset)
        n = min(activation_samples, len(train_eval))
        subset: Dataset = Subset(train_eval, list(range(n)))
        if method == "activation" and distributed.is_active():  # statistics merged over ranks
            subset, kwargs = distributed.shard_dataset(subset, batch_size), {"sharded": True}
        loader = _loader(subset, batch_size)
        example = torch.stack([train_eval[i][0] for i in range(4)])
        if method == "ste":
            d = AlignConfig()
            kwargs = {"epochs": ste_epochs or d.ste_epochs, "lr": ste_lr or d.ste_lr}
    else:
        if shape is None:
            shape = list(dataset_info(dataset).input_shape) if dataset else None
        if shape is None:
            raise ConfigError(
                "cannot tell the input shape: the checkpoint records neither the model's "
                "input_shape nor a dataset; pass --dataset NAME."
            )
        example = example_input_for(arch, shape, 4, torch.Generator().manual_seed(seed))
    res = align(
        _model_with(arch, sd_a), _model_with(arch, sd_b), example, method=method, loader=loader, seed=seed, **kwargs
    )
    meta = {**meta_b, "aligned_to": str(path_a), "alignment_method": method, "llfc_version": __version__}
    aligned = {k: v.detach().cpu() for k, v in res.state_dict.items()}
    distributed.check_same(
        aligned,
        f"the weights aligned by {method} matching",
        "Run every rank with the same thread count and library versions.",
    )
    if distributed.is_main():
        save_checkpoint(out, aligned, meta)
        atomic_write_json(Path(str(out) + ".report.json"), res.report)
    distributed.barrier()
    log(f"aligned {path_b} onto {path_a} by {method} matching → {out}.safetensors (report: {out}.report.json)")
    return res.report
