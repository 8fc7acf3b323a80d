"""Pair kind ``finetune``: Cross-Task Linearity of children fine-tuned from one pretrained parent
(Zhou, Chen, Chen, Zhang, Yan, ICML 2024, arXiv 2402.03660; "CTL paper").

What is built (CTL paper §4.1 describes Rotated MNIST MLPs and Split CIFAR ResNets; that code was
never released):

* a **parent** θ_0 pretrained on task T0 for k epochs;
* two **children** θ_A, θ_B fine-tuned from θ_0 on tasks T1 and T2, each with its own data;
* the **control**: θ_A as above, and θ_B' fine-tuned on T2 from a *different* parent (another
  initialisation and data order, pretrained on T0 for the same k epochs): CTL should fail there;
* a **sweep** over the pretraining length k: one parent trajectory forked at every k (a constant or
  epoch-stepped schedule over max k epochs), a pair of children per fork.

Tasks (:class:`TaskSpec`): a registered dataset, an optional rotation angle (Rotated MNIST) and an
optional class subset (Split CIFAR-10; labels are renumbered 0..n−1 within the task). MNIST vs
Fashion-MNIST is two tasks over two datasets of one input shape.

**Heads.** When every task has one label space (same dataset and classes: Rotated MNIST) the head is
shared: it is fine-tuned, has a task vector and is interpolated like every other weight, and the logits
are a CTL probe. Otherwise (``heads: own``; Split CIFAR-10, MNIST vs Fashion-MNIST) each child gets a
fresh head for its task (initialised from a seed recorded in its checkpoint), the task vectors and all
merging cover the *backbone* only (everything but the module that produces the logits), CTL is measured
on the backbone's probes (the logits are not compared: they live in different label spaces), and every
merged backbone is evaluated on task i with child i's own fine-tuned head, unmerged, on task i's test
data — the protocol of task-arithmetic papers for CLIP encoders with per-task heads.

**Measurements** (results.json ``pairs.<name>``, see :func:`measure_finetune_pair`), all on the same
probe data: the first ``test_samples`` test images of each child's task, concatenated:

* CTL per probe at every (α, β) of ``points`` (:class:`llfc.metrics.ctl.CTLMeter`, CTL paper Eq. 1):
  distance and coefficient of f_αβ vs α f_A + β f_B, vs f_A, vs f_B; baseline f_A vs f_B;
* task errors of every merged model (each task's test subset);
* task arithmetic (CTL paper §5.2): θ_0 + λ(τ_A + τ_B) = ½(θ_0 + 2λτ_A) + ½(θ_0 + 2λτ_B), so CTL
  predicts f(θ_0 + λ(τ_A+τ_B)) ≈ ½ f(θ_0 + 2λτ_A) + ½ f(θ_0 + 2λτ_B), for λ in ``lambdas``;
* negation (CTL paper §5.2): θ_0 − λτ_A = 2θ_0 − (θ_0 + λτ_A), so CTL predicts
  f(θ_0 − λτ_A) ≈ 2 f(θ_0) − f(θ_0 + λτ_A): (α, β) = (2, −1) with endpoints θ_0 and θ_0 + λτ_A;
* stitching (CTL paper §5.1, "model averaging is feature averaging"): the merged model α θ_A + β θ_B
  with layer ℓ's output replaced by α H_A + β H_B (H the endpoints' layer-ℓ features), the rest of
  the merged model run on top; task errors per ℓ next to the unstitched merged model's.

"CTL holds" uses the LLFC thresholds of :mod:`llfc.criteria` on the points with α + β = 1 and
α ∈ ``criteria.LLFC_ALPHAS`` (hidden layers).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils.data import ConcatDataset, DataLoader

from llfc import criteria
from llfc.checkpoint import atomic_write_json, atomic_write_text, checkpoint_exists, load_checkpoint, save_checkpoint
from llfc.data import ArrayDataset, dataset_info, get_dataset
from llfc.errors import ConfigError
from llfc.metrics.ctl import CTLMeter, check_coefficients, check_points
from llfc.probe import FeatureExtractor
from llfc.reproduce import is_dry_run
from llfc.seeding import derive_seed, environment, seed_everything
from llfc.stitching import stitched_module
from llfc.task_vectors import apply_task_vectors, check_ancestry, combine, fingerprint, split_head, task_vector
from llfc.train import ModelSpec, TrainConfig, evaluate, train

HEAD_MODES = ("auto", "shared", "own")


# ------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class TaskSpec:
    """One task: a dataset, optionally rotated and restricted to some classes.

    Attributes:
        name: unique label (used in paths and results).
        dataset: registered dataset name (:func:`llfc.data.list_datasets`).
        angle: rotation in degrees, counter-clockwise, bilinear (Rotated MNIST; CTL paper §4.1).
        classes: class subset (Split CIFAR-10); labels become their index in this list. None: all.
    """

    name: str
    dataset: str
    angle: float = 0.0
    classes: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TaskSpec:
        """Parse ``{"name", "dataset", "angle", "classes"}``.

        Raises:
            ConfigError: not a mapping, unknown keys, missing name/dataset, bad angle or classes.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: a task is a mapping with keys name, dataset, angle, classes; got {d!r}.")
        bad = sorted(set(d) - {"name", "dataset", "angle", "classes"})
        if bad or "name" not in d or "dataset" not in d:
            raise ConfigError(
                f"{where}: a task needs 'name' and 'dataset' (optional 'angle', 'classes'); got keys {sorted(d)}."
            )
        angle = check_coefficients([d.get("angle", 0.0)], f"{where}: angle")[0]
        info = dataset_info(d["dataset"])
        classes = d.get("classes")
        if classes is not None:
            if (
                not isinstance(classes, (list, tuple))
                or not classes
                or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < info.num_classes for c in classes)
                or len(set(classes)) != len(classes)
            ):
                raise ConfigError(
                    f"{where}: classes must be distinct class indices in [0, {info.num_classes}) "
                    f"of {d['dataset']}, got {classes!r}."
                )
            classes = tuple(int(c) for c in classes)
        return cls(str(d["name"]), str(d["dataset"]), angle, classes)

    @property
    def num_classes(self) -> int:
        """Size of the task's label space."""
        return len(self.classes) if self.classes else dataset_info(self.dataset).num_classes

    def label_space(self) -> tuple:
        """What identifies the label space (dataset and classes): equal spaces can share a head."""
        return (self.dataset, self.classes or tuple(range(self.num_classes)))


