"""numba kernels of :mod:`llfc.metrics.fused` (imported only there, lazily: importing this module
compiles nothing, the first call of each kernel does).

numba caches the machine code on disk: in ``$NUMBA_CACHE_DIR`` when it is set, else in
``__pycache__`` next to this file when that folder is writable, else in the user cache folder
(``~/.cache/numba``). Where none is writable (a read-only install and an unwritable home) numba
refuses ``cache=True`` when the function is decorated; the kernels are then compiled in memory,
once per process (about a CPU second for all four, benchmarks/engine_parts.py), instead of being
lost to the slower torch path.

Every kernel takes C-contiguous (n, d) float32 or float64 arrays of one shape and dtype and a
float64 output array, which :mod:`llfc.metrics.fused` checks; nothing is checked here (numba does
no bounds checks).
"""

from typing import Any, Callable

import numba
import numpy as np

#: False under ``NUMBA_DISABLE_JIT=1``, where the kernels below run as Python loops
COMPILED = not getattr(numba.config, "DISABLE_JIT", False)

# reassociation lets LLVM vectorise the sums; NaN and inf keep their IEEE meaning
_OPTIONS: dict[str, Any] = {"fastmath": {"reassoc", "contract"}, "nogil": True}


def jit(fn: Callable) -> Any:
    """``numba.njit`` with an on-disk cache where numba can write one, else without."""
    try:
        return numba.njit(cache=True, **_OPTIONS)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available": nowhere writable
        return numba.njit(cache=False, **_OPTIONS)(fn)


@jit
def pair(A, B, out):  # pragma: no cover - compiled by numba
    n, d = A.shape
    for i in range(n):
        sa = 0.0
        sb = 0.0
        sd = 0.0
        for j in range(d):
            a = np.float64(A[i, j])
            b = np.float64(B[i, j])
            sa += a * a
            sb += b * b
            sd += (a - b) * (a - b)
        out[i, 0] = sa
        out[i, 1] = sb
        out[i, 2] = sd


@jit
def interp(X, A, B, al, out):  # pragma: no cover - compiled by numba
    n, d = X.shape
    for i in range(n):
        sx = 0.0
        sd = 0.0
        for j in range(d):
            x = np.float64(X[i, j])
            b = np.float64(B[i, j])
            r = x - (b + al * (np.float64(A[i, j]) - b))
            sx += x * x
            sd += r * r
        out[i, 0] = sx
        out[i, 1] = sd


@jit
def relu_interp(GA, GB, RA, RB, al, out):  # pragma: no cover - compiled by numba
    n, d = GA.shape
    for i in range(n):
        su = 0.0
        sd = 0.0
        for j in range(d):
            gb = np.float64(GB[i, j])
            u = gb + al * (np.float64(GA[i, j]) - gb)
            if u <= 0.0:  # ReLU as torch's: NaN stays NaN (the comparison is false), −inf gives 0
                u = 0.0
            rb = np.float64(RB[i, j])
            r = rb + al * (np.float64(RA[i, j]) - rb) - u
            su += u * u
            sd += r * r
        out[i, 0] = su
        out[i, 1] = sd


@jit
def sign(GA, GB, out):  # pragma: no cover - compiled by numba
    n, d = GA.shape
    for i in range(n):
        c = 0
        for j in range(d):
            c += 1 if GA[i, j] * GB[i, j] >= 0 else 0
        out[i] = c / d if d > 0 else np.nan  # no units: undefined, as torch's mean of nothing
