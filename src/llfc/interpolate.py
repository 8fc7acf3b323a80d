"""The linear path between two state dicts, θ_α = α·θ_A + (1−α)·θ_B (α weights A; LLFC paper §2).

Also the checks that make a pair measurable (same keys, shapes, dtypes; finite values) and the
two BatchNorm modes along the path (``bn_mode``, ``--bn-mode``):

* ``interpolate``: running statistics are interpolated like weights (the official LLFC code);
* ``reset``: the running statistics of every interior θ_α (0 < α < 1) are recomputed on training
  batches before measuring (Jordan et al. 2023, REPAIR, show this matters); the endpoints keep
  the statistics they were trained with.

Integer buffers (``num_batches_tracked``) are never interpolated: θ_α takes A's value.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from llfc.errors import ConfigError, IncompatibleModelsError

StateDict = dict[str, torch.Tensor]
BN_MODES = ("interpolate", "reset")
MAX_ALPHAS = 1001  # one forward pass per α per batch: a larger grid is a typo, not an experiment
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def check_compatible(sd_a: StateDict, sd_b: StateDict, names: tuple[str, str] = ("A", "B")) -> None:
    """Raise :class:`IncompatibleModelsError` unless both state dicts have the same keys, and
    each key the same shape and dtype. The message names the first difference."""
    a, b = names
    missing_b = [k for k in sd_a if k not in sd_b]
    missing_a = [k for k in sd_b if k not in sd_a]
    if missing_a or missing_b:
        k, where, other = (missing_b[0], b, a) if missing_b else (missing_a[0], a, b)
        raise IncompatibleModelsError(
            f"models {a} and {b} are not the same architecture: parameter {k!r} of {other} is "
            f"missing from {where} ({len(missing_a) + len(missing_b)} keys differ). Pair two "
            f"checkpoints of the same architecture and arguments."
        )
    for k in sd_a:
        ta, tb = sd_a[k], sd_b[k]
        if ta.shape != tb.shape:
            raise IncompatibleModelsError(
                f"models {a} and {b} differ in shape at parameter {k!r}: {tuple(ta.shape)} vs "
                f"{tuple(tb.shape)}. They were built with different architecture arguments "
                f"(e.g. widths); pair two checkpoints of the same architecture and arguments."
            )
        if ta.dtype != tb.dtype:
            raise IncompatibleModelsError(
                f"models {a} and {b} differ in dtype at parameter {k!r}: {ta.dtype} vs {tb.dtype}."
                f" Convert both to one dtype first."
            )


def floating_dtype(sd: StateDict) -> torch.dtype | None:
    """The dtype the networks of ``sd`` run in: the one dtype of its floating tensors (float32,
    float64, bfloat16, ...), or None when it has none or several (mixed precision)."""
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def as_input(x: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device | None = None) -> torch.Tensor:
    """``x`` on ``device``; floating ``x`` cast to ``dtype`` (a state dict's :func:`floating_dtype`)
    when that is given, so that float64 images fed to a float32 pair (or float32 images to a
    float64 pair) run in the pair's dtype. Integer inputs (token ids) keep their dtype."""
    return x.to(device, dtype if dtype is not None and x.is_floating_point() else None)


def lerp_state_dict(sd_a: StateDict, sd_b: StateDict, alpha: float) -> StateDict:
    """θ_α = α·θ_A + (1−α)·θ_B for every floating tensor (α weights A). Integer tensors take A's
    value. ``alpha`` = 1 returns A's tensors and 0 returns B's (exactly, not recomputed)."""
    if alpha == 1.0:
        return dict(sd_a)
    if alpha == 0.0:
        return dict(sd_b)
    out: StateDict = {}
    for k, ta in sd_a.items():
        tb = sd_b[k]
        out[k] = torch.lerp(tb, ta, alpha) if ta.is_floating_point() else ta.clone()
    return out


def check_alphas(alphas: Iterable[float], allow_extrapolation: bool = False) -> list[float]:
    """Validate and sort an α grid; 0, 0.25, 0.5, 0.75 and 1 are always added (the endpoints and
    the α values of the paper's LLFC figures, §3).

    Raises:
        ConfigError: a non-finite α, or one outside [0, 1] without ``allow_extrapolation``; more
            than ``MAX_ALPHAS`` values.
    """
    vals = sorted({float(a) for a in alphas} | {0.0, 0.25, 0.5, 0.75, 1.0})
    _check_grid_size(len(vals))
    for a in vals:
        if a != a or a in (float("inf"), float("-inf")):
            raise ConfigError(f"α must be finite, got {a}")
        if not allow_extrapolation and not 0.0 <= a <= 1.0:
            raise ConfigError(
                f"α = {a} is outside [0, 1]: that extrapolates beyond the two models rather than "
                f"interpolating between them. Pass --allow-extrapolation (allow_extrapolation="
                f"True) if that is what you want."
            )
    return vals


def default_alphas(n: int = 11) -> list[float]:
    """An α grid of exactly ``n`` points (n ≥ 5) that always contains 0, 0.25, 0.5, 0.75 and 1.

    The points are linspace(0, 1, n), with the points nearest to 0.25, 0.5 and 0.75 moved onto
    them; n = 11 gives 0, .1, .2, .25, .4, .5, .6, .75, .8, .9, 1.

    Raises:
        ConfigError: n < 5 or n > ``MAX_ALPHAS``.
    """
    if n < 5:
        raise ConfigError(
            f"the α grid needs at least 5 points (0, .25, .5, .75, 1), got {n}. To choose the α values yourself, "
            "pass a list, e.g. alphas=[0, 0.5, 1] (0.25 and 0.75 are then added: the LLFC criterion is judged at them)."
        )
    _check_grid_size(n)
    grid = [i / (n - 1) for i in range(n)]
    for q in (0.25, 0.5, 0.75):
        j = min(range(1, n - 1), key=lambda i: (abs(grid[i] - q), -grid[i] if q < 0.5 else grid[i]))
        grid[j] = q
    return sorted(round(g, 10) for g in set(grid))


def _check_grid_size(n: int) -> None:
    if n > MAX_ALPHAS:
        raise ConfigError(
            f"the α grid has {n} points, more than the {MAX_ALPHAS} llfc accepts: every α costs one "
            f"forward pass per batch and one interpolated copy of the weights. Use a smaller grid "
            f"(--alphas 11, or --alphas with comma-separated values; alphas= in Python)."
        )


def _available_memory() -> int | None:
    """Bytes of physical memory currently available (Linux/macOS ``sysconf``), None if unknown."""
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_path_memory(sd_a: StateDict, n_interior: int, available: int | None = None) -> None:
    """Refuse a path whose interpolated state dicts would not fit in memory.

    :func:`path_states` keeps one state dict per interior α; this checks, before allocating any,
    that ``n_interior`` copies of ``sd_a`` take at most half of the available memory.

    Args:
        sd_a: a state dict of the architecture (its tensors' bytes are counted).
        n_interior: the number of interior α values (0 < α < 1).
        available: bytes of available memory (default: asked of the operating system; when it
            cannot tell, no check is made).

    Raises:
        ConfigError: the copies would need more than half of the available memory.
    """
    available = _available_memory() if available is None else available
    per = sum(t.numel() * t.element_size() for t in sd_a.values())
    need = per * n_interior
    if available is not None and need > available // 2:
        raise ConfigError(
            f"the α grid's {n_interior} interior points need {need / 2**30:.1f} GiB of interpolated "
            f"weights ({per / 2**20:.1f} MiB each), more than half of the {available / 2**30:.1f} GiB "
            f"of memory available. Use fewer α values (--alphas N; alphas= in Python)."
        )


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains a BatchNorm layer with running statistics."""
    return any(isinstance(m, _BN_TYPES) and m.track_running_stats for m in model.modules())


_warned_bn = False


def warn_bn_interpolation(model: nn.Module, bn_mode: str) -> None:
    """Print (once per process) that BN statistics are interpolated rather than reset."""
    global _warned_bn
    if bn_mode == "interpolate" and has_batchnorm(model) and not _warned_bn:
        _warned_bn = True
        warnings.warn(
            "this model has BatchNorm and its running statistics are interpolated along the path "
            "(bn_mode='interpolate', as the official LLFC code does); interpolated networks often "
            "have collapsed activation statistics. Use bn_mode='reset' (--bn-mode reset) to "
            "recompute them on training batches (REPAIR, Jordan et al. 2023).",
            stacklevel=2,
        )


BN_BATCHES_FORMS = (
    "one input tensor (N, ...), or a list / DataLoader of input tensors (N_i, ...) or of (x, y) "
    "tuples or lists (the x is used; an x-only (x,) works too)"
)


def bn_inputs(batches: torch.Tensor | Iterable[Any]) -> list[torch.Tensor]:
    """The input tensors of ``bn_batches``, in the forms a user has at hand.

    Args:
        batches: one input tensor (N, ...) (a single batch); or an iterable, e.g. a list or a
            ``DataLoader``, of input tensors (N_i, ...) or of tuples / lists whose first element is
            the input tensor ((x, y) of a labelled dataset, (x,) of an x-only ``TensorDataset``).
            An iterable is read once, into the list returned.

    Returns:
        the input tensors (N_i, ...), one per batch.

    Raises:
        ConfigError: a ``Dataset`` (single samples, not batches), or anything else, e.g. dict
            batches; the message names ``bn_batches`` and the accepted forms.
    """
    if isinstance(batches, torch.Tensor):
        return [batches]
    if isinstance(batches, Dataset) or not isinstance(batches, Iterable):
        hint = " A Dataset yields single samples: wrap it in DataLoader(dataset, batch_size=...)."
        raise ConfigError(
            f"bn_batches is a {type(batches).__name__}; pass {BN_BATCHES_FORMS}."
            + (hint if isinstance(batches, Dataset) else "")
        )
    xs = []
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) and b else b
        if not isinstance(x, torch.Tensor):
            what = f"a {type(b).__name__}" + (f" holding a {type(x).__name__}" if x is not b else "")
            hint = " For dict batches, pass [batch[KEY] for batch in loader] with your input's key."
            raise ConfigError(
                f"bn_batches yielded {what} as a batch; pass {BN_BATCHES_FORMS}."
                + (hint if isinstance(b, dict) else "")
            )
        xs.append(x)
    return xs


@torch.no_grad()
def reset_bn_stats(
    model: nn.Module, state_dict: StateDict, batches: torch.Tensor | Iterable[Any], device: str | torch.device = "cpu"
) -> StateDict:
    """Recompute BatchNorm running statistics of ``state_dict`` on ``batches`` of inputs.

    Each BN layer's running mean/var become the exact average over all given batches of the batch
    statistics (momentum = None, cumulative average), as REPAIR's ``reset_bn_stats`` does.

    Args:
        model: the architecture (not modified; a copy is used, in the dtype of ``state_dict``'s
            floating tensors, as are floating inputs: :func:`floating_dtype`).
        state_dict: weights θ_α.
        batches: input batches in any form of :func:`bn_inputs` (input tensors (N_i, C, H, W),
            (x, y) batches, a DataLoader), e.g. a few training batches without augmentation.

    Returns:
        a new state dict with the recomputed running statistics.

    Raises:
        ConfigError: ``batches`` in none of the forms of :func:`bn_inputs`.
    """
    inputs = bn_inputs(batches)
    dtype = floating_dtype(state_dict)
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    m.load_state_dict(state_dict)
    for mod in m.modules():
        if isinstance(mod, _BN_TYPES):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    for x in inputs:
        m(as_input(x, dtype, device))
    m.eval()
    return {k: v.detach() for k, v in m.state_dict().items()}


def path_states(
    model: nn.Module,
    sd_a: StateDict,
    sd_b: StateDict,
    alphas: Sequence[float],
    bn_mode: str = "interpolate",
    bn_batches: torch.Tensor | Iterable[Any] | None = None,
    device: str | torch.device = "cpu",
) -> list[StateDict]:
    """The state dicts θ_α for every α of the grid (``sd_a`` / ``sd_b`` themselves at α = 1 / 0).

    Args:
        model: the architecture (its BatchNorm layers decide whether ``reset`` does anything).
        sd_a, sd_b: endpoint state dicts (α = 1 is A, α = 0 is B).
        alphas: the α grid.
        bn_mode: ``"interpolate"`` (running statistics lerped like weights, the official LLFC code)
            or ``"reset"`` (REPAIR, Jordan et al. 2023): the running statistics of every interior
            θ_α (0 < α < 1) are recomputed on ``bn_batches``. The endpoints are the trained
            networks and keep their trained statistics, so a barrier then compares reset interior
            networks against the trained endpoints.
        bn_batches: training inputs for ``reset``, in any form of :func:`bn_inputs`: one tensor
            (N, ...), a list or DataLoader of input tensors or of (x, y) / (x,) tuples or lists.
        device: where the BN statistics are recomputed.

    Raises:
        ConfigError: unknown ``bn_mode``, or ``reset`` without ``bn_batches`` or with
            ``bn_batches`` in none of the accepted forms; the interior states would not fit in
            memory (:func:`check_path_memory`).
    """
    if bn_mode not in BN_MODES:
        raise ConfigError(f"unknown BatchNorm mode {bn_mode!r}; valid: {', '.join(BN_MODES)}")
    warn_bn_interpolation(model, bn_mode)
    check_path_memory(sd_a, sum(1 for a in alphas if a not in (0.0, 1.0)))
    inputs: list[torch.Tensor] = []
    if bn_mode == "reset" and has_batchnorm(model):  # read once: every α gets the same batches
        inputs = bn_inputs(bn_batches) if bn_batches is not None else []
    states = []
    for a in alphas:
        if a == 1.0:
            states.append(sd_a)
        elif a == 0.0:
            states.append(sd_b)
        else:
            s = lerp_state_dict(sd_a, sd_b, a)
            if bn_mode == "reset" and has_batchnorm(model):
                if not inputs:
                    raise ConfigError(f"bn_mode='reset' needs training batches: pass bn_batches, {BN_BATCHES_FORMS}.")
                s = reset_bn_stats(model, s, inputs, device)
            states.append(s)
    return states
