"""Seeded training, resumable runs, and the two ways of making a pair of networks.

* :func:`train` trains one model with a :class:`TrainConfig` recipe. Randomness is a function of
  ``(data_seed, epoch)`` only: before epoch ``e`` (0-based: the epoch that takes the run from
  ``e`` to ``e+1`` completed epochs) the data order is ``torch.randperm`` with a generator seeded
  by ``derive_seed(data_seed, "epoch", e)``, and the global generators (augmentation, dropout)
  are reseeded with ``derive_seed(data_seed, "rng", e)``. So an interrupted run resumed from its
  last per-epoch checkpoint gives bit-identical weights, and two runs that share a state at epoch
  ``k`` but use different data seeds differ only in SGD noise after ``k``.
* :func:`independent_pair`: two models, different initialisation and data-order seeds, same
  recipe (the negative control of LMC: no linear connectivity without alignment).
* :func:`spawn_pair`: spawning (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery
  Ticket Hypothesis"; LLFC paper §3 / App. B.1): one model is trained for ``k`` epochs, its full
  training state (weights, optimizer, LR scheduler, RNG, epoch) is saved, and two children load
  it and continue to ``cfg.epochs`` with different data-order seeds on the same, not restarted,
  LR schedule. (The official LLFC code replays the shared prefix instead of forking a saved state;
  forking is exact on any hardware.)

LR schedules are a multiplicative factor f on ``cfg.lr`` (``torch.optim.lr_scheduler.LambdaLR``),
evaluated at t = completed epochs (``schedule_step="epoch"``: the scheduler steps once after each
epoch, the open_lth / LLFC-paper convention) or at t = iterations / iterations-per-epoch
(``schedule_step="iteration"``: steps after every batch, the Git Re-Basin convention):

* constant: f = 1;
* multistep: f = gamma ** #{m in milestones : t >= m} (milestones in epochs; PyTorch MultiStepLR);
* cosine: f = min + (1 − min)·½(1 + cos(π·(t − w)/(E − w))) for t ≥ w (Loshchilov & Hutter 2017),
  with w = warmup_epochs, E = epochs, min = min_lr_factor;
* any schedule with ``warmup_epochs = w > 0`` is multiplied by the linear warmup
  start + (1 − start)·t/w for t < w (start = warmup_start_factor; Goyal et al. 2017).

Outputs in ``out_dir`` (all written atomically): ``last.safetensors/.json`` (full training state,
overwritten every epoch), ``final.safetensors/.json`` (weights at the end of the run),
``<log_name>.csv`` and ``<log_name>.json`` (per-epoch log).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Sized, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from llfc import distributed
from llfc.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    checkpoint_exists,
    checkpoint_paths,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from llfc.data import ArrayDataset
from llfc.errors import ConfigError, DistributedError, NonFiniteWeightsError, OutputExistsError
from llfc.metrics.lmc import as_classification
from llfc.seeding import derive_seed, environment, rng_state, seed_everything, set_deterministic, set_rng_state

__all__ = [
    "TrainConfig",
    "TrainResult",
    "ModelSpec",
    "LRFactor",
    "build_optimizer",
    "build_scheduler",
    "steps_per_epoch",
    "evaluate",
    "train",
    "independent_pair",
    "spawn_pair",
    "LOG_COLUMNS",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "multistep", "cosine")
SCHEDULE_STEPS = ("epoch", "iteration")
# fields that do not change the trained weights (may differ when resuming / spawning)
_NON_RECIPE = ("device", "eval_every", "eval_batch_size", "deterministic")
LOG_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_err", "seconds", "data_seed")


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """A training recipe.

    Attributes:
        epochs: total epochs E of the schedule (a spawned child continues to E).
        batch_size: training batch size (the last, smaller batch of an epoch is kept).
        optimizer: "sgd" (momentum, nesterov, weight_decay as L2 in the gradient), "adam" or
            "adamw" (decoupled weight decay); ``betas`` for the Adam family.
        lr: peak learning rate.
        schedule: "constant", "multistep" (``milestones`` in epochs, factor ``gamma``) or
            "cosine" (to ``min_lr_factor``·lr at E); ``warmup_epochs`` (may be fractional with
            ``schedule_step="iteration"``) of linear warmup from ``warmup_start_factor``·lr.
        schedule_step: "epoch" (scheduler steps after each epoch; the LR is constant within an
            epoch) or "iteration" (after each batch). See the module docstring for formulas.
        label_smoothing: of the training cross-entropy (evaluation uses plain cross-entropy).
        augment: None keeps the training set as built; True/False switches the dataset's
            crop+flip augmentation (``llfc.data.ArrayDataset`` only).
        num_workers: DataLoader workers (worker RNGs are seeded from the data seed and epoch;
            results differ from ``num_workers=0`` when augmentation is on).
        device: "cpu", "cuda", "cuda:1", ... or "auto" (CUDA when available).
        max_batches_per_epoch: cut every epoch after this many batches (dry runs, tests).
        eval_every: evaluate on the test set every this many epochs (and always after the last).
        eval_batch_size: batch size of evaluation.
        deterministic: request deterministic kernels (:func:`llfc.seeding.set_deterministic`).

    Defaults are the paper's CIFAR recipe (SGD, momentum 0.9, lr 0.1, wd 1e-4, batch 128;
    paper-digest §5.4) with a constant schedule.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 1e-3
    min_lr_factor: float = 0.0
    schedule_step: str = "epoch"
    label_smoothing: float = 0.0
    augment: bool | None = None
    num_workers: int = 0
    device: str = "cpu"
    max_batches_per_epoch: int | None = None
    eval_every: int = 1
    eval_batch_size: int = 1000
    deterministic: bool = True

    def __post_init__(self) -> None:
        self.milestones = tuple(int(m) for m in self.milestones)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        problems = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        need(isinstance(self.epochs, int) and self.epochs >= 0, f"epochs must be an int >= 0, got {self.epochs!r}")
        need(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be an int >= 1, got {self.batch_size!r}",
        )
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr!r}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(
            not (self.nesterov and (self.optimizer != "sgd" or self.momentum == 0)),
            "nesterov needs optimizer 'sgd' with momentum > 0",
        )
        need(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas!r}",
        )
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(
            list(self.milestones) == sorted(set(self.milestones)) and all(m > 0 for m in self.milestones),
            f"milestones must be increasing positive epochs, got {list(self.milestones)}",
        )
        need(not (self.schedule == "multistep" and not self.milestones), "schedule 'multistep' needs milestones")
        need(0 < self.gamma <= 1 or self.schedule != "multistep", f"gamma must be in (0, 1], got {self.gamma!r}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        need(
            not (self.schedule == "cosine" and self.epochs > 0 and self.warmup_epochs >= self.epochs),
            f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs}) for the cosine schedule",
        )
        need(
            0 <= self.warmup_start_factor <= 1,
            f"warmup_start_factor must be in [0, 1], got {self.warmup_start_factor!r}",
        )
        need(0 <= self.min_lr_factor <= 1, f"min_lr_factor must be in [0, 1], got {self.min_lr_factor!r}")
        need(
            self.schedule_step in SCHEDULE_STEPS,
            f"schedule_step must be one of {', '.join(SCHEDULE_STEPS)}, got {self.schedule_step!r}",
        )
        need(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        need(self.augment in (None, True, False), f"augment must be null, true or false, got {self.augment!r}")
        need(
            isinstance(self.num_workers, int) and self.num_workers >= 0,
            f"num_workers must be an int >= 0, got {self.num_workers!r}",
        )
        need(
            self.max_batches_per_epoch is None
            or (isinstance(self.max_batches_per_epoch, int) and self.max_batches_per_epoch >= 1),
            f"max_batches_per_epoch must be null or an int >= 1, got {self.max_batches_per_epoch!r}",
        )
        need(
            isinstance(self.eval_every, int) and self.eval_every >= 1,
            f"eval_every must be an int >= 1, got {self.eval_every!r}",
        )
        need(
            isinstance(self.eval_batch_size, int) and self.eval_batch_size >= 1,
            f"eval_batch_size must be an int >= 1, got {self.eval_batch_size!r}",
        )
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a YAML section).

        Raises:
            ConfigError: an unknown key (the message lists the valid keys) or an invalid value.
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown training option(s) {', '.join(map(repr, unknown))}. Valid options: {', '.join(valid)}."
            )
        return cls(**dict(d))

    def recipe(self) -> dict[str, Any]:
        """The fields that determine the trained weights (all but device and evaluation
        options); compared when resuming or spawning."""
        return {k: v for k, v in self.to_dict().items() if k not in _NON_RECIPE}


