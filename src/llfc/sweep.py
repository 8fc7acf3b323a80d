"""Populations of pairs: grids of experiments, run in parallel or on a cluster, then aggregated.

The LLFC paper's headline claim is about populations (Zhou et al. 2023, §4: LLFC co-occurs with LMC;
Lemma 1: LLFC implies LMC). The natural population is Frankle et al. 2020's spawning sweep: train a
parent for k steps, fork its full training state, train two children to the end, vary k. A sweep is
a grid over the spawn point k (in iterations and in epochs, 0 included), seeds, widths /
architecture arguments, architectures, datasets and pair kinds; every grid point is one pair with
the outputs of ``llfc run`` in its own folder.

Sweep config (YAML; ``llfc sweep CONFIG``)::

    name: mnist-coemergence
    base:                       # an ExperimentConfig (the keys of `llfc run --config`)
      dataset: mnist
      model: mlp
      model_args: {widths: [64, 64]}
      train: {epochs: 2, batch_size: 128, ...}
    grid:
      spawn_iteration: [0, 10, 50, 100, 500]   # k in optimizer steps
      spawn_epoch: [1]                          # k in epochs (joined with spawn_iteration: one k axis)
      seed: [0, 1, 2]
      pair: [spawn]             # spawn, independent, permutation-weight, ... (default: base.pairs)
      # width: [32, 64]         # MLP: every hidden layer; other models: their `width` argument
      # model_args: [{...}, {...}], model: [mlp, {model: vgg11, model_args: {...}}], dataset: [...]
    point_figures: true         # each point's own figures (lmc.png, llfc.png, ...)

Layout of a sweep folder::

    sweep.yaml                 the resolved sweep config (a folder of another config is refused)
    parents/<key>/iter-<k>     shared training runs: one spawn parent per (data, model, recipe, seed)
                               with its full training state saved at every k of the grid; one
                               independent pair per (data, model, recipe, seed)
    points/<id>/               one pair: config.yaml, point.json, pairs/, CSV tables, figures,
                               summary.txt, and results.json written atomically LAST (its presence
                               marks a finished point; a point without it is redone on resume)
    sweep.csv, sweep.json      one row per point (columns: :data:`ROW_COLUMNS`)
    sweep_mean.csv, .md        mean ± std over seeds of every numeric column (.md: the main ones); the std
                               is the sample std, ÷(N−1), empty (csv) / null (json) / "–" (md) for one seed
    cooccurrence.csv/.md       the four cells LMC yes/no × LLFC yes/no (thresholds: llfc.criteria)
    barrier_llfc_vs_k.png, llfc_heatmap.png, barrier_vs_llfc.png, summary.txt
    report.html                the sweep's page (as `llfc report`), and one in each point folder

Seeds: a point with master seed s uses the seeds of ``llfc run --seed s`` (``derive_seed(s,
"spawn", "init" | "data_parent" | "data_a" | "data_b")``), so a point spawned at k epochs equals the
spawned pair of ``llfc run --spawn-epoch k`` bit for bit. Execution: a local process pool
(:class:`concurrent.futures.ProcessPoolExecutor`) or any executor with ``submit`` (submitit's
Slurm ``AutoExecutor``, its ``LocalExecutor`` / ``DebugExecutor``): parents first, then the points.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from llfc import criteria
from llfc.checkpoint import atomic_write_json, atomic_write_text, checkpoint_exists, load_checkpoint
from llfc.config import ExperimentConfig
from llfc.errors import ConfigError, OutputExistsError

__all__ = ["GRID_KEYS", "SweepConfig", "SweepPoint", "expand", "run_sweep", "aggregate", "ROW_COLUMNS", "BACKENDS"]

GRID_KEYS = ("spawn_iteration", "spawn_epoch", "seed", "pair", "width", "model_args", "model", "dataset")
BACKENDS = ("local", "submitit")
_SWEEP_KEYS = ("name", "description", "base", "grid", "point_figures", "cluster")
_PERM = ("permutation-weight", "permutation-activation", "permutation-ste")


class SweepError(ConfigError):
    """A sweep config or folder that cannot be run (the message says why and what to change)."""


# ------------------------------------------------------------------------------------------------
# configuration and grid expansion


@dataclasses.dataclass
class SweepConfig:
    """A grid of experiments (module docstring).

    Attributes:
        name: label of the sweep.
        base: an :class:`~llfc.config.ExperimentConfig` as a dict; every point starts from it.
        grid: axis name (:data:`GRID_KEYS`) → list of values.
        description: free text.
        point_figures: write each point's figures (its tables and summary are always written).
        cluster: submitit executor parameters (``timeout_min``, ``slurm_partition``, ``gpus_per_node``,
            ...) for ``backend="submitit"``.
    """

    name: str = "sweep"
    base: dict = dataclasses.field(default_factory=dict)
    grid: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    point_figures: bool = True
    cluster: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "sweep config") -> SweepConfig:
        """Build and check a sweep config.

        Raises:
            SweepError: not a mapping, unknown top-level keys, an empty grid, an unknown grid key, an
                axis that is not a non-empty list.
        """
        if not isinstance(d, Mapping):
            raise SweepError(f"{where}: expected a mapping with keys {', '.join(_SWEEP_KEYS)}.")
        bad = sorted(set(d) - set(_SWEEP_KEYS))
        if bad:
            raise SweepError(
                f"{where}: unknown key(s) {', '.join(bad)}; valid keys: {', '.join(_SWEEP_KEYS)}. "
                f"Experiment settings go under `base:`, grid axes under `grid:`."
            )
        c = cls(**{k: copy.deepcopy(v) for k, v in d.items()})
        if not isinstance(c.grid, Mapping) or not c.grid:
            raise SweepError(
                f"{where}: the grid is empty; give at least one axis under `grid:` "
                f"(valid axes: {', '.join(GRID_KEYS)}), e.g. `grid: {{seed: [0, 1, 2]}}`."
            )
        unknown = sorted(set(c.grid) - set(GRID_KEYS))
        if unknown:
            raise SweepError(
                f"{where}: unknown grid key(s) {', '.join(unknown)}; valid grid keys: {', '.join(GRID_KEYS)}."
            )
        for k, v in c.grid.items():
            if not isinstance(v, list) or not v:
                raise SweepError(f"{where}: grid axis {k!r} must be a non-empty list, got {v!r}.")
        for k in ("spawn_iteration", "spawn_epoch", "seed", "width"):
            for v in c.grid.get(k, []):
                if (
                    isinstance(v, bool)
                    or not isinstance(v, (int, float))
                    or v < 0
                    or (k != "width" and not float(v).is_integer())
                ):
                    raise SweepError(f"{where}: grid axis {k!r} takes whole numbers ≥ 0, got {v!r}.")
        if not isinstance(c.base, Mapping):
            raise SweepError(f"{where}: `base:` must be a mapping of experiment settings.")
        return c

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepConfig:
        """Read a sweep YAML file (a catalogue name is resolved by :func:`find_config`)."""
        p = Path(path)
        if not p.is_file():
            raise SweepError(
                f"sweep config {p} does not exist; pass a YAML file or a catalogue name "
                f"(`llfc reproduce --list` lists them)."
            )
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SweepError(f"sweep config {p} is not valid YAML: {e}") from None
        return cls.from_dict(d, where=str(p))

    def to_dict(self) -> dict:
        """Plain dict (YAML-ready)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SweepPoint:
    """One grid point = one pair.

    Attributes:
        id: folder name under ``points/``.
        config: the point's resolved :class:`ExperimentConfig` (``pairs`` = [its pair kind]).
        pair: the pair kind.
        seed: the master seed.
        k_iteration: spawn point in optimizer steps (None for non-spawn pairs).
        k_label: how k was given ("10 it", "1 ep").
        steps_per_epoch: optimizer steps per epoch of the recipe.
        parent: key of the shared parent run (``parents/<key>``).
        axes: the grid values of this point (for the aggregate table).
    """

    id: str
    config: ExperimentConfig
    pair: str
    seed: int
    k_iteration: int | None
    k_label: str | None
    steps_per_epoch: int
    parent: str
    axes: dict

    @property
    def k_epoch(self) -> float | None:
        """k in epochs (fractional for a spawn inside an epoch)."""
        return None if self.k_iteration is None else self.k_iteration / self.steps_per_epoch


