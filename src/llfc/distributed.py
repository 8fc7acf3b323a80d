"""Data-parallel execution under ``torchrun``: exact sharded measurement, DDP training helpers.

llfc folds every statistic into float64 running sums (counts, sums, Chan et al.'s moments), so a
data-parallel pass is exact by construction when

1. every rank measures a *disjoint, unpadded* shard of the data. ``DistributedSampler`` pads the
   last shard with repeated samples, which would change every mean; it is never used. Instead
   :func:`shard_dataset` gives rank r the contiguous block of whole batches
   ``[r·K/W, (r+1)·K/W)`` of the K = ⌈N / batch_size⌉ batches (W = world size). Each rank thus
   sees exactly the batches a single process sees, so the per-sample statistics are
   bit-identical; only the order of the float64 additions across ranks differs.
2. the accumulators are combined once, at the end of the pass (:func:`reduce_accumulators`):
   gathered from every rank and merged in rank order with each accumulator's ``merge`` (plain
   sums add; moments use the pairwise formulas of Chan, Golub & LeVeque 1979). The result equals
   the single-process result up to float64 summation order (relative differences ≤ 1e-12).

A process group is set up by :func:`init_from_env` from the variables ``torchrun`` sets
(``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...); without them llfc runs in one process and every
function here is a no-op (rank 0 of a world of size 1).
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from llfc.errors import DistributedError

__all__ = [
    "Sum",
    "all_reduce_sum",
    "barrier",
    "check_same",
    "file_digest",
    "init_from_env",
    "is_active",
    "is_main",
    "rank",
    "reduce_accumulators",
    "shard_dataset",
    "shard_range",
    "shutdown",
    "world_size",
]

#: seconds a collective waits for the other ranks before failing (env ``LLFC_DIST_TIMEOUT``)
DEFAULT_TIMEOUT_S = 1800


def is_active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the only rank that prints, draws progress bars and writes files."""
    return rank() == 0


def init_from_env(backend: str | None = None, device: str | torch.device = "cpu") -> bool:
    """Join the process group described by torchrun's environment variables.

    Args:
        backend: "gloo" (CPU, also CUDA tensors) or "nccl" (CUDA); default: the environment
            variable ``LLFC_DIST_BACKEND``, else "nccl" for a CUDA ``device``, else "gloo".
        device: the device of the run ("cpu", "cuda", "auto"). With GPUs, each rank's current
            CUDA device becomes ``cuda:LOCAL_RANK``.

    Returns:
        True when a group of more than one process was joined (or already existed); False when
        ``WORLD_SIZE`` is unset or 1 (a plain one-process run).

    Raises:
        DistributedError: torch.distributed or the backend is not available in this build, or
            the rendezvous failed.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise DistributedError(
            "this PyTorch build has no torch.distributed; run llfc without "
            "torchrun (one process), or install a PyTorch build with it."
        )
    dev = (
        torch.device(device) if str(device) != "auto" else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    backend = backend or os.environ.get("LLFC_DIST_BACKEND") or ("nccl" if dev.type == "cuda" else "gloo")
    available = {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(), "mpi": dist.is_mpi_available()}
    if not available.get(backend, False):
        have = ", ".join(k for k, v in available.items() if v) or "none"
        raise DistributedError(
            f"the distributed backend {backend!r} is not available in this PyTorch build "
            f"(available: {have}). Use --device cpu (gloo) or a CUDA build of PyTorch for nccl."
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and local < torch.cuda.device_count():
        torch.cuda.set_device(local)  # "cuda" means this rank's own GPU from here on
    timeout = _dt.timedelta(seconds=float(os.environ.get("LLFC_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"could not join the process group ({e}). Launch with `torchrun --nproc_per_node N -m llfc ...`."
        ) from None
    return dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group (no-op outside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective(fn: Callable[[], Any], what: str) -> Any:
    """Run a collective; a peer that died or timed out becomes a DistributedError."""
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as e:
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed because another rank stopped or did "
            f"not answer ({str(e).splitlines()[0] if str(e) else type(e).__name__}). Nothing of "
            f"this pass was written; see the failing rank's error, fix it and run again."
        ) from None


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_active():
        _collective(dist.barrier, "waiting for the other ranks")


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. a default output folder named by the clock)."""
    if not is_active():
        return value
    box = [value]
    _collective(lambda: dist.broadcast_object_list(box, src=0), "receiving rank 0's value")
    return box[0]