@functools.lru_cache(maxsize=4)
def _base_dataset(name: str, split: str, root: str | None) -> ArrayDataset:
    """One load per dataset and split (three tasks often share one dataset); never modified."""
    # fine-tuning tasks are image datasets (get_dataset returns TextDataset only for text ones)
    return cast(ArrayDataset, get_dataset(name, split, root, False))


def task_dataset(task: TaskSpec, split: str, root=None, n: int | None = None, seed: int = 0) -> ArrayDataset:
    """The task's ``split`` as an :class:`llfc.data.ArrayDataset`: class subset (labels renumbered),
    then a seeded random subset of ``n`` samples (all when None; the test split takes the first n),
    then the rotation (torchvision ``rotate``, bilinear, applied once to the uint8 images).

    Raises:
        DataNotFoundError / UnknownNameError: as :func:`llfc.data.get_dataset`.
    """
    base = _base_dataset(task.dataset, split, None if root is None else str(root))
    images, labels = base.images, base.labels
    if task.classes:
        keep = torch.isin(labels, torch.tensor(task.classes))
        images, labels = images[keep], labels[keep]
        remap = torch.full((int(base.labels.max()) + 1,), -1, dtype=torch.long)
        remap[torch.tensor(task.classes)] = torch.arange(len(task.classes))
        labels = remap[labels]
    if n is not None and n < len(labels):
        if split == "train":
            g = torch.Generator().manual_seed(derive_seed(seed, "task", task.name, split))
            idx = torch.randperm(len(labels), generator=g)[:n].sort().values
        else:
            idx = torch.arange(n)
        images, labels = images[idx], labels[idx]
    if task.angle:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2.functional import rotate

        images = rotate(images, task.angle, interpolation=InterpolationMode.BILINEAR)
    info = dataset_info(task.dataset)
    aug = info.augment and split == "train"
    return ArrayDataset(images, labels, info.mean, info.std, augment=aug)


