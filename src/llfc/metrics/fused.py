"""Fused per-sample norms for the streaming engine: one read of each feature map, no temporaries.

The engine (:mod:`llfc.engine`) needs, per probe and interior α, two per-sample squared norms
(LLFC paper §3, Def. 2; the cosine is expanded as in :mod:`llfc.engine`'s module docstring):

    ‖f_α‖²  and  ‖f_α − f_int‖²,   f_int = α f_A + (1−α) f_B ,

and per ReLU probe (Def. 3, weak additivity) ‖u‖² and ‖v − u‖² with u = σ(α g_A + (1−α) g_B),
v = α σ(g_A) + (1−α) σ(g_B). Written with torch operations each of these reads and writes every
feature map several times (interpolate, subtract, two norms: about eight passes over memory per
probe and α), and the engine is memory-bound there (benchmarks/notes.md). The kernels below,
compiled with numba, read each input once per call and keep the running sums in float64
registers: about three passes instead of eight, and sums exact to float64 rounding instead of the
float32 accumulation of ``torch.linalg.vector_norm``.

Each function takes (B, D) tensors (one row per sample) and returns a float64 (B, k) tensor; a
tensor that is not 2-D raises ValueError. The numba path is taken for contiguous float32/float64
CPU tensors of one shape, dtype and device, without autograd, when numba imports and
``LLFC_FUSED`` is not ``0``; otherwise (CUDA, other dtypes, strided views, shapes that broadcast,
no numba, ``NUMBA_DISABLE_JIT=1``) the same quantities are computed with torch operations, in the
tensors' dtype (float32 for half precision) with float64 squares, as before these kernels existed;
shapes that neither match nor broadcast raise torch's RuntimeError. Both paths agree to float32
rounding for finite values (tests/test_fused.py). With non-finite or huge values the kernels,
which interpolate as b + α(a − b) and sum in float64, can be finite where the torch path gives inf
or NaN: float32 sums of squares overflow above about 3.4e38, and ``torch.lerp`` computes a −
(1−α)(a − b) for α ≥ 0.5, which is NaN when a is infinite. Each NaN input element makes its row
NaN in both paths. Kernels are compiled on first use (about a CPU second for all four at one
dtype, numba and its compiler loaded; cached on disk by numba, see :mod:`llfc.metrics._kernels`,
after which a new process's first call takes about half a second, benchmarks/engine_parts.py) and
run on one thread: numba's parallel loops (``prange``) were measured slower in a prototype, because
they stop LLVM from vectorising the inner sums (8 ms against 1.5 ms for a 256 × 16,384 float32
LLFC row at one thread).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

__all__ = ["available", "pair_sq", "interp_sq", "relu_interp_sq", "sign_agreement_rows"]

_KERNELS: dict[str, Any] | None = None
_FAILED = False


def _compile() -> dict[str, Any] | None:
    """Build the numba kernels once per process (None where numba is missing or fails, or runs
    its functions as Python: ``NUMBA_DISABLE_JIT=1`` would make them about 1,000 times slower)."""
    global _KERNELS, _FAILED
    if _KERNELS is not None or _FAILED:
        return _KERNELS
    try:
        from llfc.metrics import _kernels as k
    except Exception as e:  # no numba, or one that does not load with this numpy
        _FAILED = True
        import warnings

        warnings.warn(
            f"llfc's fused metric kernels are off: numba could not be loaded ({type(e).__name__}: {e}). "
            "Results are the same, the engine is slower (about 1.2–1.3× on conv nets, "
            "docs/benchmarks.md); `pip install numba` (a dependency of llfc) turns them on.",
            stacklevel=3,
        )
        return None
    if not k.COMPILED:
        _FAILED = True
        return None
    _KERNELS = {"pair": k.pair, "interp": k.interp, "relu_interp": k.relu_interp, "sign": k.sign}
    return _KERNELS


def available() -> bool:
    """Whether the numba kernels can be used in this process (``LLFC_FUSED=0`` turns them off)."""
    return os.environ.get("LLFC_FUSED", "1") != "0" and _compile() is not None


def _fusable(*ts: torch.Tensor) -> bool:
    """Whether the kernels may read ``ts``; raises ValueError unless every tensor is (B, D)."""
    for t in ts:
        if t.ndim != 2:
            raise ValueError(f"llfc.metrics.fused takes 2-D (samples, features) tensors, got shape {tuple(t.shape)}")
    t0 = ts[0]
    return (
        t0.device.type == "cpu"
        and t0.dtype in (torch.float32, torch.float64)
        # one shape: the kernels do no bounds checks (other shapes: torch broadcasts or raises)
        and all(t.shape == t0.shape for t in ts)
        and all(t.dtype == t0.dtype and t.device == t0.device and t.is_contiguous() for t in ts)
        and not any(t.requires_grad for t in ts)
        and available()
    )


def _fused(name: str, ts: tuple[torch.Tensor, ...], extra: tuple = (), cols: int | None = None) -> torch.Tensor | None:
    """Kernel ``name`` on ``ts`` (float64 (B, cols) result, (B,) when ``cols`` is None), or None
    where the kernels may not read ``ts`` (:func:`_fusable`) or numba's on-disk cache fails; the
    caller then takes the torch path.

    numba registers a compiled kernel before it writes the cache, so an OSError from the write
    (disk full, quota) leaves a working kernel and the call is repeated; an OSError again (an
    unreadable cache file) turns the kernels off for this process.
    """
    global _KERNELS, _FAILED
    if not _fusable(*ts):
        return None
    k = _compile()
    assert k is not None  # _fusable checked available()
    n = ts[0].shape[0]
    out = torch.empty((n, cols) if cols is not None else (n,), dtype=torch.float64)
    args = (*(t.numpy() for t in ts), *extra, out.numpy())
    for _ in range(2):
        try:
            k[name](*args)
            return out
        except OSError:  # from numba's cache: the kernels themselves do no I/O
            pass
    _KERNELS, _FAILED = None, True
    return None


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Per-row squared norms (B,), float64: the norm in float32/float64 tensors' own dtype, in
    float32 for half precision (whose own accumulation would lose most digits)."""
    dt = None if t.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.linalg.vector_norm(t, dim=1, dtype=dt).to(torch.float64) ** 2