def broadcast_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (no-op outside a process group)."""
    if not is_active():
        return
    for t in tensors:
        _collective(functools.partial(dist.broadcast, t, 0), "receiving rank 0's tensors")


def shard_range(n_samples: int, batch_size: int, world: int | None = None, rank_: int | None = None) -> range:
    """The sample indices of one rank's shard: whole batches, contiguous, disjoint, no padding.

    With K = ⌈n_samples / batch_size⌉ batches, rank r gets batches ⌈r·K/W⌉ … ⌈(r+1)·K/W⌉ − 1,
    i.e. samples ``[⌈r·K/W⌉·bs, min(⌈(r+1)·K/W⌉·bs, N))``. The union over ranks is exactly
    ``range(n_samples)``, the batches are those of a single process, and rank 0 always gets at
    least one batch; with fewer batches than ranks the last ranks get none (they only take part
    in the final all-reduce).

    Raises:
        DistributedError: more ranks than samples.
    """
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    if world > n_samples:
        raise DistributedError(
            f"{world} processes but only {n_samples} sample(s) to measure: use at most "
            f"{n_samples} processes (--nproc_per_node) or more samples."
        )
    k = -(-n_samples // batch_size)
    lo, hi = -(-rank_ * k // world), -(-(rank_ + 1) * k // world)
    return range(min(lo * batch_size, n_samples), min(hi * batch_size, n_samples))


class Max:
    """A mergeable maximum (e.g. a feature dimension that an idle rank never saw)."""

    def __init__(self, total: Any) -> None:
        self.total = total

    def merge(self, other: Max) -> None:
        """Keep the larger value."""
        self.total = max(self.total, other.total)


def shard_dataset(dataset: Dataset, batch_size: int) -> Dataset:
    """This rank's :func:`shard_range` of ``dataset`` (the dataset itself in one process)."""
    if not is_active():
        return dataset
    return Subset(dataset, shard_range(len(dataset), batch_size))  # type: ignore[arg-type]


def file_digest(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file's bytes (None when it does not exist)."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        h = hashlib.sha256()
        for k in sorted(value):
            t = value[k].detach().cpu().contiguous()
            h.update(k.encode())
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()
    return hashlib.sha256(repr(value).encode()).hexdigest()


def check_same(value: Any, what: str, fix: str = "") -> None:
    """Refuse to go on when the ranks disagree on ``value`` (compared by SHA-256).

    ``value`` may be bytes, a str, a state dict (name → tensor; hashed bit for bit) or anything
    with a stable ``repr``. No-op outside a process group.

    Raises:
        DistributedError: naming the first rank whose value differs from rank 0's.
    """
    if not is_active():
        return
    mine = _digest(value)
    digests: list[Any] = [None] * world_size()
    _collective(lambda: dist.all_gather_object(digests, mine), f"comparing {what}")
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise DistributedError(
            f"rank {bad[0]} disagrees with rank 0 on {what} (SHA-256 {digests[bad[0]][:12]} vs "
            f"{digests[0][:12]}). Every rank must see the same {what}. {fix}".rstrip()
        )


def all_reduce_sum(values: Sequence[torch.Tensor | float | int]) -> list[torch.Tensor]:
    """Sum float64 values over the ranks in one collective; returns float64 tensors on the first
    tensor's device (CPU for gloo). Outside a process group, the values as tensors."""
    dev = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    flat = [torch.as_tensor(v, dtype=torch.float64).reshape(-1).to(dev) for v in values]
    sizes = [f.numel() for f in flat]
    buf = torch.cat(flat)
    if is_active():
        comm = buf.cuda() if dist.get_backend() == "nccl" else buf.cpu()
        _collective(lambda: dist.all_reduce(comm), "summing over the ranks")
        buf = comm.to(dev)
    shapes = [torch.as_tensor(v).shape for v in values]
    return [p.reshape(s) for p, s in zip(buf.split(sizes), shapes)]


class Sum:
    """A plain float64 (or int) sum as a mergeable accumulator: ``merge`` adds."""

    def __init__(self, total: Any) -> None:
        self.total = total

    def merge(self, other: Sum) -> None:
        """Add ``other.total``."""
        self.total = self.total + other.total


def _cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    return v


def _to(v: Any, dev: torch.device | None) -> Any:
    if isinstance(v, torch.Tensor) and dev is not None:
        return v.to(dev)
    if isinstance(v, dict):
        return {k: _to(x, dev) for k, x in v.items()}
    return v


def _device_of(obj: Any) -> torch.device | None:
    for v in vars(obj).values():
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def _mergeable(v: Any) -> bool:
    return callable(getattr(type(v), "merge", None)) and hasattr(v, "__dict__")


def _leaves(obj: Any, modules: tuple[str, ...]) -> Iterable[Any]:
    """Mergeable accumulators reachable from ``obj`` through dicts, lists and objects of
    classes defined in ``modules``, in a deterministic (insertion) order."""
    if _mergeable(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v, modules)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v, modules)
    elif hasattr(obj, "__dict__") and type(obj).__module__ in modules:
        for v in vars(obj).values():
            yield from _leaves(v, modules)