# ------------------------------------------------------------------------------------------ config
@dataclass
class FinetuneConfig:
    """The ``finetune:`` section of an experiment config (pair kind ``finetune``).

    Attributes:
        pretrain: the task T0 of the parent (:class:`TaskSpec` mapping).
        tasks: the two children's tasks T1, T2.
        pretrain_epochs: k, epochs of pretraining of the main pair (and the control).
        sweep: further pretraining lengths to fork the same parent at (each gets a pair of children).
        train: overrides of the training recipe for the children (e.g. fewer epochs, smaller lr);
            the parent uses the experiment's ``train`` recipe with ``epochs = max(k)``.
        heads: "auto" (shared when all tasks have one label space, else own), "shared" or "own".
        control: also build the control pair (children of different parents).
        train_samples, test_samples: per task (None: all).
        points: the (α, β) pairs of the CTL measurement (α + β need not be 1).
        lambdas: λ grid of task arithmetic and negation (finite; signed allowed).
        stitch_points: (α, β) pairs for stitching α H_A + β H_B ([] disables stitching).
    """

    pretrain: dict
    tasks: list
    pretrain_epochs: int = 2
    sweep: list = field(default_factory=list)
    train: dict = field(default_factory=dict)
    heads: str = "auto"
    control: bool = True
    train_samples: int | None = 10000
    test_samples: int | None = 1000
    points: list = field(default_factory=lambda: [[0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [0.5, 0.25], [1.0, 1.0]])
    lambdas: list = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    stitch_points: list = field(default_factory=lambda: [[0.5, 0.5]])

    @classmethod
    def from_dict(cls, d: Any) -> FinetuneConfig:
        """Parse and validate (everything is checked here, before anything is written).

        Raises:
            ConfigError: missing section, unknown keys, two children, duplicate task names, bad
                heads mode, non-finite λ/α/β, negative epochs, input shapes that differ between tasks
                (the children's backbones would not share the parent's architecture).
        """
        if not isinstance(d, dict):
            raise ConfigError(
                "pair kind 'finetune' needs a 'finetune:' section in the config with at least "
                "'pretrain' (task T0) and 'tasks' (two tasks); see configs/cpu/rotmnist-mlp-ctl.yaml."
            )
        valid = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - valid)
        if bad:
            raise ConfigError(f"finetune: unknown key(s) {', '.join(bad)}; valid keys: {', '.join(sorted(valid))}.")
        for req in ("pretrain", "tasks"):
            if req not in d:
                raise ConfigError(f"finetune: '{req}' is required.")
        c = cls(**d)
        pre = TaskSpec.from_dict(c.pretrain, "finetune.pretrain")
        if not isinstance(c.tasks, list) or len(c.tasks) != 2:
            raise ConfigError(f"finetune.tasks must list exactly two tasks (T1, T2), got {c.tasks!r}.")
        kids = [TaskSpec.from_dict(t, f"finetune.tasks[{i}]") for i, t in enumerate(c.tasks)]
        names = [pre.name] + [t.name for t in kids]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(
                f"finetune: task names must be distinct (they name folders and results); "
                f"{', '.join(map(repr, dup))} is used more than once. Rename the tasks."
            )
        shapes = {t.name: dataset_info(t.dataset).input_shape for t in [pre, *kids]}
        if len(set(shapes.values())) > 1:
            raise ConfigError(
                f"finetune: the tasks' inputs differ in shape ({shapes}); children must share the "
                f"parent's backbone, so every task needs one input shape."
            )
        if c.heads not in HEAD_MODES:
            raise ConfigError(f"finetune.heads must be one of {', '.join(HEAD_MODES)}, got {c.heads!r}.")
        spaces = {t.label_space() for t in [pre, *kids]}
        if c.heads == "shared" and len(spaces) > 1:
            raise ConfigError(
                "finetune.heads is 'shared' but the tasks have different label spaces (datasets or "
                "classes); use heads: own (or auto)."
            )
        for k in [c.pretrain_epochs, *c.sweep]:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ConfigError(f"finetune.pretrain_epochs and sweep must be whole numbers ≥ 0, got {k!r}.")
        for key in ("train_samples", "test_samples"):
            v = getattr(c, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"finetune.{key} must be a whole number ≥ 1 or null, got {v!r}.")
        c.points = [list(p) for p in check_points(c.points, "finetune.points")]
        c.lambdas = check_coefficients(c.lambdas, "finetune.lambdas")
        c.stitch_points = (
            [list(p) for p in check_points(c.stitch_points, "finetune.stitch_points")] if c.stitch_points else []
        )
        if not isinstance(c.train, dict):
            raise ConfigError("finetune.train must be a mapping of training options.")
        c._tasks = (pre, *kids)  # type: ignore[attr-defined]
        return c

    @property
    def task_specs(self) -> tuple[TaskSpec, TaskSpec, TaskSpec]:
        """(T0, T1, T2)."""
        return self._tasks  # type: ignore[attr-defined]

    @property
    def shared_head(self) -> bool:
        """Whether the head is shared (see the module docstring)."""
        if self.heads != "auto":
            return self.heads == "shared"
        return len({t.label_space() for t in self.task_specs}) == 1

    def ks(self) -> list[int]:
        """Pretraining lengths, sorted, the main one included."""
        return sorted({self.pretrain_epochs, *self.sweep})


