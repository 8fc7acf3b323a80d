"""The paper's experiments as ready-made configurations: ``llfc reproduce NAME``.

Every experiment is one YAML file, an :class:`llfc.config.ExperimentConfig`, shipped inside the
package (``llfc/configs/<scale>/<name>.yaml``; the repository's ``configs/<scale>/`` holds links to
the same files) at two scales:

* ``paper``: the published settings as far as they are known (paper-digest §5; every setting's
  source is given in a comment), meant for one GPU;
* ``cpu``: reduced versions (narrow widths, few epochs) that finish on 2 CPU cores.

The first lines of each YAML carry its catalogue entry as ``# @key: value`` comments
(``description``, ``reference``, ``cost-cpu``, ``cost-gpu``); the experiment's name is the file
name, and equals the config's ``name:``.

A dry run (``dry_run=True``, ``llfc reproduce NAME --dry-run``) runs every stage of the experiment
for a few batches only (see :func:`dry_run_config`): a check that data, model, training, alignment,
measurement and report work end to end before a long run.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

from llfc.config import ExperimentConfig
from llfc.errors import ConfigError, UnknownNameError

__all__ = [
    "SCALES",
    "DRY_RUN_SUFFIX",
    "Experiment",
    "list_experiments",
    "format_list",
    "load",
    "dry_run_config",
    "is_dry_run",
    "run",
]

SCALES = ("paper", "cpu")
_META_KEYS = ("description", "reference", "cost-cpu", "cost-gpu")

#: appended to the config's ``name`` by :func:`dry_run_config`; results.json records it as ``"dry_run": true``
DRY_RUN_SUFFIX = " (dry run)"
#: dry-run limits (see :func:`dry_run_config`)
DRY_RUN = {
    "epochs": 2,
    "spawn_epoch": 1,
    "max_batches_per_epoch": 2,
    "test_samples": 64,
    "train_samples": 64,
    "measure_batch_size": 32,
    "bn_batches": 2,
    "activation_samples": 128,
    "align_batch_size": 64,
    "restarts": 1,
    "max_iter": 5,
    "eval_batch_size": 256,
    "alphas": 5,
}


@dataclass(frozen=True)
class Experiment:
    """One catalogue entry.

    Attributes:
        name: experiment name (the YAML file's stem), e.g. ``cifar10-vgg16-spawn``.
        scale: "paper" or "cpu".
        path: the YAML file.
        description: what is trained and measured.
        reference: the paper's figure / table it reproduces.
        cost_cpu: expected wall time on 2 CPU cores (free text, with how it was estimated).
        cost_gpu: expected wall time on one GPU (free text).
    """

    name: str
    scale: str
    path: Path
    description: str
    reference: str
    cost_cpu: str
    cost_gpu: str


def _config_dir(scale: str) -> Path:
    if scale not in SCALES:
        raise ConfigError(
            f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)} (paper: "
            f"published settings, for a GPU; cpu: reduced, for 2 CPU cores)."
        )
    return Path(str(resources.files("llfc") / "configs" / scale))


def _read_meta(path: Path) -> dict[str, str]:
    meta: dict[str, str] = {}
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("# @") and ":" in s:
            key, _, value = s[3:].partition(":")
            key = key.strip()
            if key in _META_KEYS:
                meta[key] = (meta[key] + " " + value.strip()) if key in meta else value.strip()
    return meta


def list_experiments(scale: str = "cpu") -> list[Experiment]:
    """The experiments of one scale, sorted by name.

    Raises:
        ConfigError: unknown scale.
    """
    folder = _config_dir(scale)
    out = []
    for p in sorted(folder.glob("*.yaml")):
        m = _read_meta(p)
        out.append(
            Experiment(
                p.stem,
                scale,
                p,
                m.get("description", ""),
                m.get("reference", ""),
                m.get("cost-cpu", "unknown"),
                m.get("cost-gpu", "unknown"),
            )
        )
    return out


def format_list(scale: str = "cpu") -> str:
    """A readable table of :func:`list_experiments` (what ``llfc reproduce --list`` prints)."""
    exps = list_experiments(scale)
    other = "cpu" if scale == "paper" else "paper"
    lines = [
        f"llfc reproduce: the paper's experiments, scale '{scale}' "
        f"({'published settings, for one GPU' if scale == 'paper' else 'reduced, for 2 CPU cores'};"
        f" --scale {other} for the other set)",
        "",
    ]
    for e in exps:
        lines.append(e.name)
        lines.append(f"    {e.description}")
        lines.append(f"    reproduces: {e.reference}")
        lines.append(f"    cost: {e.cost_cpu} on 2 CPU cores; {e.cost_gpu} on one GPU")
    lines += [
        "",
        f"run one:  llfc reproduce NAME --scale {scale} [--out DIR] [--data-root DIR] "
        f"[--device auto|cpu|cuda] [--dry-run]",
        "configs:  " + str(_config_dir(scale)),
    ]
    sweeps = [p for p in _config_dir(scale).parent.glob(f"sweep-{scale}/*.yaml")]
    if sweeps:  # populations of pairs (llfc.sweep)
        lines += ["", "sweeps (populations of pairs; run one: llfc sweep NAME [--jobs N] [--out DIR]):"]
        for p in sorted(sweeps):
            m = _read_meta(p)
            lines += [
                f"sweep-{scale}/{p.stem}",
                f"    {m.get('description', '')}",
                f"    cost: {m.get('cost-cpu', 'unknown')} on 2 CPU cores; {m.get('cost-gpu', 'unknown')} on one GPU",
            ]
    return "\n".join(lines)


def load(name: str, scale: str = "cpu") -> ExperimentConfig:
    """The :class:`ExperimentConfig` of experiment ``name`` at ``scale`` (not yet resolved).

    Raises:
        UnknownNameError: no such experiment (the message lists the valid names).
        ConfigError: unknown scale, or an invalid YAML file.
    """
    exps = {e.name: e for e in list_experiments(scale)}
    if name not in exps:
        other = [e.name for e in list_experiments("cpu" if scale == "paper" else "paper")]
        hint = (
            f" ('{name}' exists at scale {'cpu' if scale == 'paper' else 'paper'}: pass "
            f"--scale {'cpu' if scale == 'paper' else 'paper'})"
            if name in other
            else ""
        )
        raise UnknownNameError(
            f"unknown experiment {name!r} at scale {scale!r}{hint}. Valid names: "
            f"{', '.join(sorted(exps))}; `llfc reproduce --list --scale {scale}` describes them."
        )
    return ExperimentConfig.from_yaml(exps[name].path)


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(cfg: ExperimentConfig, overrides: Mapping[str, Any] | None) -> ExperimentConfig:
    """A copy of ``cfg`` with ``overrides`` (a nested dict of config keys, e.g.
    ``{"model_args": {"width": 0.5}, "train": {"epochs": 3}}``) merged in.

    Raises:
        ConfigError: an unknown key.
    """
    if not overrides:
        return cfg
    return ExperimentConfig.from_dict(_merge(cfg.to_dict(), overrides), where="overrides")


def dry_run_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy of ``cfg`` that runs each stage for a few batches only (limits in :data:`DRY_RUN`).

    Training: at most 2 epochs of 2 batches each (``TrainConfig.max_batches_per_epoch``), spawn
    epoch at most 1, warmup shorter than the run, milestones kept (they may then lie beyond the
    end), data loading in the main process. Measurement: the first 64 test samples, a 64-sample
    train subset, 2 batches for a BatchNorm reset, the 5-point α grid (0, 0.25, 0.5, 0.75, 1). Alignment:
    128 samples for activation matching, one weight-matching restart of at most 5 iterations.
    Model, dataset and pair kinds are unchanged; the name gets :data:`DRY_RUN_SUFFIX` (see :func:`is_dry_run`).
    """
    d = DRY_RUN
    c = cfg.resolved()
    t = dict(c.train)
    t["epochs"] = max(1, min(int(t.get("epochs", 1)), d["epochs"]))
    t["max_batches_per_epoch"] = d["max_batches_per_epoch"]
    t["num_workers"] = 0
    t["eval_batch_size"] = min(int(t.get("eval_batch_size", 1000)), d["eval_batch_size"])
    if float(t.get("warmup_epochs", 0) or 0) >= t["epochs"]:
        t["warmup_epochs"] = t["epochs"] / 2 if t.get("schedule_step") == "iteration" else 0
    measure = dataclasses.replace(
        c.measure,
        test_samples=min(c.measure.test_samples or d["test_samples"], d["test_samples"]),
        train_samples=min(c.measure.train_samples, d["train_samples"]),
        batch_size=min(c.measure.batch_size, d["measure_batch_size"]),
        bn_batches=min(c.measure.bn_batches, d["bn_batches"]),
    )
    align = dataclasses.replace(
        c.align,
        activation_samples=min(c.align.activation_samples, d["activation_samples"]),
        batch_size=min(c.align.batch_size, d["align_batch_size"]),
        restarts=min(c.align.restarts, d["restarts"]),
        max_iter=min(c.align.max_iter, d["max_iter"]),
    )
    if c.finetune:  # pair kind finetune: small task subsets, short grids (llfc.finetune.dry_run)
        from llfc.finetune import dry_run

        c = dataclasses.replace(c, finetune=dry_run(c.finetune, d["test_samples"]))
    return dataclasses.replace(
        c,
        name=c.name + DRY_RUN_SUFFIX,
        train=t,
        measure=measure,
        align=align,
        spawn_epoch=min(int(c.spawn_epoch or 0), d["spawn_epoch"], t["epochs"]),
        alphas=d["alphas"],
    )


def is_dry_run(cfg_dict: Mapping[str, Any]) -> bool:
    """Whether a configuration (an :class:`ExperimentConfig` as a plain dict, results.json's ``config``)
    is a dry run, i.e. came from :func:`dry_run_config` (its ``name`` ends in :data:`DRY_RUN_SUFFIX`)."""
    return str(cfg_dict.get("name") or "").endswith(DRY_RUN_SUFFIX)


def run(
    name: str,
    out: str | Path,
    *,
    scale: str = "cpu",
    data_root: str | None = None,
    device: str = "auto",
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run experiment ``name`` at ``scale`` into the folder ``out``.

    Args:
        name, scale: see :func:`list_experiments`.
        out: output folder (see :func:`llfc.experiment.run_experiment`; an unfinished run of the
            same config there is resumed).
        data_root: data folder in torchvision's layout (None: the config's, else
            ``$LLFC_DATA_ROOT`` or ./data).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        dry_run: a few batches of every stage only (:func:`dry_run_config`).
        overwrite: replace results already in ``out``.
        progress: progress bars.
        overrides: nested dict of config keys merged into the config before the dry-run limits,
            e.g. ``{"model_args": {"width": 0.25}}``.
        log: where progress lines go.

    Returns:
        the results dict of :func:`llfc.experiment.run_experiment`.

    Raises:
        UnknownNameError, ConfigError, DataNotFoundError, OutputExistsError (see
        :func:`llfc.experiment.run_experiment`).
    """
    from llfc.experiment import run_experiment

    cfg = apply_overrides(load(name, scale), overrides)
    changes: dict[str, Any] = {"device": device}
    if data_root is not None:
        changes["data_root"] = str(data_root)
    cfg = dataclasses.replace(cfg, **changes)
    if dry_run:
        cfg = dry_run_config(cfg)
        log(
            f"dry run of {name} ({scale}): {cfg.train['epochs']} epoch(s) of "
            f"{cfg.train['max_batches_per_epoch']} batches, {cfg.measure.test_samples} test samples"
        )
    return run_experiment(cfg, out, overwrite=overwrite, progress=progress, log=log)