def reduce_accumulators(obj: Any, sum_fields: Sequence[str] = (), modules: tuple[str, ...] = ("llfc.engine",)) -> None:
    """Combine ``obj``'s accumulators over all ranks, in place, so that every rank holds the
    totals of the whole data set (no-op outside a process group).

    Walked: every mergeable accumulator (an object with a ``merge(other)`` method, e.g.
    :class:`~llfc.metrics.streaming.RunningMoments`, ``RunningSum``, activation matching's
    ``CrossMoments``) found in ``obj``'s attributes, dicts and lists, recursing into objects of
    classes defined in ``modules``; and the attributes named in ``sum_fields`` (ints, float64
    tensors, or dicts of them), which are summed. One ``all_gather_object`` moves every rank's
    state (as CPU tensors); rank r's state is merged into the running result in rank order
    0, 1, …, W−1, identically on every rank.

    Raises:
        DistributedError: a rank died or the ranks hold differently structured accumulators.
    """
    if not is_active():
        return
    holders: list[tuple[Any, Callable[[Any], None] | None]] = []
    for name in sum_fields:
        val = getattr(obj, name)
        if isinstance(val, dict):
            for k in val:
                holders.append((Sum(val[k]), functools.partial(val.__setitem__, k)))
        else:
            holders.append((Sum(val), functools.partial(setattr, obj, name)))
    skip = {id(getattr(obj, f)) for f in sum_fields}
    attrs = obj if isinstance(obj, (list, tuple, dict)) else {k: v for k, v in vars(obj).items() if id(v) not in skip}
    leaves: list[tuple[Any, Callable[[Any], None] | None]] = [(leaf, None) for leaf in _leaves(attrs, modules)]
    leaves += holders
    states = [(type(leaf).__name__, _cpu(dict(vars(leaf)))) for leaf, _ in leaves]
    gathered: list[Any] = [None] * world_size()
    _collective(lambda: dist.all_gather_object(gathered, states), "gathering the accumulators")
    if any(len(g) != len(states) or [n for n, _ in g] != [n for n, _ in states] for g in gathered):
        raise DistributedError(
            "the ranks hold differently structured accumulators (different "
            "probes, α grids or models); run every rank with the same config."
        )
    for i, (leaf, setter) in enumerate(leaves):
        dev = (
            _device_of(leaf)
            if setter is None
            else (leaf.total.device if isinstance(leaf.total, torch.Tensor) else None)
        )
        merged = copy.copy(leaf)
        merged.__dict__ = dict(gathered[0][i][1])
        for r in range(1, len(gathered)):
            other = copy.copy(leaf)
            other.__dict__ = dict(gathered[r][i][1])
            merged.merge(other)
        leaf.__dict__.update(_to(vars(merged), dev))
        if setter is not None:
            setter(leaf.total)