@dataclass
class ModelSpec:
    """A zero-argument model factory that remembers its registry name and arguments.

    ``ModelSpec("mlp", {"input_shape": (1, 8, 8), "num_classes": 10, "widths": [32]})()``
    returns a fresh model; when passed as ``model_fn`` the name and arguments are written into
    every checkpoint so that :func:`llfc.checkpoint.build_model` can rebuild it.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> nn.Module:
        from llfc.models import create_model

        return create_model(self.name, **self.kwargs)

    def to_meta(self) -> dict[str, Any]:
        """``{"name", "kwargs"}`` with tuples as lists (JSON)."""

        def plain(v):
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {"name": self.name, "kwargs": plain(self.kwargs)}


def _model_meta(model_fn: Any) -> dict[str, Any] | None:
    return model_fn.to_meta() if isinstance(model_fn, ModelSpec) else None


# ----------------------------------------------------------------------------------------------
# optimizer and schedule


class LRFactor:
    """The LR multiplier f(step) of a :class:`TrainConfig` (formulas in the module docstring).

    Callable for ``LambdaLR``; it holds only numbers, so ``LambdaLR.state_dict()`` stays JSON-able.

    Args:
        cfg: the recipe.
        steps_per_epoch: scheduler steps per epoch (1 when ``cfg.schedule_step == "epoch"``).
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int):
        self.schedule = cfg.schedule
        self.epochs = cfg.epochs
        self.milestones = list(cfg.milestones)
        self.gamma = cfg.gamma
        self.warmup_epochs = cfg.warmup_epochs
        self.warmup_start_factor = cfg.warmup_start_factor
        self.min_lr_factor = cfg.min_lr_factor
        self.steps_per_epoch = int(steps_per_epoch)

    def __call__(self, step: int) -> float:
        spe = self.steps_per_epoch
        t = step / spe  # epochs (fractional in iteration mode)
        f = 1.0
        if self.schedule == "multistep":
            f = self.gamma ** sum(1 for m in self.milestones if step >= m * spe)
        elif self.schedule == "cosine":
            w, e = self.warmup_epochs, self.epochs
            p = min(max((t - w) / (e - w), 0.0), 1.0) if e > w else 1.0
            f = self.min_lr_factor + (1 - self.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * p))
        if self.warmup_epochs > 0 and t < self.warmup_epochs:
            s = self.warmup_start_factor
            f *= s + (1 - s) * t / self.warmup_epochs
        return f


