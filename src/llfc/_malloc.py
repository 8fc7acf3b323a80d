"""Keep freed heap memory in the process during a streaming pass (glibc only; an implementation
detail of :func:`llfc.engine.measure_pair`).

Why: the engine keeps every probed feature map of θ_A, θ_B and one θ_α alive for a batch, then
frees them all. With glibc's default malloc settings, blocks above the mmap threshold are
``munmap``-ed on free and the top of the heap is trimmed as soon as more than the trim threshold
(128 KiB, dynamically 2 × the mmap threshold) is free, so every new batch's outputs land on fresh
pages from the kernel: on ResNet-20 with every probe (batch 256) 12 million minor page faults per
pass, about half the engine's overhead over the plain forward passes (benchmarks/engine.py, issue 11).
Plain forward passes do not see this because each intermediate is freed before the next one of
the same size is allocated.

What :func:`retain_freed_memory` does, with ``mallopt(3)`` (documented glibc tunables):

* on entry: ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's own upper limit for its dynamic threshold, so
  blocks up to 32 MiB come from the heap and are reused) and ``M_TRIM_THRESHOLD`` = 2 GiB (the largest value
  ``mallopt`` takes: freed memory stays in the process until the pass ends, as long as the pass
  frees less than that at once, which the engine's memory budget ensures);
* on exit: ``M_TRIM_THRESHOLD`` = 64 MiB (= 2 × the mmap threshold, the value glibc's dynamic rule
  gives for a 32 MiB threshold) and ``malloc_trim(0)``, which hands the pass's freed memory back to
  the kernel at once. Peak memory is unchanged (the pass holds its peak anyway); only the resident
  size *between* batches stays at the peak instead of dropping.

It does nothing (and :func:`retain_freed_memory` is a plain context) when the C library is not
glibc, when the user tuned malloc themselves (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_`` or ``GLIBC_TUNABLES`` set), or when ``LLFC_MALLOC_TUNING=0``. The settings are
process-wide; nested and concurrent uses are counted, and the exit step runs when the last one
leaves. The mmap threshold stays at 32 MiB afterwards (glibc offers no way to read the previous
value; 32 MiB is where its dynamic rule ends up once a block of that size has been freed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["malloc_tuning_available", "retain_freed_memory"]

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_DURING = 2**31 - 1
_TRIM_AFTER = 2 * _MMAP_THRESHOLD
_USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_lock = threading.Lock()
_depth = 0
_libc = None
_checked = False


def _glibc():
    """The glibc handle (with mallopt / malloc_trim), or None on another C library."""
    global _libc, _checked
    if not _checked:
        _checked = True
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.gnu_get_libc_version  # only glibc has it  # noqa: B018
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.mallopt.restype = ctypes.c_int
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.malloc_trim.restype = ctypes.c_int
            _libc = lib
        except (OSError, AttributeError):
            _libc = None
    return _libc


def malloc_tuning_available() -> bool:
    """Whether :func:`retain_freed_memory` will change malloc settings in this process."""
    if os.environ.get("LLFC_MALLOC_TUNING", "1") == "0" or any(v in os.environ for v in _USER_VARS):
        return False
    return _glibc() is not None


def _set(param: int, value: int) -> None:
    assert _libc is not None  # callers checked malloc_tuning_available()
    _libc.mallopt(param, min(value, 2**31 - 1))


@contextmanager
def retain_freed_memory() -> Iterator[None]:
    """Context in which freed heap blocks stay in the process (see the module docstring)."""
    global _depth
    if not malloc_tuning_available():
        yield
        return
    with _lock:
        if _depth == 0:
            _set(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
            _set(_M_TRIM_THRESHOLD, _TRIM_DURING)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(_M_TRIM_THRESHOLD, _TRIM_AFTER)
                assert _libc is not None  # loaded when the first context was entered
                _libc.malloc_trim(0)