def dry_run(ft: dict, n: int = 64) -> dict:
    """A copy of a ``finetune:`` section for a dry run (:func:`llfc.reproduce.dry_run_config`): at most
    ``n`` train and test samples per task, pretraining of at most 1 epoch (no sweep), child epochs at
    most 1, two λ values. Tasks, heads and points are unchanged."""
    d = dict(ft)
    d["train_samples"] = min(d.get("train_samples") or n, n)
    d["test_samples"] = min(d.get("test_samples") or n, n)
    d["pretrain_epochs"] = min(int(d.get("pretrain_epochs", 1)), 1)
    d["sweep"] = []
    d["train"] = {**dict(d.get("train") or {}), "epochs": 1}
    d["lambdas"] = list(d.get("lambdas") or [0.5, 1.0])[:2]
    return d


# ------------------------------------------------------------------------------------------ training
def _sd(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def head_module(model: nn.Module) -> str:
    """Module path of the layer that produces the logits (the head), e.g. ``layers.6`` of the MLP.

    Raises:
        ConfigError: the logits are not produced by a module with parameters.
    """
    p = next(p for p in FeatureExtractor(model, kinds=["logits"]).probes if p.kind == "logits")
    if p.module is None:
        raise ConfigError(
            f"{type(model).__name__}'s logits are not produced by a module (a Linear layer), so "
            f"llfc cannot tell its head; use heads: shared with one label space."
        )
    return p.module


class FinetuneRunner:
    """Trains parents and children of one ``finetune`` experiment (resumable: every run is a
    :func:`llfc.train.train` run with its own ``last`` checkpoint under ``root``).

    Args:
        spec_for: task → :class:`llfc.train.ModelSpec` (one head size per task).
        ft: the validated :class:`FinetuneConfig`.
        parent_cfg, child_cfg: training recipes of the parents and the children.
        data: task name → (train set, test set).
        root: folder of the checkpoints (``pairs/finetune``).
        seed: master seed (every other seed derived from it with :func:`llfc.seeding.derive_seed`).
        mode: "new", "resume" or "overwrite" (:func:`llfc.experiment.prepare_out_dir`).
    """

    def __init__(
        self,
        spec_for,
        ft: FinetuneConfig,
        parent_cfg: TrainConfig,
        child_cfg: TrainConfig,
        data: dict,
        root: Path,
        seed: int,
        mode: str,
        progress: bool,
        meta: dict,
        log: Callable[[str], None] = print,
    ):
        self.spec_for, self.ft, self.pcfg, self.ccfg = spec_for, ft, parent_cfg, child_cfg
        self.data, self.root, self.seed, self.mode = data, Path(root), seed, mode
        self.progress, self.meta, self.log = progress, meta, log
        self.t0, self.t1, self.t2 = ft.task_specs
        self.head = None if ft.shared_head else head_module(spec_for(self.t0)())

    def seeds(self, who: str) -> dict:
        """The seeds of parent "main"/"control" or child runs (recorded in results and checkpoints)."""
        return {t: derive_seed(self.seed, "finetune", who, t) for t in ("init", "data", "head")}

    def parents(self, which: str, ks: Sequence[int]) -> dict[int, dict]:
        """Pretrain parent ``which`` on T0 and fork its state at every k in ``ks``; returns k → θ_0."""
        s = self.seeds(which)
        pdir = self.root / f"parent-{which}"
        out, first = {}, True
        for k in sorted(ks):
            fork = pdir / f"epoch{k}"
            if checkpoint_exists(fork) and self.mode == "resume":
                out[k] = load_checkpoint(fork)[0]
                first = False
                continue
            seed_everything(s["init"])
            model = self.spec_for(self.t0)()
            tr, te = self.data[self.t0.name]
            train(
                model,
                tr,
                te,
                self.pcfg,
                data_seed=s["data"],
                stop_epoch=k,
                out_dir=pdir / "run",
                resume=not first or self.mode == "resume",
                overwrite=first and self.mode == "overwrite",
                progress=self.progress,
                seeds={"init": s["init"]},
                meta={**self.meta, "member": f"parent-{which}", "task": self.t0.name},
            )
            first = False
            out[k] = _sd(model)
            save_checkpoint(
                fork,
                out[k],
                {**self.meta, "member": f"parent-{which}", "task": self.t0.name, "pretrain_epochs": k, "seeds": s},
            )
        return out

    def child(self, theta0: dict, task: TaskSpec, where: str) -> tuple[dict, list, dict]:
        """Fine-tune a copy of θ_0 on ``task`` into ``root/where``; returns (state, log, meta).

        With own heads the child gets a fresh head for its task (seed recorded as ``seeds.head``).
        The child's checkpoints record ``parent_fingerprint`` (:func:`llfc.task_vectors.fingerprint` of
        θ_0's backbone) for :func:`llfc.task_vectors.check_ancestry`.
        """
        s = self.seeds(where)
        seed_everything(s["head"])
        model = self.spec_for(task)()
        bb0, head0 = split_head(theta0, self.head)
        model.load_state_dict({**_sd(model), **bb0, **head0} if self.head is None else {**_sd(model), **bb0})
        fp = fingerprint(bb0)
        tr, te = self.data[task.name]
        res = train(
            model,
            tr,
            te,
            self.ccfg,
            data_seed=s["data"],
            out_dir=self.root / where,
            resume=self.mode == "resume",
            overwrite=self.mode == "overwrite",
            progress=self.progress,
            seeds={"head": s["head"]},
            meta={**self.meta, "member": where, "task": task.name, "parent_fingerprint": fp},
        )
        return _sd(res.model), res.log, {"parent_fingerprint": fp, "seeds": s}


# ------------------------------------------------------------------------------------------ measuring
def _inputs(loader):
    for x, _y in loader:
        yield x


class _Evaluator:
    """Task errors of (possibly merged) backbones with each task's head (see the module docstring)."""

    def __init__(
        self, spec_for, tasks: Sequence[TaskSpec], data: dict, head: str | None, heads: dict, batch_size: int, device
    ):
        self.models = {t.name: spec_for(t)() for t in tasks}
        self.tasks, self.data, self.head, self.heads = list(tasks), data, head, heads
        self.bs, self.device = batch_size, device

    def state(self, sd: dict, task: str) -> dict:
        """The full state of ``task``'s model: ``sd`` (merged) with ``task``'s own head (own heads)."""
        if self.head is None:
            return sd
        return {**split_head(sd, self.head)[0], **self.heads[task]}

    def errors(self, sd: dict) -> dict[str, float]:
        """Test error (fraction) per task of the model ``sd``."""
        out = {}
        for t in self.tasks:
            m = self.models[t.name]
            m.load_state_dict(self.state(sd, t.name))
            out[t.name] = evaluate(m.to(self.device), self.data[t.name][1], self.bs, self.device)[1]
        return out


def _invalid(states: dict) -> str | None:
    """The first reason (:func:`llfc.task_vectors.invalid_state`) why one of ``states`` is no valid network."""
    from llfc.task_vectors import invalid_state

    for name, sd in states.items():
        why = invalid_state(sd)
        if why:
            return f"{name}: {why}"
    return None


def _ctl_probe_names(extractor: FeatureExtractor, shared_head: bool) -> list[str]:
    return [p.name for p in extractor.probes if p.kind != "logits" or shared_head]


def _run_meter(meter: CTLMeter, loader, device) -> list[dict]:
    for x in _inputs(loader):
        meter.update(x.to(device))
    return meter.compute()


@torch.no_grad()
def stitch_errors(
    spec_for,
    tasks: Sequence[TaskSpec],
    data: dict,
    ev: _Evaluator,
    sd_a: dict,
    sd_b: dict,
    alpha: float,
    beta: float,
    probes: Sequence[str],
    batch_size: int,
    device,
) -> list[dict]:
    """CTL stitching (CTL paper §5.1): merged model α θ_A + β θ_B (backbones, with own heads) with
    layer ℓ's output replaced by α H_A + β H_B, for every probe ℓ in ``probes``; one row per layer
    plus a first row ``merged`` (no stitching), each ``{"layer", "errors": {task: fraction}}`` on
    each task's test subset.

    A and B are evaluated with the task's head (own heads: the task's child's head; the features
    H_A, H_B of backbone layers do not depend on it).
    """
    merged = combine([sd_a, sd_b], [alpha, beta])
    me = ev.errors(merged)
    rows = [{"layer": "merged", "errors": {t.name: me[t.name] for t in tasks}}]
    per_layer: dict[str, dict[str, float]] = {n: {} for n in probes}
    for t in tasks:
        model = spec_for(t)()
        ex = FeatureExtractor(model, names=list(probes))
        from llfc.probe import _trace

        plain = _trace(model)
        nodes = {p.name: p.node for p in ex.probes}
        mods = {n: stitched_module(plain, nodes[n]) for n in probes}
        sa, sb, sm = (ev.state(s, t.name) for s in (sd_a, sd_b, merged))
        sa, sb, sm = ({k: v.to(device) for k, v in s.items()} for s in (sa, sb, sm))
        wrong = {n: 0 for n in probes}
        n_seen = 0
        for x, y in DataLoader(data[t.name][1], batch_size=batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            fa, fb = ex(sa, x), ex(sb, x)
            for n in probes:
                h = alpha * fa[nodes[n]] + beta * fb[nodes[n]]
                wrong[n] += int((functional_call(mods[n], sm, (x, h)).argmax(1) != y).sum())
            n_seen += len(y)
        for n in probes:
            per_layer[n][t.name] = wrong[n] / n_seen
    return rows + [{"layer": n, "errors": per_layer[n]} for n in probes]


def measure_finetune_pair(
    spec_for,
    tasks: Sequence[TaskSpec],
    data: dict,
    theta0: dict | None,
    sd_a: dict,
    sd_b: dict,
    ft: FinetuneConfig,
    head: str | None,
    *,
    kinds: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    absolute: bool = False,
    recorded: dict | None = None,
) -> dict:
    """All CTL measurements of one pair of children (module docstring).

    Args:
        spec_for: task → ModelSpec. tasks: (T0, T1, T2). data: task name → (train, test) datasets.
        theta0: the common parent (None for the control: no task arithmetic or negation then).
        sd_a, sd_b: the children (full state dicts, own heads included).
        ft: the :class:`FinetuneConfig` (points, lambdas, stitch_points).
        head: the head's module path when heads are own, else None.
        kinds: probe kinds (None: all).
        recorded: child task name → parent fingerprint recorded in its checkpoint (for
            :func:`llfc.task_vectors.check_ancestry`; None: the distance heuristic only).

    Warns (UserWarning) when θ_0 does not look like the children's parent (:func:`check_ancestry`).

    Raises:
        IncompatibleModelsError: a child whose backbone does not share θ_0's (or the other child's)
            architecture. NonFiniteWeightsError: NaN/Inf in a state dict.

    Returns:
        ``{"points", "ctl": [per probe], "errors": {"A", "B", "parent", "points": [...]},
        "arithmetic": [...], "negation": [...], "stitching": [...], "n_probe_samples"}``; see
        docs/results-ctl.md.
    """
    from llfc.checkpoint import check_finite
    from llfc.task_vectors import check_same_backbone

    t0, t1, t2 = tasks
    dev = torch.device(device)
    for nm, sd in (("child A", sd_a), ("child B", sd_b), ("the parent", theta0)):
        if sd is not None:
            check_finite(sd, nm)
    check_same_backbone(split_head(sd_a, head)[0], split_head(sd_b, head)[0], "child B", "child A")
    if theta0 is not None:
        check_ancestry(
            split_head(theta0, head)[0],
            {t1.name: split_head(sd_a, head)[0], t2.name: split_head(sd_b, head)[0]},
            recorded,
        )
    heads = {}
    if head is not None:
        heads = {t1.name: split_head(sd_a, head)[1], t2.name: split_head(sd_b, head)[1]}
        if theta0 is not None:
            heads[t0.name] = split_head(theta0, head)[1]
    # features: model of T1; with own heads every state gets A's head as a placeholder (the logits are
    # not compared, and backbone features do not depend on the head)
    ex = FeatureExtractor(spec_for(t1)(), kinds=kinds)
    names = _ctl_probe_names(ex, head is None)
    if not names:
        raise ConfigError(
            "no probe to measure CTL on: with own heads the logits are not compared; "
            "include hidden probe kinds (pre, post, ...) in measure.kinds."
        )

    def feat_state(sd):
        if head is None:
            return {k: v.to(dev) for k, v in sd.items()}
        return {k: v.to(dev) for k, v in {**split_head(sd, head)[0], **heads[t1.name]}.items()}

    probe_data: ConcatDataset = ConcatDataset([data[t1.name][1], data[t2.name][1]])
    loader = DataLoader(probe_data, batch_size=batch_size, shuffle=False)
    A, B = feat_state(sd_a), feat_state(sd_b)
    points = check_points(ft.points)
    res: dict[str, Any] = {"points": [list(p) for p in points], "n_probe_samples": len(probe_data)}
    res["ctl"] = _run_meter(CTLMeter(ex, A, B, points, names, absolute=absolute), loader, dev)
    eval_tasks = [t1, t2] + ([t0] if theta0 is not None and (head is None or t0.name in heads) else [])
    ev = _Evaluator(spec_for, eval_tasks, data, head, heads, batch_size, dev)
    bb_a, bb_b = split_head(sd_a, head)[0], split_head(sd_b, head)[0]  # own heads: merge backbones only
    res["errors"] = {
        "A": ev.errors(sd_a),
        "B": ev.errors(sd_b),
        "points": [ev.errors(combine([bb_a, bb_b], list(p))) for p in points],
    }
    res["invalid_points"] = [_invalid({f"{p[0]:g}·θ_A + {p[1]:g}·θ_B": combine([bb_a, bb_b], list(p))}) for p in points]
    if theta0 is not None:
        res["errors"]["parent"] = ev.errors(theta0)
        bb0 = split_head(theta0, head)[0]
        tau_a, tau_b = task_vector(bb_a, bb0), task_vector(bb_b, bb0)
        P = feat_state(theta0)
        arith, neg = [], []
        for lam in ft.lambdas:
            ea = apply_task_vectors(bb0, [tau_a], [2 * lam])
            eb = apply_task_vectors(bb0, [tau_b], [2 * lam])
            merged = apply_task_vectors(bb0, [tau_a, tau_b], [lam, lam])
            bad = _invalid({"θ_0 + 2λτ_A": ea, "θ_0 + 2λτ_B": eb, "θ_0 + λ(τ_A + τ_B)": merged})
            if bad:
                arith.append({"lambda": lam, "invalid": bad})
            else:
                m = CTLMeter(ex, feat_state(ea), feat_state(eb), [(0.5, 0.5)], names, absolute=absolute)
                arith.append({"lambda": lam, "ctl": _run_meter(m, loader, dev), "errors": ev.errors(merged)})
            plus = apply_task_vectors(bb0, [tau_a], [lam])
            minus = apply_task_vectors(bb0, [tau_a], [-lam])
            bad = _invalid({"θ_0 + λτ_A": plus, "θ_0 − λτ_A": minus})
            if bad:
                neg.append({"lambda": lam, "invalid": bad})
                continue
            m = CTLMeter(ex, P, feat_state(plus), [(2.0, -1.0)], names, states=[feat_state(minus)], absolute=absolute)
            neg.append({"lambda": lam, "ctl": _run_meter(m, loader, dev), "errors": ev.errors(minus)})
        res["arithmetic"], res["negation"] = arith, neg
    if ft.stitch_points:
        hidden = [n for n in names if n != "logits"]
        res["stitching"] = [
            {
                "point": list(p),
                "rows": stitch_errors(spec_for, [t1, t2], data, ev, bb_a, bb_b, p[0], p[1], hidden, batch_size, dev),
            }
            for p in ft.stitch_points
        ]
    return res


# ------------------------------------------------------------------------------------------ verdicts
def llfc_view(pair: dict) -> dict:
    """The pair's convex points (α + β = 1) in the shape :mod:`llfc.criteria` reads (``alphas``,
    ``llfc[*].distance.mean``, ``baseline.mean``), so CTL is judged by the LLFC thresholds."""
    idx = [i for i, (a, b) in enumerate(pair["points"]) if abs(a + b - 1) < 1e-9]
    return {
        "alphas": [pair["points"][i][0] for i in idx],
        "llfc": [
            {
                "name": ly["name"],
                "kind": ly["kind"],
                "baseline": {"mean": ly["baseline"]["distance"]["mean"]},
                "distance": {"mean": [ly["target"]["distance"]["mean"][i] for i in idx]},
            }
            for ly in pair["ctl"]
        ],
    }


def ctl_verdict(pair: dict) -> dict:
    """``{"holds": bool | None, "worst": criteria.worst_layer(...)}`` of one measured pair."""
    v = llfc_view(pair)
    return {"holds": criteria.llfc_holds(v), "worst": criteria.worst_layer(v)}


# ------------------------------------------------------------------------------------------ driver
def run_finetune(
    cfg, out: Path, mode: str, device: torch.device, *, progress: bool = True, log: Callable[[str], None] = print
) -> dict:
    """Execute an experiment whose ``pairs`` is ``[finetune]`` (called by
    :func:`llfc.experiment.run_experiment` after its output-folder checks).

    Writes ``config.yaml``, ``environment.json``, ``pairs/finetune/...`` (checkpoints, logs),
    ``results.json``, ``ctl.csv``, figures ``ctl_layers.png``, ``ctl_arithmetic.png``,
    ``ctl_negation.png``, ``ctl_stitching.png``, ``ctl_sweep.png`` (when swept) and ``summary.txt``.

    Raises:
        ConfigError and other LLFCError subclasses, before anything is written.
    """
    from llfc import __version__
    from llfc.report.ctl import plot_ctl, summary_ctl, write_ctl_table

    ft = FinetuneConfig.from_dict(cfg.finetune)
    t0, t1, t2 = ft.task_specs
    ks = ft.ks()
    data = {
        t.name: (
            task_dataset(t, "train", cfg.data_root, ft.train_samples, cfg.seed),
            task_dataset(t, "test", cfg.data_root, ft.test_samples, cfg.seed),
        )
        for t in ft.task_specs
    }
    shape = list(dataset_info(t0.dataset).input_shape)

    def spec_for(t: TaskSpec) -> ModelSpec:
        return ModelSpec(cfg.model, {"input_shape": shape, "num_classes": t.num_classes, **cfg.model_args})

    pcfg = TrainConfig.from_dict({**cfg.train, "epochs": max(ks), "device": str(device)})
    ccfg = TrainConfig.from_dict({**cfg.train, **ft.train, "device": str(device)})
    spec_for(t0)()  # the architecture builds
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    env = environment(device)
    atomic_write_json(out / "environment.json", env)
    runner = FinetuneRunner(
        spec_for,
        ft,
        pcfg,
        ccfg,
        data,
        out / "pairs" / "finetune",
        cfg.seed,
        mode,
        progress,
        {"model": spec_for(t0).to_meta(), "llfc_version": __version__},
        log,
    )
    head = runner.head
    log(
        f"llfc {__version__}: finetune pair, parent on {t0.name}, children on {t1.name} / {t2.name} "
        f"({ft.train_samples} train / {ft.test_samples} test per task), model {cfg.model} {cfg.model_args}, "
        f"heads {'shared' if head is None else 'own (' + head + ')'}, pretraining {ks} epoch(s), device {device}"
    )
    results: dict[str, Any] = {
        "schema_version": 1,
        "kind": "llfc.finetune",
        "llfc_version": __version__,
        "dry_run": is_dry_run(cfg.to_dict()),
        "environment": env,
        "config": cfg.to_dict(),
        "heads": "shared" if head is None else "own",
        "head_module": head,
        "tasks": [dataclasses.asdict(t) for t in ft.task_specs],
        "pairs": {},
    }
    log(f"[parent] pretraining on {t0.name}, forks at epochs {ks}")
    parents = runner.parents("main", ks)
    children: dict[int, dict] = {}
    kw = dict(
        kinds=cfg.measure.kinds, batch_size=cfg.measure.batch_size, device=device, absolute=cfg.measure.absolute_cos
    )
    for k in ks:
        name = f"finetune-k{k}"
        log(f"[{name}] fine-tuning children on {t1.name} and {t2.name} from the parent at epoch {k}")
        sa, log_a, ma = runner.child(parents[k], t1, f"k{k}-{t1.name}")
        sb, log_b, mb = runner.child(parents[k], t2, f"k{k}-{t2.name}")
        children[k] = sa
        t_start = time.perf_counter()
        pr = measure_finetune_pair(
            spec_for,
            ft.task_specs,
            data,
            parents[k],
            sa,
            sb,
            ft,
            head,
            **kw,
            recorded={t1.name: ma["parent_fingerprint"], t2.name: mb["parent_fingerprint"]},
        )
        pr.update(
            kind="finetune",
            label=f"fine-tuned from one parent (pretrained {k} epoch(s))",
            pretrain_epochs=k,
            main=k == ft.pretrain_epochs,
            seconds=time.perf_counter() - t_start,
            train_logs={"a": log_a, "b": log_b},
            seeds={"a": ma["seeds"], "b": mb["seeds"], "parent": runner.seeds("main")},
        )
        pr["verdict"] = ctl_verdict(pr)
        results["pairs"][name] = pr
    if ft.control:
        k = ft.pretrain_epochs
        log(f"[control] a second parent (other seeds), pretrained {k} epoch(s); its child on {t2.name}")
        other = runner.parents("control", [k])[k]
        sa = children[k]
        sb, log_b, mb = runner.child(other, t2, f"control-k{k}-{t2.name}")
        pr = measure_finetune_pair(spec_for, ft.task_specs, data, None, sa, sb, ft, head, **kw)
        pr.update(
            kind="finetune-control",
            label=f"control: children of different parents (pretrained {k} epoch(s))",
            pretrain_epochs=k,
            train_logs={"b": log_b},
            seeds={"b": mb["seeds"], "parent": runner.seeds("control")},
        )
        pr["verdict"] = ctl_verdict(pr)
        results["pairs"]["control"] = pr
    atomic_write_json(out / "results.json", results)
    write_ctl_table(results, out)
    plot_ctl(results, out)
    text = summary_ctl(results)
    atomic_write_text(out / "summary.txt", text + "\n")
    from llfc.report.html import render_run_report

    render_run_report(out)
    log("\n" + text)
    log(f"\nresults, tables and figures in {out}")
    return results