def steps_per_epoch(n_samples: int, cfg: TrainConfig) -> int:
    """Batches per epoch: ceil(n / batch_size), capped by ``max_batches_per_epoch``."""
    n = math.ceil(n_samples / cfg.batch_size)
    if cfg.max_batches_per_epoch is not None:
        n = min(n, cfg.max_batches_per_epoch)
    return n


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over all parameters of ``model`` (one param group)."""
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=cast(tuple[float, float], tuple(cfg.betas)), weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, batches_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :class:`LRFactor`; step it once per epoch or once per batch according
    to ``cfg.schedule_step``."""
    spe = batches_per_epoch if cfg.schedule_step == "iteration" else 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(cfg, max(spe, 1)))


# ----------------------------------------------------------------------------------------------
# evaluation


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(device)!r} was requested but CUDA is not available; use device 'cpu' or 'auto'."
        )
    return dev


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, batch_size: int = 1000, device: str | torch.device | None = None
) -> tuple[float, float]:
    """Mean cross-entropy and error rate of ``model`` on ``dataset`` (eval mode, no grad).

    Args:
        model: classifier returning logits (N, num_classes), or a language model returning
            next-token logits (N, T, V) (loss and error are then per token).
        dataset: items (x, y) with int64 labels (or (T,) next-token targets).
        batch_size: evaluation batch size (does not change the result beyond float rounding).
        device: default: the device of the model's first parameter (CPU if it has none).

    Returns:
        (loss, err): loss = (1/N) Σ CE(logits, y) in nats, accumulated in float64; err = fraction
        of samples whose arg-max logit is not the label, in [0, 1]. The model's train/eval mode is
        restored afterwards.
    """
    loss_sum, wrong, n = _evaluate_sums(model, dataset, batch_size, device)
    if n == 0:
        raise ConfigError("cannot evaluate on an empty dataset.")
    return float(loss_sum) / n, int(wrong) / n