def pair_sq(A: torch.Tensor, B: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ‖A‖², ‖B‖², ‖A − B‖² of two (B, D) tensors: float64 (B, 3).

    With A, B = f_A, f_B these give the baseline d_AB and ‖f_int‖² of LLFC (paper Def. 2, expanded
    as in :mod:`llfc.engine`); with two layer inputs or weights, Dist_H and Dist_W of
    commutativity (Def. 4). ``work``: an optional buffer shaped like A for the torch path's
    difference. Raises ValueError unless both tensors are 2-D.
    """
    out = _fused("pair", (A, B), cols=3)
    if out is not None:
        return out
    if A.dtype not in (torch.float32, torch.float64):  # half precision: subtract in float32
        A, B, work = A.float(), B.float(), None
    d = torch.sub(A, B, out=work)
    return torch.stack([_sq(A), _sq(B), _sq(d)], 1)


def interp_sq(
    X: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, work: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample ‖X‖² and ‖X − (α A + (1−α) B)‖² of (B, D) tensors: float64 (B, 2).

    With X = f_α and A, B = f_A, f_B these are the two norms of LLFC (paper Def. 2) that depend on
    f_α; the rest follows from :func:`pair_sq` (llfc.engine). ``work``: an optional buffer shaped
    like X for the torch path's difference (the engine reuses one instead of allocating). Raises
    ValueError unless the tensors are 2-D.
    """
    out = _fused("interp", (X, A, B), (float(alpha),), cols=2)
    if out is not None:
        return out
    d = torch.lerp(B, A, alpha, out=work)
    return torch.stack([_sq(X), _sq(d.sub_(X))], 1)


def relu_interp_sq(
    gA: torch.Tensor,
    gB: torch.Tensor,
    rA: torch.Tensor,
    rB: torch.Tensor,
    alpha: float,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-sample ‖u‖² and ‖v − u‖² of weak additivity (paper Def. 3): float64 (B, 2).

    u = σ(α g_A + (1−α) g_B), v = α r_A + (1−α) r_B with g the pre-activations and r = σ(g) the
    activations of the two networks, all (B, D). σ is ReLU (fused) unless ``activation`` is
    given (any elementwise function, e.g. GELU; torch operations). ``work``: optional buffers shaped
    like g and r for the torch path. Raises ValueError unless the tensors are 2-D.
    """
    out = _fused("relu_interp", (gA, gB, rA, rB), (float(alpha),), cols=2) if activation is None else None
    if out is not None:
        return out
    wu, wv = work if work is not None else (None, None)
    u = torch.lerp(gB, gA, alpha, out=wu)
    u = u.relu_() if activation is None else activation(u)
    v = torch.lerp(rB, rA, alpha, out=wv)
    return torch.stack([_sq(u), _sq(v.sub_(u))], 1)


def sign_agreement_rows(gA: torch.Tensor, gB: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample fraction of units with g_A·g_B ≥ 0 (paper §4.1, Lemma 1's condition): float64
    (B,). ``work``: an optional buffer shaped like gA for the torch path's product. Raises
    ValueError unless both tensors are 2-D."""
    out = _fused("sign", (gA, gB))
    if out is not None:
        return out
    p = torch.mul(gA, gB, out=work)
    return p.ge_(0).mean(1, dtype=torch.float64)