def find_config(name_or_path: str | Path) -> Path:
    """A sweep YAML path, or a catalogue name (``llfc/configs/sweep-cpu`` or ``sweep-paper``).

    Raises:
        SweepError: neither a file nor a catalogue name (the names are listed).
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    cands = list_sweeps()
    for c in cands:
        if c.stem == str(name_or_path) or f"{c.parent.name}/{c.stem}" == str(name_or_path):
            return c
    raise SweepError(
        f"{name_or_path} is neither a sweep YAML file nor a catalogue sweep; catalogue: "
        f"{', '.join(f'{c.parent.name}/{c.stem}' for c in cands) or 'none'}."
    )


def list_sweeps() -> list[Path]:
    """The sweep configs shipped with llfc (``llfc/configs/sweep-*/*.yaml``), sorted."""
    from importlib import resources

    root = Path(str(resources.files("llfc") / "configs"))
    return sorted(root.glob("sweep-*/*.yaml"))


def _slug(v: Any) -> str:
    if isinstance(v, Mapping):
        return "_".join(f"{k}{_slug(x)}" for k, x in sorted(v.items()))
    if isinstance(v, (list, tuple)):
        return "x".join(_slug(x) for x in v)
    return "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in str(v))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _with_width(model: str, args: dict, w: float) -> dict:
    args = dict(args)
    if "widths" in args or model == "mlp":
        n = len(args.get("widths") or [0])
        args["widths"] = [int(w)] * n
    else:
        args["width"] = int(w) if float(w).is_integer() else w
    return args


# training-set sizes for expanding a grid without reading the data (expand(check_data=False))
_TRAIN_SIZES = {
    "mnist": 60000,
    "fashion-mnist": 60000,
    "cifar10": 50000,
    "cifar100": 50000,
    "tiny-imagenet": 100000,
    "tinyimagenet": 100000,
}


def _dataset_sizes(cfg: ExperimentConfig) -> int:
    from llfc.data import get_dataset

    return len(get_dataset(cfg.dataset, "train", cfg.data_root, cfg.download))


def expand(sc: SweepConfig, *, check_data: bool = True) -> list[SweepPoint]:
    """The grid points of ``sc``, in a fixed order (datasets, models, arguments, widths, pairs, k, seeds).

    k: the values of ``spawn_iteration`` (steps) and ``spawn_epoch`` (× steps per epoch) form one axis
    (duplicates after conversion are merged); only spawn pairs take it. Without either, spawn pairs use
    the base's ``spawn_epoch``.

    Args:
        check_data: load each dataset (its size sets the steps per epoch; missing data fails here).
            False uses the standard training-set sizes, without reading any data.

    Raises:
        SweepError: a k at or beyond the training length (the children need at least one step).
        ConfigError / UnknownNameError / DataNotFoundError: a point whose experiment config is invalid
            or whose data is missing (``check_data``).
    """
    from llfc.train import TrainConfig, steps_per_epoch

    g = sc.grid
    base = ExperimentConfig.from_dict(sc.base, where="sweep base")
    models = []
    for m in g.get("model", [None]):
        if isinstance(m, Mapping):
            bad = set(m) - {"model", "model_args"}
            if bad or "model" not in m:
                raise SweepError(f"grid axis 'model': an entry must be a name or {{model, model_args}}, got {m!r}.")
            models.append((m["model"], m.get("model_args")))
        else:
            models.append((m, None))
    sizes: dict = {}
    points: list[SweepPoint] = []
    varying = {k for k, v in g.items() if len(v) > 1}
    for ds, (model, margs), extra, width, pair in itertools.product(
        g.get("dataset", [None]),
        models,
        g.get("model_args", [None]),
        g.get("width", [None]),
        g.get("pair", base.pairs if isinstance(base.pairs, list) else [None]),
    ):
        d = base.to_dict()
        if ds is not None:
            d["dataset"] = ds
        if model is not None:
            d["model"], d["model_args"] = model, margs
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise SweepError(f"grid axis 'model_args' takes mappings, got {extra!r}.")
            d["model_args"] = {**(d.get("model_args") or {}), **extra}
        if pair is not None:
            d["pairs"] = [pair]
        probe = ExperimentConfig.from_dict(d, where="sweep point").resolved()
        assert probe.model is not None and probe.model_args is not None  # set by resolved()
        if width is not None:
            probe = dataclasses.replace(probe, model_args=_with_width(probe.model, probe.model_args, width))
        kind = probe.pairs[0]
        tcfg = TrainConfig.from_dict(probe.train)
        key = (probe.dataset, probe.data_root)
        if key not in sizes:
            sizes[key] = _dataset_sizes(probe) if check_data else _TRAIN_SIZES.get(probe.dataset, 50000)
        spe = steps_per_epoch(sizes[key], tcfg)
        total = tcfg.epochs * spe
        ks: list[tuple[int | None, str | None]] = []  # (None, None): no spawn iteration
        it: int | None
        lab: str | None
        if kind == "spawn":
            seen = set()
            given = [(int(v), f"{int(v)} it") for v in g.get("spawn_iteration", [])] + [
                (int(v) * spe, f"{int(v)} ep") for v in g.get("spawn_epoch", [])
            ]
            if not given:
                assert probe.spawn_epoch is not None  # set by resolved()
                given = [(int(probe.spawn_epoch) * spe, f"{int(probe.spawn_epoch)} ep")]
            for it, lab in given:
                if it >= total:
                    raise SweepError(
                        f"k = {lab} = {it} iterations is at or beyond the end of training ({tcfg.epochs} "
                        f"epochs × {spe} steps = {total} iterations for {probe.dataset}/{probe.model}); "
                        f"the children need at least one step of their own. Use k < {total} iterations "
                        f"(< {tcfg.epochs} epochs) or train longer (base.train.epochs)."
                    )
                if it not in seen:
                    seen.add(it)
                    ks.append((it, lab))
            ks.sort()
        else:
            ks = [(None, None)]
        arch = {"dataset": probe.dataset, "model": probe.model, "model_args": probe.model_args}
        for (it, lab), seed in itertools.product(ks, g.get("seed", [base.seed])):
            cfg = dataclasses.replace(probe, seed=int(seed))
            if it is not None and it % spe == 0:
                cfg = dataclasses.replace(cfg, spawn_epoch=it // spe)
            shared = {
                **arch,
                "data_root": cfg.data_root,
                "recipe": tcfg.recipe(),
                "seed": int(seed),
                "device": cfg.device,
            }
            parent = ("spawn-" if kind == "spawn" else "independent-") + f"seed{seed}-" + _hash(shared)
            parts = [_slug(v) for k, v in (("dataset", probe.dataset), ("model", probe.model)) if k in varying]
            if "model_args" in varying or "width" in varying:
                parts.append(_slug(probe.model_args))
            parts.append(kind)
            if it is not None:
                parts.append(f"k{it:06d}it")
            parts.append(f"seed{seed}")
            axes = {
                "dataset": probe.dataset,
                "model": probe.model,
                "model_args": json.dumps(probe.model_args, sort_keys=True),
                "width": width,
                "pair": kind,
                "seed": int(seed),
            }
            points.append(SweepPoint("-".join(parts), cfg, kind, int(seed), it, lab, spe, parent, axes))
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise SweepError(f"the grid has duplicate points ({', '.join(dup[:3])}...); remove repeated values.")
    return points


# ------------------------------------------------------------------------------------------------
# the jobs (run in worker processes or on cluster nodes)


def job_threads(threads: int | None, jobs: int) -> tuple[int, str]:
    """The torch threads of each sweep job, and how they were chosen (printed in the banner, recorded
    in each point's environment).

    ``threads`` (``--threads``) when given; else ``$OMP_NUM_THREADS`` (the user's per-process count,
    which every worker process inherits); else the cores available to this process
    (:func:`llfc.seeding.default_threads`) divided among the ``jobs`` (at least 1).

    Raises:
        SweepError: ``threads`` < 1.
    """
    from llfc.seeding import default_threads

    if threads is not None:
        if threads < 1:
            raise SweepError(f"--threads must be ≥ 1 (threads= in Python), got {threads}.")
        return int(threads), "--threads"
    n, source = default_threads()
    if source == "OMP_NUM_THREADS":
        return n, source
    return max(1, n // jobs), "cores available // --jobs"


def _set_threads(threads: int, source: str) -> None:
    from llfc.seeding import set_threads

    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the libraries the job starts
    set_threads(threads, source)


def _init_worker(threads: int, source: str) -> None:
    """Initialiser of a local worker process: its threads, and Ctrl-C ignored. The terminal sends
    SIGINT to every process of the group; a worker interrupted while it held the task queue's lock
    left the others (and the executor's shutdown) waiting forever. The main process alone handles
    Ctrl-C and stops the workers (:func:`_stop_workers`)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_threads(threads, source)


def _stop_workers(ex: ProcessPoolExecutor) -> None:
    """Stop a local executor's workers now (after Ctrl-C): pending jobs are cancelled and running
    ones terminated. What they finished is on disk (checkpoints and results are written
    atomically); running the same command again resumes from there."""
    procs = list((getattr(ex, "_processes", None) or {}).values())  # no public handle before Python 3.14
    ex.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(10)
    for proc in procs:  # one that did not stop within 10 s of SIGTERM (e.g. stalled on I/O): SIGKILL
        if proc.is_alive():  # may also be True for a worker the executor's own thread reaped first
            proc.kill()  # (then a no-op: multiprocessing ignores ProcessLookupError)
            proc.join(10)


def _data(cfg: ExperimentConfig):
    """``(cfg, train_set, train_eval, test_set, spec, tcfg)`` of a job; ``cfg`` records the number of
    test samples measured (:func:`llfc.experiment.first_test_samples`)."""
    from torch.utils.data import Subset

    from llfc.data import ArrayDataset, TextDataset, dataset_info, get_dataset
    from llfc.experiment import first_test_samples
    from llfc.train import ModelSpec, TrainConfig

    info = dataset_info(cfg.dataset)
    train_set = get_dataset(cfg.dataset, "train", cfg.data_root, cfg.download)
    train_eval = get_dataset(cfg.dataset, "train", cfg.data_root, False, augment=False)
    test_set: ArrayDataset | TextDataset | Subset = get_dataset(cfg.dataset, "test", cfg.data_root, False)
    test_set, measure = first_test_samples(test_set, cfg.measure, cfg.dataset)
    assert cfg.model is not None and cfg.model_args is not None  # job configs are resolved()
    spec = ModelSpec(
        cfg.model, {"input_shape": list(info.input_shape), "num_classes": info.num_classes, **cfg.model_args}
    )
    tcfg = TrainConfig.from_dict({**cfg.train, "device": str(_device(cfg))})
    return dataclasses.replace(cfg, measure=measure), train_set, train_eval, test_set, spec, tcfg


def _device(cfg: ExperimentConfig):
    from llfc.experiment import resolve_device

    return resolve_device(cfg.device)


def _seeds(seed: int) -> dict:
    from llfc.seeding import derive_seed

    return {
        "spawn": [derive_seed(seed, "spawn", t) for t in ("init", "data_parent", "data_a", "data_b")],
        "independent": [derive_seed(seed, "independent", t) for t in ("init_a", "data_a", "init_b", "data_b")],
    }


def _parent_done(job: dict) -> bool:
    d = Path(job["dir"])
    if job["kind"] == "spawn":
        return all(checkpoint_exists(d / f"iter-{k}") for k in job["iterations"])
    return all(checkpoint_exists(d / m / "final") for m in ("a", "b"))


def _saved_epoch(path: Path) -> int:
    """Completed epochs of a training state's JSON sidecar (0 when there is none)."""
    from llfc.checkpoint import checkpoint_paths

    j = checkpoint_paths(path)[1]
    return int(json.loads(j.read_text()).get("epoch", 0)) if j.is_file() else 0


def train_parent(job: dict) -> dict:
    """A shared run: a spawn parent trained once to the largest k, its full training state saved at
    every k of the grid (``iter-<k>``); or an independent pair (``a/``, ``b/``). Resumes a killed run.

    Args:
        job: ``{"kind": "spawn"|"independent", "dir", "config" (ExperimentConfig dict), "iterations",
            "threads", "threads_source"}``.

    Returns:
        ``{"dir", "seconds", "skipped"}``.
    """
    _set_threads(job["threads"], job["threads_source"])
    t0, c0 = time.perf_counter(), time.process_time()
    if _parent_done(job):
        return {"dir": job["dir"], "seconds": 0.0, "cpu_seconds": 0.0, "skipped": True}
    from llfc.seeding import seed_everything
    from llfc.train import independent_pair, steps_per_epoch, train

    cfg = ExperimentConfig.from_dict(job["config"])
    _, train_set, _, test_set, spec, tcfg = _data(cfg)
    d = Path(job["dir"])
    meta = {"dataset": cfg.dataset, "model": spec.to_meta()}
    if job["kind"] == "spawn":
        init, data_p, _, _ = _seeds(cfg.seed)["spawn"]
        seed_everything(init)
        model = spec()
        its = sorted(job["iterations"])
        # resume from `last` only when no spawn state before it is missing (else retrain: deterministic)
        done_epochs = _saved_epoch(d / "last")
        missing = [k for k in its if not checkpoint_exists(d / f"iter-{k}")]
        resume = not missing or min(missing) >= done_epochs * steps_per_epoch(len(train_set), tcfg)
        train(
            model,
            train_set,
            test_set,
            tcfg,
            data_seed=data_p,
            out_dir=d,
            resume=resume,
            overwrite=not resume,
            progress=False,
            seeds={"init": init},
            meta={**meta, "pair": "spawn", "member": "parent"},
            save_at_iterations=its,
            stop_iteration=its[-1],
        )
    else:
        independent_pair(
            spec, train_set, test_set, tcfg, _seeds(cfg.seed)["independent"], d, resume=True, progress=False, meta=meta
        )
    return {
        "dir": job["dir"],
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "skipped": False,
    }


def run_point(job: dict) -> dict:
    """One grid point: the pair (children spawned from the shared parent's state at k, or the shared
    independent pair, aligned for ``permutation-*``), measured as ``llfc run`` measures, outputs written,
    ``results.json`` last (atomically).

    Args:
        job: ``{"dir", "config", "point" (point.json content), "parent_dir", "threads", "threads_source", "figures"}``.

    Returns:
        ``{"dir", "seconds", "train_seconds", "measure_seconds", "skipped"}``.
    """
    _set_threads(job["threads"], job["threads_source"])
    out = Path(job["dir"])
    if (out / "results.json").is_file():
        return {
            "dir": job["dir"],
            "seconds": 0.0,
            "cpu_seconds": 0.0,
            "train_seconds": 0.0,
            "train_cpu_seconds": 0.0,
            "measure_seconds": 0.0,
            "skipped": True,
        }
    from llfc.checkpoint import save_checkpoint
    from llfc.experiment import Measurer, align_state_dicts, results_header, write_outputs
    from llfc.seeding import environment, seed_everything
    from llfc.train import train

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = ExperimentConfig.from_dict(job["config"])
    point = job["point"]
    cfg, train_set, train_eval, test_set, spec, tcfg = _data(cfg)
    device = _device(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    atomic_write_json(out / "point.json", point)
    parent = Path(job["parent_dir"])
    kind = point["pair"]
    seeds = _seeds(cfg.seed)
    logs: dict = {}
    if kind == "spawn":
        init, data_p, data_a, data_b = seeds["spawn"]
        sds = []
        for name, data in (("a", data_a), ("b", data_b)):
            seed_everything(init)
            child = spec()
            res = train(
                child,
                train_set,
                test_set,
                tcfg,
                data_seed=data,
                start_state=parent / f"iter-{point['k_iteration']}",
                out_dir=out / "pairs" / "spawn" / name,
                resume=True,
                progress=False,
                seeds={"init": init, "data_parent": data_p},
                meta={
                    "dataset": cfg.dataset,
                    "model": spec.to_meta(),
                    "pair": "spawn",
                    "member": name,
                    "spawn_iteration": point["k_iteration"],
                },
            )
            sds.append({k: v.detach().cpu().clone() for k, v in res.model.state_dict().items()})
            logs[name] = res.log
        sd_a, sd_b = sds
    else:
        sd_a, _ = load_checkpoint(parent / "a" / "final")
        sd_b, _ = load_checkpoint(parent / "b" / "final")
        logs = {"shared": str(parent)}
    t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
    seed_everything(cfg.seed)
    arch = spec()
    alignment = None
    if kind in _PERM:
        sd_b, alignment = align_state_dicts(arch, sd_a, sd_b, kind.split("-")[1], train_eval, cfg, device)
        save_checkpoint(
            out / "pairs" / kind / "b_aligned",
            sd_b,
            {"model": spec.to_meta(), "dataset": cfg.dataset, "aligned_to": "independent/a"},
        )
    t1 = time.perf_counter()
    extra: dict[str, Any] = {}
    if kind == "spawn":
        extra = {
            "spawn_iteration": point["k_iteration"],
            "spawn_epoch": point["k_iteration"] / point["steps_per_epoch"],
        }
    if alignment is not None:
        extra["alignment"] = alignment
    extra["train_logs"] = logs
    measurer = Measurer.for_config(arch, test_set, train_eval, cfg, device, progress=False)
    pr = measurer.entry(sd_a, sd_b, kind, extra)
    env = {**environment(device), "seeds": {"master": cfg.seed, **seeds}}
    results = results_header(
        "llfc.sweep-point",
        cfg.to_dict(),
        env,
        {
            "point": point,
            "dataset": {"name": cfg.dataset, "n_train": len(train_set), "n_test": len(test_set)},
            "model": spec.to_meta(),
        },
    )
    results["pairs"][kind] = pr
    write_outputs(results["pairs"], out, figures=job.get("figures", True))
    t_measure = time.perf_counter() - t1
    results["seconds"] = {"train": t_train, "measure": t_measure, "total": time.perf_counter() - t0}
    atomic_write_json(out / "results.json", results)  # last: marks the point finished
    return {
        "dir": job["dir"],
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "train_seconds": t_train,
        "train_cpu_seconds": c_train,
        "measure_seconds": t_measure,
        "skipped": False,
    }


# ------------------------------------------------------------------------------------------------
# running


def _executor(backend: str, jobs: int, threads: tuple[int, str], out: Path, cluster: dict):
    if backend == "local":
        if jobs <= 1:
            return None
        import multiprocessing as mp

        return ProcessPoolExecutor(
            max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=threads
        )
    check_backend(backend)
    import submitit

    ex = submitit.AutoExecutor(folder=str(out / "submitit"))
    ex.update_parameters(**{"timeout_min": 60, "cpus_per_task": threads[0], **(cluster or {})})
    return ex


def _wait(futures: list, what: str, progress: bool, log: Callable[[str], None]) -> list[dict]:
    """Results of futures (concurrent.futures or submitit jobs) with a tqdm bar, in completion order."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(futures),
        desc=what,
        unit="pair" if what == "pairs" else "run",
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    out = []
    try:
        pending = list(futures)
        while pending:
            still = []
            for f in pending:
                if f.done():
                    out.append(f.result())  # raises the job's exception here
                    bar.update(1)
                else:
                    still.append(f)
            pending = still
            if pending:
                time.sleep(0.2)
    finally:
        bar.close()
    return out


class _Now:
    """A finished 'future' for jobs run in this process (jobs = 1)."""

    def __init__(self, fn, arg):
        self._r = fn(arg)

    def done(self) -> bool:
        return True

    def result(self):
        return self._r


def _prepare(sc: SweepConfig, out: Path) -> tuple[list[SweepPoint], str]:
    points = expand(sc)
    text = yaml.safe_dump(sc.to_dict(), sort_keys=False)
    mode = "new"
    if (out / "sweep.yaml").is_file():
        old = (out / "sweep.yaml").read_text()
        if old != text:
            try:
                od = yaml.safe_load(old) or {}
            except yaml.YAMLError:
                od = {}
            nd = sc.to_dict()
            diff = sorted(k for k in set(od) | set(nd) if od.get(k) != nd.get(k))
            raise OutputExistsError(
                f"{out} belongs to a different sweep config (sweep.yaml differs in: {', '.join(diff) or 'text'}); "
                f"results of two configs are never mixed. Choose another --out, or delete {out} to start afresh."
            )
        mode = "resume"
    elif out.exists() and any(out.iterdir()):
        raise OutputExistsError(
            f"{out} exists, is not empty and holds no sweep.yaml; choose another --out (or an empty folder)."
        )
    return points, mode


def run_sweep(
    config: SweepConfig | Mapping | str | Path,
    out: str | Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    backend: str = "local",
    executor: Any = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) a sweep into ``out`` and aggregate it.

    Args:
        config: a :class:`SweepConfig`, its dict, a YAML path or a catalogue name.
        out: the sweep folder (module docstring). An existing folder of the same config is resumed:
            finished points (results.json present) are skipped, unfinished ones redone from their last
            checkpoint; a folder of another config is refused.
        jobs: worker processes of the local backend (1: run in this process).
        threads: torch threads per job (default: $OMP_NUM_THREADS, else the cores available // jobs, at
            least 1; :func:`job_threads`).
        backend: "local" (process pool) or "submitit" (Slurm via ``submitit.AutoExecutor``, parameters
            from the config's ``cluster:``).
        executor: any object with ``submit(fn, arg)`` returning futures/jobs with ``done()`` and
            ``result()`` (e.g. ``submitit.LocalExecutor(folder)``); overrides ``backend``.
        progress: tqdm bars over runs and pairs.

    Returns:
        the aggregate (:func:`aggregate`) plus ``"timing"``: wall seconds of the stages and the summed
        seconds of the jobs.

    Raises:
        SweepError / ConfigError: bad config (empty grid, unknown grid key, k beyond training), unknown
            backend, backend package not installed; OutputExistsError: a folder of another config.
            All before anything is written.
    """
    t_start = time.perf_counter()
    if isinstance(config, SweepConfig):
        sc = config
    elif isinstance(config, Mapping):
        sc = SweepConfig.from_dict(config)
    else:
        sc = SweepConfig.from_yaml(find_config(config))
    if backend not in BACKENDS and executor is None:
        raise SweepError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}.")
    if not isinstance(jobs, int) or jobs < 1:
        raise SweepError(f"jobs must be a whole number ≥ 1, got {jobs!r}.")
    out = Path(out)
    points, mode = _prepare(sc, out)
    threads, threads_source = job_threads(threads, jobs)
    ex = executor or _executor(backend, jobs, (threads, threads_source), out, sc.cluster)
    # everything is checked; now write
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.yaml", yaml.safe_dump(sc.to_dict(), sort_keys=False))
    parents: dict[str, dict] = {}
    for p in points:
        j = parents.setdefault(
            p.parent,
            {
                "kind": "spawn" if p.pair == "spawn" else "independent",
                "dir": str(out / "parents" / p.parent),
                "config": p.config.to_dict(),
                "iterations": [],
                "threads": threads,
                "threads_source": threads_source,
            },
        )
        if p.k_iteration is not None and p.k_iteration not in j["iterations"]:
            j["iterations"].append(p.k_iteration)
    point_jobs: list[dict[str, Any]] = [
        {
            "dir": str(out / "points" / p.id),
            "config": p.config.to_dict(),
            "point": _point_meta(p),
            "parent_dir": str(out / "parents" / p.parent),
            "threads": threads,
            "threads_source": threads_source,
            "figures": sc.point_figures,
        }
        for p in points
    ]
    todo_parents = [
        j
        for j in parents.values()
        if not _parent_done(j)
        and any(not (Path(pj["dir"]) / "results.json").is_file() for pj in point_jobs if pj["parent_dir"] == j["dir"])
    ]
    todo_points = [j for j in point_jobs if not (Path(j["dir"]) / "results.json").is_file()]
    log(
        f"sweep {sc.name}: {len(points)} pairs, {len(parents)} shared parent runs → {out} ({mode}; "
        f"{len(points) - len(todo_points)} pairs finished, {len(todo_points)} to run; "
        f"{'jobs ' + str(jobs) if executor is None and backend == 'local' else type(ex).__name__}, "
        f"{threads} thread(s) per job ({threads_source}))"
    )
    submit = (lambda fn, arg: _Now(fn, arg)) if ex is None else ex.submit
    t0 = time.perf_counter()
    try:
        pres = _wait([submit(train_parent, j) for j in todo_parents], "parents", progress, log)
        t1 = time.perf_counter()
        rres = _wait([submit(run_point, j) for j in todo_points], "pairs", progress, log)
    except KeyboardInterrupt:
        if isinstance(ex, ProcessPoolExecutor):
            _stop_workers(ex)
        raise
    finally:
        if isinstance(ex, ProcessPoolExecutor):
            ex.shutdown(cancel_futures=True)  # after a failed job: the running ones finish and are kept
    t2 = time.perf_counter()
    agg = aggregate(out, log=log)
    t3 = time.perf_counter()
    agg["timing"] = {
        "parents_wall": t1 - t0,
        "pairs_wall": t2 - t1,
        "aggregate_wall": t3 - t2,
        "total_wall": t3 - t_start,
        "parents_job_seconds": sum(r["seconds"] for r in pres),
        "pairs_job_seconds": sum(r["seconds"] for r in rres),
        "pairs_train_seconds": sum(r["train_seconds"] for r in rres),
        "pairs_measure_seconds": sum(r["measure_seconds"] for r in rres),
        "parents_job_cpu_seconds": sum(r["cpu_seconds"] for r in pres),
        "pairs_job_cpu_seconds": sum(r["cpu_seconds"] for r in rres),
        "pairs_train_cpu_seconds": sum(r["train_cpu_seconds"] for r in rres),
        "parents_run": sum(not r["skipped"] for r in pres),
        "pairs_run": sum(not r["skipped"] for r in rres),
        "jobs": jobs,
        "threads": threads,
    }
    atomic_write_json(out / "timing.json", agg["timing"])
    return agg


def _point_meta(p: SweepPoint) -> dict:
    return {
        "id": p.id,
        "pair": p.pair,
        "seed": p.seed,
        "k_iteration": p.k_iteration,
        "k_label": p.k_label,
        "k_epoch": p.k_epoch,
        "steps_per_epoch": p.steps_per_epoch,
        "parent": p.parent,
        "axes": p.axes,
    }


# ------------------------------------------------------------------------------------------------
# aggregation

ROW_COLUMNS = (
    "id",
    "dataset",
    "model",
    "model_args",
    "width",
    "pair",
    "seed",
    "k_iteration",
    "k_epoch",
    "k_label",
    "err_a",
    "err_b",
    "error_barrier_frankle",
    "error_barrier_entezari",
    "loss_barrier_entezari",
    "train_error_barrier_frankle",
    "llfc_worst_layer",
    "llfc_worst_alpha",
    "llfc_worst_distance",
    "llfc_worst_ratio",
    "llfc_max_distance",
    "llfc_mean_distance",
    "llfc_mean_ratio",
    "weak_additivity_mean",
    "commutativity_ratio",
    "stitching_max_error",
    "lmc_holds",
    "llfc_holds",
)
_GROUP = ("dataset", "model", "model_args", "width", "pair", "k_iteration")


def _at(alphas: Sequence[float], a: float) -> int:
    return min(range(len(alphas)), key=lambda i: abs(alphas[i] - a))


def pair_row(point: dict, pr: dict) -> dict:
    """One sweep.csv row from a point's point.json and its pair entry of results.json.

    Columns (:data:`ROW_COLUMNS`): endpoint test errors (A at α = 1, B at α = 0); the test-set barriers
    (Frankle et al. 2020; Entezari et al. 2022) and the train-subset Frankle barrier; the worst hidden
    layer of :func:`llfc.criteria.worst_layer` with its distance and ratio to the A-vs-B baseline, and
    the largest distance; ``llfc_mean_distance`` / ``llfc_mean_ratio``: the mean over hidden layers
    (``criteria.HIDDEN_KINDS``) of E[1 − cos_α] and of E[1 − cos_α] / E[1 − cos_AB] at α = 0.5
    (LLFC paper §3, Def. 2); ``weak_additivity_mean``: the mean over ReLUs of the weak-additivity
    distance at α = 0.5 (Def. 3); ``commutativity_ratio``: the mean over layers of Dist_com / Dist_W
    (Def. 4, Fig. 7); ``stitching_max_error``: the worst identity-stitched test error (App. B.4);
    ``lmc_holds`` / ``llfc_holds``: :func:`llfc.criteria.lmc_holds` / ``llfc_holds``.
    """
    al = pr["alphas"]
    t = pr["lmc"]["test"]
    i5 = _at(al, 0.5)
    hidden = [ly for ly in pr.get("llfc", []) if ly["kind"] in criteria.HIDDEN_KINDS]
    w = criteria.worst_layer(pr)
    wa = pr.get("weak_additivity", [])
    com = [c for c in pr.get("commutativity", []) if c.get("dist_W")]
    st = [r["error"] for r in pr.get("stitching", []) if r["role"] == "stitched"]
    ax = point["axes"]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    return {
        "id": point["id"],
        "dataset": ax["dataset"],
        "model": ax["model"],
        "model_args": ax["model_args"],
        "width": ax["width"],
        "pair": point["pair"],
        "seed": point["seed"],
        "k_iteration": point["k_iteration"],
        "k_epoch": point["k_epoch"],
        "k_label": point["k_label"],
        "err_a": t["error"][_at(al, 1.0)],
        "err_b": t["error"][_at(al, 0.0)],
        "error_barrier_frankle": t["barriers"]["error_barrier_frankle"],
        "error_barrier_entezari": t["barriers"]["error_barrier_entezari"],
        "loss_barrier_entezari": t["barriers"]["loss_barrier_entezari"],
        "train_error_barrier_frankle": (pr["lmc"].get("train") or {}).get("barriers", {}).get("error_barrier_frankle"),
        "llfc_worst_layer": w and w["layer"],
        "llfc_worst_alpha": w and w["alpha"],
        "llfc_worst_distance": w and w["distance"],
        "llfc_worst_ratio": w and w["ratio"],
        "llfc_max_distance": w and w["max_distance"],
        "llfc_mean_distance": mean(ly["distance"]["mean"][i5] for ly in hidden),
        "llfc_mean_ratio": mean(
            criteria.ratio_to_baseline(ly["distance"]["mean"][i5], ly["baseline"]["mean"]) for ly in hidden
        ),
        "weak_additivity_mean": mean(ly["distance"]["mean"][i5] for ly in wa),
        "commutativity_ratio": mean(c["dist_com"] / c["dist_W"] for c in com),
        "stitching_max_error": max(st) if st else None,
        "lmc_holds": criteria.lmc_holds(pr),
        "llfc_holds": criteria.llfc_holds(pr),
    }


def _csv(rows: list[dict], cols: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


def _numeric(rows: list[dict]) -> list[str]:
    return [
        c
        for c in ROW_COLUMNS
        if c not in _GROUP
        and c not in ("id", "seed", "k_epoch")
        and any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows)
    ]


def seed_means(rows: list[dict]) -> list[dict]:
    """Mean and sample std over seeds of every numeric column, per group of the other axes
    (dataset, model, model_args, width, pair, k); ``n`` seeds, and how many pairs satisfy each criterion.

    The std is √(Σ(x − mean)² / (N − 1)) (``statistics.stdev``, ÷(N−1) as everywhere in llfc,
    docs/results.md); None for a group of one seed, where it is undefined.
    """
    import statistics

    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[c] for c in _GROUP), []).append(r)
    out = []
    for key, rs in groups.items():
        m = dict(zip(_GROUP, key))
        m["k_epoch"], m["k_label"], m["n"] = rs[0]["k_epoch"], rs[0]["k_label"], len(rs)
        for c in _numeric(rows):
            vals = [r[c] for r in rs if isinstance(r.get(c), (int, float)) and not isinstance(r[c], bool)]
            m[f"{c}_mean"] = statistics.fmean(vals) if vals else None
            m[f"{c}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        m["lmc_holds_count"] = sum(bool(r["lmc_holds"]) for r in rs)
        m["llfc_holds_count"] = sum(bool(r["llfc_holds"]) for r in rs)
        out.append(m)
    return out


def cooccurrence(rows: list[dict]) -> dict:
    """The four cells LMC yes/no × LLFC yes/no (thresholds of :mod:`llfc.criteria`), with the ids of the
    pairs in each. The LLFC paper predicts an empty "LMC without LLFC" cell (and Lemma 1 an empty
    "LLFC without LMC" cell). Pairs without LLFC results are not counted."""
    cells: dict[str, list] = {"lmc_and_llfc": [], "lmc_without_llfc": [], "llfc_without_lmc": [], "neither": []}
    for r in rows:
        if r["llfc_holds"] is None:
            continue
        key = {
            (True, True): "lmc_and_llfc",
            (True, False): "lmc_without_llfc",
            (False, True): "llfc_without_lmc",
            (False, False): "neither",
        }[(bool(r["lmc_holds"]), bool(r["llfc_holds"]))]
        cells[key].append(r["id"])
    return {"counts": {k: len(v) for k, v in cells.items()}, "pairs": cells, "thresholds": criteria.describe()}


def cooccurrence_markdown(co: dict) -> str:
    """The co-occurrence table as Markdown (with the thresholds line)."""
    c = co["counts"]
    return (
        "| | LLFC holds | LLFC fails |\n|---|---|---|\n"
        f"| **LMC holds** | {c['lmc_and_llfc']} | {c['lmc_without_llfc']} |\n"
        f"| **LMC fails** | {c['llfc_without_lmc']} | {c['neither']} |\n\n"
        f"Thresholds: {co['thresholds']}\n"
    )


def means_markdown(means: list[dict]) -> str:
    """The per-(architecture, pair kind, k) means ± sample std over seeds as a Markdown table
    (``sweep_mean.md``; :func:`seed_means`); the std of one seed is undefined and shown as "–"."""

    def pm(m, c, scale=1.0, fmt=".2f"):
        mu, sd = m.get(f"{c}_mean"), m.get(f"{c}_std")
        if mu is None:
            return "-"
        return f"{scale * mu:{fmt}} ± " + ("–" if sd is None else f"{scale * sd:{fmt}}")

    lines = [
        "| model | pair | k | seeds | err A (%) | error barrier (pp) | worst-layer LLFC distance | "
        "worst-layer ratio to A-vs-B | LMC holds | LLFC holds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in means:
        k = "-" if m["k_iteration"] is None else f"{m['k_iteration']} it ({m['k_epoch']:.2f} ep)"
        lines.append(
            f"| {m['model']} {m['model_args']} | {m['pair']} | {k} | {m['n']} | {pm(m, 'err_a', 100)} | "
            f"{pm(m, 'error_barrier_frankle', 100)} | {pm(m, 'llfc_worst_distance', 1, '.3g')} | "
            f"{pm(m, 'llfc_worst_ratio', 1, '.3f')} | {m['lmc_holds_count']}/{m['n']} | "
            f"{m['llfc_holds_count']}/{m['n']} |"
        )
    lines += ["", "± : sample std over seeds, ÷(N−1); – : undefined (one seed)."]
    return "\n".join(lines) + "\n"


def spearman(rows: list[dict], x: str = "error_barrier_frankle", y: str = "llfc_worst_distance") -> dict:
    """Spearman rank correlation (``scipy.stats.spearmanr``) of two columns over every pair that has both."""
    from scipy.stats import spearmanr

    pts = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    if len(pts) < 3:
        return {"rho": None, "p": None, "n": len(pts)}
    res = spearmanr([p[0] for p in pts], [p[1] for p in pts])
    rho, p = float(res.statistic), float(res.pvalue)
    return {"rho": None if math.isnan(rho) else rho, "p": None if math.isnan(p) else p, "n": len(pts), "x": x, "y": y}


def _heatmap_rows(out: Path, pts: list[dict]) -> list[dict]:
    """Per spawn point: per hidden layer, the ratio E[1−cos_0.5]/E[1−cos_AB] (for the heatmap)."""
    res = []
    for pt in pts:
        if pt["pair"] != "spawn":
            continue
        pr = json.loads((out / "points" / pt["id"] / "results.json").read_text())["pairs"]["spawn"]
        i5 = _at(pr["alphas"], 0.5)
        for ly in pr.get("llfc", []):
            if ly["kind"] in criteria.HIDDEN_KINDS:
                res.append(
                    {
                        "group": (pt["axes"]["dataset"], pt["axes"]["model"], pt["axes"]["model_args"]),
                        "k_iteration": pt["k_iteration"],
                        "layer": ly["name"],
                        "seed": pt["seed"],
                        "distance": ly["distance"]["mean"][i5],
                        "ratio": criteria.ratio_to_baseline(ly["distance"]["mean"][i5], ly["baseline"]["mean"]),
                    }
                )
    return res


def sweep_environment(envs: list[dict]) -> dict:
    """The environment the points of a sweep recorded (each results.json's ``environment``), as one table:
    a value every point shares as it is, a value that differs as ``"varies: a; b"``; ``"seeds"``: per
    master seed of the grid, the derived seeds of its pairs (the same for every point of that seed)."""
    keys = list(dict.fromkeys(k for e in envs for k in e if k != "seeds"))
    table: dict[str, Any] = {}
    for k in keys:
        vals = list(dict.fromkeys(json.dumps(e.get(k)) for e in envs))
        table[k] = envs[0].get(k) if len(vals) == 1 else "varies: " + "; ".join(vals)
    seeds = {}
    for e in envs:
        sd = dict(e.get("seeds") or {})
        if "master" in sd:
            master = sd.pop("master")
            seeds[f"master {master}"] = "; ".join(
                f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sd.items()
            )
    table["seeds"] = dict(sorted(seeds.items()))
    return table


def aggregate(out: str | Path, *, figures: bool = True, log: Callable[[str], None] = print) -> dict:
    """Collect every finished point of the sweep folder ``out`` into sweep.csv / sweep.json,
    sweep_mean.csv, cooccurrence.csv / .md, the figures, summary.txt and report.html.

    report.html is what ``llfc report out`` writes (:func:`llfc.report.html.render_sweep_report`): the sweep's
    page and a page per point that has none; points run without their figures (``point_figures: false``) get a
    page without figures (``llfc report out/points/ID`` draws them).

    Returns:
        ``{"rows", "means", "cooccurrence", "spearman", "n_points", "n_finished", "thresholds", "name",
        "config" (sweep.yaml), "created", "llfc_version", "environment" (:func:`sweep_environment`)}``.

    Raises:
        SweepError: ``out`` is not a sweep folder.
    """
    import datetime as _dt

    from llfc import __version__

    out = Path(out)
    if not (out / "sweep.yaml").is_file():
        raise SweepError(f"{out} is not a sweep folder (no sweep.yaml); run `llfc sweep CONFIG --out {out}`.")
    config = yaml.safe_load((out / "sweep.yaml").read_text())
    pts, rows, envs = [], [], []
    dirs = sorted((out / "points").iterdir()) if (out / "points").is_dir() else []
    for d in dirs:
        if not (d / "results.json").is_file():
            continue
        res = json.loads((d / "results.json").read_text())
        pt = res["point"]
        pts.append(pt)
        envs.append(res.get("environment") or {})
        rows.append(pair_row(pt, res["pairs"][pt["pair"]]))
    rows.sort(
        key=lambda r: (
            r["dataset"],
            r["model"],
            r["model_args"],
            str(r["width"]),
            r["pair"],
            -1 if r["k_iteration"] is None else r["k_iteration"],
            r["seed"],
        )
    )
    means = seed_means(rows)
    co = cooccurrence(rows)
    rho = spearman(rows)
    atomic_write_text(out / "sweep.csv", _csv(rows, ROW_COLUMNS))
    mcols = (
        list(_GROUP)
        + ["k_epoch", "k_label", "n"]
        + [f"{c}_{s}" for c in _numeric(rows) for s in ("mean", "std")]
        + ["lmc_holds_count", "llfc_holds_count"]
    )
    atomic_write_text(out / "sweep_mean.csv", _csv(means, mcols))
    atomic_write_text(
        out / "cooccurrence.csv",
        "lmc_holds,llfc_holds,count\n"
        + "".join(
            f"{a},{b},{co['counts'][k]}\n"
            for a, b, k in (
                (True, True, "lmc_and_llfc"),
                (True, False, "lmc_without_llfc"),
                (False, True, "llfc_without_lmc"),
                (False, False, "neither"),
            )
        ),
    )
    atomic_write_text(out / "cooccurrence.md", cooccurrence_markdown(co))
    atomic_write_text(out / "sweep_mean.md", means_markdown(means))
    agg = {
        "rows": rows,
        "means": means,
        "cooccurrence": co,
        "spearman": rho,
        "n_points": len(dirs),
        "n_finished": len(rows),
        "thresholds": criteria.describe(),
        "name": config.get("name") or out.name,
        "config": config,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llfc_version": __version__,
        "environment": sweep_environment(envs),
    }
    atomic_write_json(out / "sweep.json", agg)
    if figures and rows:
        from llfc.report.sweep_plots import plot_heatmap, plot_scatter, plot_vs_k

        plot_vs_k(rows, out / "barrier_llfc_vs_k.png")
        plot_heatmap(_heatmap_rows(out, pts), out / "llfc_heatmap.png")
        plot_scatter(rows, rho, out / "barrier_vs_llfc.png")
    text = summary(rows, co, rho)
    atomic_write_text(out / "summary.txt", text + "\n")
    log(text)
    if rows:
        from llfc.report.html import render_sweep_report

        log(f"report: {render_sweep_report(out, draw_figures=bool(config.get('point_figures', True)))}")
    return agg


def summary(rows: list[dict], co: dict, rho: dict) -> str:
    """The sweep's summary: one line per pair, the co-occurrence table, the rank correlation."""
    head = f"{'pair':<44} {'k':>10} {'err barrier':>12} {'worst LLFC d (ratio)':>24}  LMC  LLFC"
    lines = [head, "-" * len(head)]
    for r in rows:
        k = r["k_label"] or "-"
        d = (
            f"{r['llfc_worst_distance']:.2e} (×{r['llfc_worst_ratio']:.3f})"
            if r["llfc_worst_distance"] is not None
            else "-"
        )
        lines.append(
            f"{r['id']:<44} {k:>10} {100 * r['error_barrier_frankle']:9.2f} pp {d:>24}  "
            f"{'yes' if r['lmc_holds'] else 'no ':<4} "
            f"{'-' if r['llfc_holds'] is None else ('yes' if r['llfc_holds'] else 'no')}"
        )
    c = co["counts"]
    lines += [
        "",
        "co-occurrence (pairs):          LLFC holds   LLFC fails",
        f"  LMC holds                      {c['lmc_and_llfc']:>10}   {c['lmc_without_llfc']:>10}",
        f"  LMC fails                      {c['llfc_without_lmc']:>10}   {c['neither']:>10}",
        f"  {co['thresholds']}",
    ]
    if rho.get("rho") is not None:
        lines.append(
            f"Spearman ρ(error barrier, worst-layer LLFC distance) = {rho['rho']:.3f} "
            f"(p = {rho['p']:.2g}, n = {rho['n']} pairs)"
        )
    return "\n".join(lines)


def check_backend(backend: str) -> None:
    """Raise SweepError when ``backend``'s package is missing (says which package to install)."""
    if backend == "submitit":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise SweepError(
                "the submitit backend needs the package `submitit`: pip install submitit "
                "(or pip install 'llfc[cluster]'), or use --backend local."
            ) from None
    elif backend not in BACKENDS:
        raise SweepError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}.")