@torch.no_grad()
def _evaluate_sums(
    model: nn.Module, dataset: Dataset, batch_size: int, device: str | torch.device | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(Σ cross-entropy float64, wrong-count int64, n) of :func:`evaluate`, kept on the device."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            out, y = as_classification(model(x), y)
            loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
            wrong += (out.argmax(1) != y).sum()
            n += len(y)
    finally:
        model.train(was_training)
    return loss_sum, wrong, n


def _evaluate_all_ranks(
    model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """:func:`evaluate`; under torch.distributed each rank takes its unpadded shard
    (:func:`llfc.distributed.shard_dataset`) and the sums are added over the ranks."""
    if not distributed.is_active():
        return evaluate(model, dataset, batch_size, device)
    loss_sum, wrong, n = distributed.all_reduce_sum(
        _evaluate_sums(model, distributed.shard_dataset(dataset, batch_size), batch_size, device)
    )
    return float(loss_sum) / float(n), float(wrong) / float(n)


# ----------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (on the training device, train mode).
        log: one dict per completed epoch (columns :data:`LOG_COLUMNS`; ``lr`` is the learning
            rate at the start of the epoch; test values are None in epochs without evaluation;
            ``seconds`` is wall-clock time). A spawned child's log starts with its parent's rows.
        epoch: completed epochs.
        optimizer, scheduler: their final states.
        out_dir: output folder or None.
    """

    model: nn.Module
    log: list[dict[str, Any]]
    epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    out_dir: Path | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last log row (empty dict when no epoch was trained)."""
        return self.log[-1] if self.log else {}


def _with_augment(ds: Dataset, augment: bool | None) -> Dataset:
    if augment is None or getattr(ds, "augment", None) == augment:
        return ds
    from llfc.data import ArrayDataset

    if isinstance(ds, ArrayDataset):
        return ds.with_augment(bool(augment))
    raise ConfigError(
        f"augment={augment} was requested but the training set is a {type(ds).__name__}, whose "
        f"augmentation llfc cannot switch; build the dataset with the augmentation you want and "
        f"leave augment unset (null)."
    )


def _write_log(out_dir: Path, name: str, log: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(LOG_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in log:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_COLUMNS})
    atomic_write_text(out_dir / f"{name}.csv", buf.getvalue())
    atomic_write_json(out_dir / f"{name}.json", log)


def _check_recipe(saved: Mapping[str, Any] | None, cfg: TrainConfig, what: str) -> None:
    if saved is None:
        return
    try:
        saved_recipe = TrainConfig.from_dict(saved).recipe()
    except ConfigError:
        saved_recipe = dict(saved)
    diff = sorted(k for k, v in cfg.recipe().items() if saved_recipe.get(k) != v)
    if diff:
        details = ", ".join(f"{k}: {saved_recipe.get(k)!r} there vs {cfg.recipe()[k]!r} now" for k in diff)
        raise ConfigError(
            f"{what} was made with a different training recipe ({details}). Use the same "
            f"configuration, or start a fresh run (another out_dir, or resume=False with "
            f"overwrite=True)."
        )


def train(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset | None,
    cfg: TrainConfig,
    *,
    data_seed: int,
    start_state: str | os.PathLike | None = None,
    stop_epoch: int | None = None,
    out_dir: str | os.PathLike | None = None,
    log_name: str = "log",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    seeds: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    save_at_iterations: Sequence[int] = (),
    stop_iteration: int | None = None,
) -> TrainResult:
    """Train ``model`` with recipe ``cfg``; randomness depends only on ``data_seed`` and epoch.

    Initialise (and seed) the model before calling: see :func:`independent_pair`.

    Args:
        model: the network (moved to ``cfg.device``).
        train_set, test_set: datasets of (float32 image, int64 label); ``test_set`` may be None.
        cfg: the recipe (a dict is accepted and checked with :meth:`TrainConfig.from_dict`).
        data_seed: seed of the data order (``derive_seed(data_seed, "epoch", e)`` for 0-based
            epoch e) and of augmentation/dropout (global RNGs reseeded with
            ``derive_seed(data_seed, "rng", e)`` at the start of epoch e).
        start_state: a training state (:func:`llfc.checkpoint.save_training_state`, e.g. a
            spawn parent's ``parent/last``) to continue from: weights, optimizer, scheduler and
            epoch are loaded; its recipe must equal ``cfg``'s. Its log rows are kept.
        stop_epoch: stop after this many completed epochs (default ``cfg.epochs``); the schedule
            is still that of ``cfg.epochs`` (used for the spawn parent).
        out_dir: where to write ``last`` (full state, every epoch), ``final`` (weights) and the
            log; None writes nothing.
        log_name: file name (no suffix) of the CSV/JSON log.
        resume: continue from ``out_dir/last`` when it exists (same recipe and data seed
            required); the result is bit-identical to an uninterrupted run on the same hardware
            and thread count.
        overwrite: start afresh even though ``out_dir/last`` exists.
        progress: show a tqdm bar (epoch, running loss and accuracy).
        seeds: further seeds to record in the checkpoints (e.g. ``{"init": 0}``);
            ``data`` is added.
        meta: further JSON-able metadata for the checkpoints (``model``: ``{"name", "kwargs"}``
            makes them loadable with :func:`llfc.checkpoint.build_model`; ``dataset``...).
        save_at_iterations: global iteration counts (optimizer steps since the start of the
            schedule) at which the full training state is saved to ``out_dir/iter-<N>`` (spawn
            points of a sweep over k in iterations, :mod:`llfc.sweep`). A state inside an epoch
            records ``batch_in_epoch``; one at an epoch boundary equals ``last`` after that epoch.
        stop_iteration: stop after this many global iterations (may end inside an epoch; that
            partial epoch is not logged). Overrides ``stop_epoch``.

    A start state saved inside epoch e (``batch_in_epoch`` = j > 0) continues epoch e with this
    run's own data order for e, skipping its first j batches (so a child spawned inside an epoch
    takes the remaining spe − j steps of that epoch in its own order).

    Returns:
        :class:`TrainResult`.

    Raises:
        ConfigError: invalid config, stop_epoch out of range, or a resume/start state with
            another recipe (or data seed, for resume).
        OutputExistsError: ``out_dir`` already holds a run and neither resume nor overwrite.
        NonFiniteWeightsError: the training loss became NaN/Inf (diverged).
        CheckpointError / IncompatibleModelsError: unreadable or non-matching start state.
    """
    if isinstance(cfg, Mapping):
        cfg = TrainConfig.from_dict(cfg)
    device = _resolve_device(cfg.device)
    if cfg.deterministic:
        set_deterministic(True)
    stop = cfg.epochs if stop_epoch is None else int(stop_epoch)
    if not 0 <= stop <= cfg.epochs:
        raise ConfigError(f"stop_epoch must be in [0, epochs={cfg.epochs}], got {stop_epoch}.")
    model.to(device)
    train_set = _with_augment(train_set, cfg.augment)
    n = len(cast(Sized, train_set))
    if n == 0:
        raise ConfigError("the training set is empty.")
    spe = steps_per_epoch(n, cfg)
    save_at = sorted({int(i) for i in save_at_iterations})
    if stop_iteration is not None:
        if not 0 <= int(stop_iteration) <= cfg.epochs * spe:
            raise ConfigError(
                f"stop_iteration must be in [0, epochs × steps per epoch = {cfg.epochs * spe}], got {stop_iteration}."
            )
        stop = math.ceil(int(stop_iteration) / spe) if spe else 0
    if save_at and not (0 <= save_at[0] and save_at[-1] <= cfg.epochs * spe):
        raise ConfigError(
            f"save_at_iterations must lie in [0, {cfg.epochs * spe}] (epochs × steps per epoch), got {save_at}."
        )
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, spe)

    base_meta: dict[str, Any] = dict(meta or {})
    base_meta["seeds"] = {**dict(seeds or {}), "data": int(data_seed)}
    base_meta["train_config"] = cfg.to_dict()
    base_meta["environment"] = environment(device)
    world = distributed.world_size() if distributed.is_active() else 1
    if world > 1:
        base_meta["data_parallel"] = {"world_size": world}
        _check_ddp_input(cfg, n, spe, world, data_seed)
    main = distributed.is_main()

    out = Path(out_dir) if out_dir is not None else None
    start, log, resumed, start_batch = _restore(
        model, optimizer, scheduler, cfg, data_seed, out, resume, overwrite, start_state, base_meta, spe
    )
    if start > stop:
        raise ConfigError(f"the run is already at epoch {start}, past stop_epoch {stop}.")

    def state_meta(**extra: Any) -> dict[str, Any]:
        return {**base_meta, "log": log, **extra}

    def save_iteration(it: int, epoch: int, batch: int) -> None:
        """The full training state at global iteration ``it`` (a spawn point of a k-sweep)."""
        if out is not None and main and it in save_at:
            save_training_state(
                out / f"iter-{it}",
                model,
                optimizer,
                scheduler,
                epoch,
                rng_state(),
                state_meta(iteration=it, batch_in_epoch=batch),
            )

    if out is not None and main:  # rank 0 alone writes; the others wait at the barriers
        out.mkdir(parents=True, exist_ok=True)
        if start == 0 and start_batch == 0:
            save_iteration(0, 0, 0)
        if start == stop and not resumed:  # nothing to train (e.g. spawn at k=0): still save
            _save_epoch(out, log_name, model, optimizer, scheduler, start, state_meta(), log)
    distributed.barrier()
    net = _data_parallel(model, device) if world > 1 else model
    progress = progress and main

    from tqdm.auto import tqdm

    who = "/".join(str(v) for v in (base_meta.get("pair"), base_meta.get("member")) if v) or log_name
    bar = tqdm(
        total=(stop - start) * spe,
        desc=f"train {who}",
        disable=None if progress else True,
        dynamic_ncols=True,
        leave=True,
    )
    try:
        for e in range(start, stop):
            t0 = time.perf_counter()
            seed_everything(derive_seed(data_seed, "rng", e))
            skip = start_batch if e == start else 0  # a start state saved inside epoch e
            batches = _epoch_batches(n, cfg, data_seed, e, spe)[skip:]
            if stop_iteration is not None:
                batches = batches[: max(0, int(stop_iteration) - e * spe - skip)]
            global_sizes = [len(b) for b in batches] if world > 1 else None
            if world > 1:
                batches = [_rank_part(b, world, distributed.rank()) for b in batches]
            loader = _epoch_loader(train_set, batches, cfg, data_seed, e, device)
            lr0 = float(optimizer.param_groups[0]["lr"])
            bar_update = _BarUpdate(bar, progress, f"{e + 1}/{stop}", spe)

            def on_batch(i: int, *sums: Any, e: int = e, skip: int = skip, bar_update: _BarUpdate = bar_update) -> None:
                bar_update(i, *sums)
                if skip + i + 1 < spe:
                    save_iteration(e * spe + skip + i + 1, e, skip + i + 1)

            sums = _train_epoch(net, loader, optimizer, scheduler, cfg, device, on_batch, global_sizes)
            if skip + len(batches) < spe:  # stop_iteration inside this epoch: not logged
                break
            if cfg.schedule_step == "epoch":
                scheduler.step()
            if world > 1:
                _sync_buffers(model)
                sums = tuple(distributed.all_reduce_sum(sums))  # type: ignore[assignment]
            row = _epoch_row(e, lr0, sums)
            if test_set is not None and ((e + 1) % cfg.eval_every == 0 or e + 1 == stop):
                tl, te = _evaluate_all_ranks(model, test_set, cfg.eval_batch_size, device)
                row.update(test_loss=tl, test_acc=1.0 - te, test_err=te)
            row["seconds"] = time.perf_counter() - t0
            row["data_seed"] = int(data_seed)
            log.append(row)
            if out is not None and main:
                _save_epoch(out, log_name, model, optimizer, scheduler, e + 1, state_meta(), log)
            save_iteration((e + 1) * spe, e + 1, 0)
            distributed.barrier()
    finally:
        bar.close()

    if stop_iteration is not None:
        stop = min(stop, int(stop_iteration) // spe) if spe else 0

    if out is not None and main:
        final_meta = {k: v for k, v in base_meta.items()}
        final_meta.update(epoch=stop, final=log[-1] if log else None)
        save_checkpoint(out / "final", model.state_dict(), final_meta)
    distributed.barrier()
    return TrainResult(model=model, log=log, epoch=stop, optimizer=optimizer, scheduler=scheduler, out_dir=out)


def _restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    data_seed: int,
    out: Path | None,
    resume: bool,
    overwrite: bool,
    start_state: str | os.PathLike | None,
    base_meta: dict[str, Any],
    spe: int,
) -> tuple[int, list[dict[str, Any]], bool, int]:
    """Where a run starts: ``(epoch, log rows, resumed, batch in epoch)``.

    Loads ``out/last`` (``resume``; same recipe and data seed required, RNG states restored) or
    else ``start_state`` (a spawn fork: same recipe required) into model, optimizer and
    scheduler; records ``spawned_from`` in ``base_meta``. A fresh run starts at (0, [], False, 0).
    A start state saved inside an epoch (``batch_in_epoch`` = j > 0, :func:`train`'s
    ``save_at_iterations``) continues that epoch after its first j batches (``spe`` steps per epoch).

    Raises:
        OutputExistsError: ``out/last`` exists and neither resume nor overwrite.
        ConfigError: another recipe or data seed.
    """
    last = out / "last" if out is not None else None
    if distributed.is_active():  # every rank must load the very same files
        for path, what in ((last, "the training state to resume"), (start_state, "the start state")):
            if path is not None:
                distributed.check_same(
                    [distributed.file_digest(p) for p in checkpoint_paths(path)],
                    f"{what} {path}",
                    "Put the output folder on a file system shared by all ranks.",
                )
    if last is not None and checkpoint_exists(last):
        if resume:
            epoch, rng, smeta = load_training_state(last, model, optimizer, scheduler)
            _check_recipe(smeta.get("train_config"), cfg, f"the run in {out}")
            saved_seed = (smeta.get("seeds") or {}).get("data")
            if saved_seed is not None and int(saved_seed) != int(data_seed):
                raise ConfigError(
                    f"the run in {out} used data_seed {saved_seed}, not {data_seed}; resume with "
                    f"the same seed or start a fresh run."
                )
            if rng is not None:
                set_rng_state(rng)
            if "spawned_from" in smeta:
                base_meta["spawned_from"] = smeta["spawned_from"]
            return epoch, list(smeta.get("log") or []), True, 0
        if not overwrite:
            raise OutputExistsError(
                f"{out} already holds a training run ({last}.safetensors). Pass resume=True to "
                f"continue it, overwrite=True to start afresh, or choose another output folder."
            )
    if start_state is not None:
        epoch, rng, smeta = load_training_state(start_state, model, optimizer, scheduler)
        _check_recipe(smeta.get("train_config"), cfg, f"the start state {start_state}")
        start_batch = int(smeta.get("batch_in_epoch") or 0)
        base_meta["spawned_from"] = {
            "path": os.fspath(start_state),
            "epoch": epoch,
            "iteration": epoch * spe + start_batch,
            "seeds": smeta.get("seeds"),
        }
        return epoch, list(smeta.get("log") or []), False, start_batch
    return 0, [], False, 0


def _epoch_batches(n: int, cfg: TrainConfig, data_seed: int, e: int, spe: int) -> list[list[int]]:
    """The sample indices of every batch of 0-based epoch ``e``: ``torch.randperm(n)`` seeded by
    ``derive_seed(data_seed, "epoch", e)``, cut into ``cfg.batch_size`` pieces, first ``spe``."""
    g = torch.Generator().manual_seed(derive_seed(data_seed, "epoch", e))
    order = torch.randperm(n, generator=g)
    return [b.tolist() for b in order.split(cfg.batch_size)][:spe]


def _epoch_loader(
    train_set: Dataset, batches: list[list[int]], cfg: TrainConfig, data_seed: int, e: int, device: torch.device
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(x, y)`` batches of ``batches``, in order: straight from an in-memory
    :class:`~llfc.data.ArrayDataset` without workers (no per-sample split and re-stack; the same
    tensors, and the same RNG draws, as through a DataLoader), else a DataLoader (worker RNGs
    seeded from data seed and epoch)."""
    if isinstance(train_set, ArrayDataset) and cfg.num_workers == 0:
        return (train_set.batch(b) for b in batches)
    return DataLoader(
        train_set,
        batch_sampler=batches,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(derive_seed(data_seed, "workers", e)),
        pin_memory=device.type == "cuda",
    )


class _BarUpdate:
    """Advances the training progress bar by one batch; shows running loss/accuracy every 20."""

    def __init__(self, bar: Any, progress: bool, epoch_text: str, spe: int):
        self.bar, self.progress, self.epoch_text, self.spe = bar, progress, epoch_text, spe

    def __call__(self, i: int, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        self.bar.update(1)
        if self.progress and (i % 20 == 0 or i == self.spe - 1):
            self.bar.set_postfix(
                epoch=self.epoch_text, loss=f"{float(loss_sum) / seen:.4f}", acc=f"{int(correct) / seen:.4f}"
            )


def _train_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    device: torch.device,
    on_batch: Callable[..., None],
    global_sizes: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One epoch of SGD steps (train mode). Returns ``(loss_sum, correct, seen)``: the float64
    sum over samples of the training loss, the int64 count of correct arg-max predictions
    (both on ``device``, no host sync per batch) and the number of samples.

    Data parallel (``model`` wrapped in DistributedDataParallel, ``global_sizes[i]`` = size of
    the i-th batch over all W ranks): the loss of this rank's part is Σ_local CE · W / |batch|,
    so that DDP's mean of the W gradients is the gradient of the mean loss over the whole batch,
    the gradient of one process up to float rounding."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        per = y[0].numel() if y.dim() > 1 else 1  # targets per sample: 1, or T tokens of a language model
        out_logits, y = as_classification(model(x), y)
        if global_sizes is None:
            loss = F.cross_entropy(out_logits, y, label_smoothing=cfg.label_smoothing)
            batch_loss_sum = loss.detach().double() * len(y)
        else:
            ce = F.cross_entropy(out_logits, y, label_smoothing=cfg.label_smoothing, reduction="sum")
            loss = ce * (distributed.world_size() / (global_sizes[i] * per))
            batch_loss_sum = ce.detach().double()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.schedule_step == "iteration":
            scheduler.step()
        loss_sum += batch_loss_sum
        correct += (out_logits.detach().argmax(1) == y).sum()
        seen += len(y)
        on_batch(i, loss_sum, correct, seen)
    return loss_sum, correct, seen


def _check_ddp_input(cfg: TrainConfig, n: int, spe: int, world: int, data_seed: int) -> None:
    """Refuse a data-parallel run that cannot be exact: ranks with another recipe or seed, or a
    batch with fewer samples than ranks (a rank would get none).

    Raises:
        DistributedError: naming the rank or the batch size to change.
    """
    distributed.check_same(
        {"recipe": cfg.recipe(), "data_seed": int(data_seed), "n": n},
        "the training configuration",
        "Launch every rank with the same command.",
    )
    smallest = min(cfg.batch_size, n - (spe - 1) * cfg.batch_size)
    if smallest < world:
        raise DistributedError(
            f"a training batch of {smallest} sample(s) cannot be split over {world} processes "
            f"(batch_size {cfg.batch_size}, {n} training samples). Use a batch size and a training "
            f"set whose last batch has at least {world} samples, or fewer processes."
        )


def _rank_part(batch: list[int], world: int, rank: int) -> list[int]:
    """Rank ``rank``'s contiguous part of one global batch (no padding, no sample twice)."""
    return batch[rank * len(batch) // world : (rank + 1) * len(batch) // world]


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over the ranks after backward)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None,
    )


def _sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so that evaluation and
    the checkpoint see one model."""
    distributed.broadcast_tensors(list(model.buffers()))


def _epoch_row(e: int, lr0: float, sums: tuple[torch.Tensor, torch.Tensor, int]) -> dict[str, Any]:
    """The log row of 0-based epoch ``e`` from the epoch's sums (test columns left None).

    Raises:
        NonFiniteWeightsError: the mean training loss is NaN/Inf.
    """
    loss_sum, correct, seen = sums
    train_loss = float(loss_sum) / max(seen, 1)
    if not math.isfinite(train_loss):
        raise NonFiniteWeightsError(
            f"training diverged: the mean training loss of epoch {e + 1} is {train_loss} "
            f"(lr {lr0}). Lower the learning rate or add warmup."
        )
    return {
        "epoch": e + 1,
        "lr": lr0,
        "train_loss": train_loss,
        "train_acc": int(correct) / seen,
        "test_loss": None,
        "test_acc": None,
        "test_err": None,
    }


def _save_epoch(
    out: Path,
    log_name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    meta: dict[str, Any],
    log: list[dict[str, Any]],
) -> None:
    """Write the full training state to ``out/last`` and the log, atomically."""
    save_training_state(out / "last", model, optimizer, scheduler, epoch, rng_state(), meta)
    _write_log(out, log_name, log)


# ----------------------------------------------------------------------------------------------
# pairs


def _check_seeds(seeds: Sequence[int], n: int, names: str) -> tuple[int, ...]:
    if len(seeds) != n or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds must be {n} ints ({names}), got {seeds!r}.")
    return tuple(int(s) for s in seeds)


def _init_model(model_fn: Callable[[], nn.Module], init_seed: int) -> nn.Module:
    seed_everything(init_seed)
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model_fn must return an nn.Module, got {type(model).__name__}.")
    return model


def independent_pair(
    model_fn: Callable[[], nn.Module],
    train_set: Dataset,
    test_set: Dataset | None,
    cfg: TrainConfig,
    seeds: Sequence[int] = (0, 1, 2, 3),
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, nn.Module, dict[str, list[dict[str, Any]]]]:
    """Two models of one architecture trained independently with the same recipe.

    Model A: ``seed_everything(init_a)`` then ``model_fn()``, trained with data seed ``data_a``;
    model B likewise with ``init_b``, ``data_b``. Pairs like this are not linearly mode-connected
    (the LMC negative control; Frankle et al. 2020, Entezari et al. 2022) until B is aligned.

    Args:
        model_fn: zero-argument callable returning a fresh model (a :class:`ModelSpec` also
            records the architecture in the checkpoints).
        seeds: (init_a, data_a, init_b, data_b).
        out_dir: runs go to ``out_dir/a`` and ``out_dir/b`` (see :func:`train`).
        resume, overwrite, progress, meta: passed to :func:`train`.

    Returns:
        (model_a, model_b, {"a": log_a, "b": log_b}).
    """
    init_a, data_a, init_b, data_b = _check_seeds(seeds, 4, "init_a, data_a, init_b, data_b")
    if (init_a, data_a) == (init_b, data_b):
        warnings.warn("independent_pair: both models use the same seeds; they will be identical.", stacklevel=2)
    out = Path(out_dir) if out_dir is not None else None
    base = {**({"model": _model_meta(model_fn)} if _model_meta(model_fn) else {}), **dict(meta or {})}
    models, logs = [], {}
    for name, init, data in (("a", init_a, data_a), ("b", init_b, data_b)):
        model = _init_model(model_fn, init)
        res = train(
            model,
            train_set,
            test_set,
            cfg,
            data_seed=data,
            out_dir=None if out is None else out / name,
            log_name="log",
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            seeds={"init": init},
            meta={**base, "pair": "independent", "member": name},
        )
        models.append(res.model)
        logs[name] = res.log
    return models[0], models[1], logs


def spawn_pair(
    model_fn: Callable[[], nn.Module],
    train_set: Dataset,
    test_set: Dataset | None,
    cfg: TrainConfig,
    spawn_epoch: int,
    seeds: Sequence[int] = (0, 1, 2, 3),
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, nn.Module, dict[str, list[dict[str, Any]]]]:
    """Spawning (Frankle et al. 2020; LLFC paper §3, App. B.1): a shared start, then two
    children that differ only in SGD noise.

    The parent (``seed_everything(init)``, ``model_fn()``) is trained for ``k = spawn_epoch``
    epochs of the ``cfg.epochs`` schedule with data seed ``data_parent``; its full state (weights,
    optimizer incl. momentum buffers, LR scheduler, RNG states, epoch) is saved to
    ``out_dir/parent/last``. Each child loads that state and continues to ``cfg.epochs`` with its
    own data seed (data order of epoch e ≥ k from ``derive_seed(data_a, "epoch", e)``) on the same
    schedule, not restarted. ``k = 0``: the children share only the initialisation. ``k =
    cfg.epochs``: both children equal the parent.

    Args:
        model_fn: zero-argument callable returning a fresh model (:class:`ModelSpec` records the
            architecture in the checkpoints).
        spawn_epoch: k in [0, cfg.epochs].
        seeds: (init, data_parent, data_a, data_b).
        out_dir: runs go to ``out_dir/parent``, ``out_dir/a``, ``out_dir/b``; None uses a
            temporary folder for the parent state and writes nothing else.
        resume, overwrite, progress, meta: passed to :func:`train` for all three runs.

    Returns:
        (model_a, model_b, {"parent": log, "a": log, "b": log}); a child's log starts with the
        parent's k rows.

    Raises:
        ConfigError: spawn_epoch outside [0, cfg.epochs] or bad seeds.
    """
    init, data_p, data_a, data_b = _check_seeds(seeds, 4, "init, data_parent, data_a, data_b")
    if isinstance(cfg, Mapping):
        cfg = TrainConfig.from_dict(cfg)
    if isinstance(spawn_epoch, bool) or not isinstance(spawn_epoch, int) or not 0 <= spawn_epoch <= cfg.epochs:
        raise ConfigError(f"spawn_epoch must be an int in [0, epochs={cfg.epochs}], got {spawn_epoch!r}.")
    if data_a == data_b and spawn_epoch < cfg.epochs:
        warnings.warn("spawn_pair: both children use the same data seed; they will be identical.", stacklevel=2)
    base = {**({"model": _model_meta(model_fn)} if _model_meta(model_fn) else {}), **dict(meta or {})}
    base.update(pair="spawn", spawn_epoch=spawn_epoch)
    if out_dir is None and distributed.is_active():
        raise ConfigError(
            "spawn_pair under torch.distributed needs out_dir: the children of every "
            "rank load the parent state that rank 0 writes there."
        )
    tmp = tempfile.TemporaryDirectory(prefix="llfc-spawn-") if out_dir is None else None
    try:
        root = Path(tmp.name if tmp is not None else cast("str | os.PathLike[str]", out_dir))
        parent = _init_model(model_fn, init)
        res_p = train(
            parent,
            train_set,
            test_set,
            cfg,
            data_seed=data_p,
            stop_epoch=spawn_epoch,
            out_dir=root / "parent",
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            seeds={"init": init},
            meta={**base, "member": "parent"},
        )
        state = root / "parent" / "last"
        models, logs = [], {"parent": res_p.log}
        for name, data in (("a", data_a), ("b", data_b)):
            child = _init_model(model_fn, init)  # weights are replaced by the parent's
            res = train(
                child,
                train_set,
                test_set,
                cfg,
                data_seed=data,
                start_state=state,
                out_dir=None if tmp is not None else root / name,
                resume=resume,
                overwrite=overwrite,
                progress=progress,
                seeds={"init": init, "data_parent": data_p},
                meta={**base, "member": name},
            )
            models.append(res.model)
            logs[name] = res.log
    finally:
        if tmp is not None:
            tmp.cleanup()
    return models[0], models[1], logs
