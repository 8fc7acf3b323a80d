"""Seeds, random-number-generator states and the software environment.

Everything random in llfc derives from integer seeds:

* :func:`seed_everything` seeds Python's ``random``, NumPy's global generator and torch (CPU and
  every CUDA device) in one call.
* :func:`derive_seed` turns a base seed plus string tags into a new, independent-looking 63-bit
  seed with a stable hash (SHA-256), so e.g. the data order of epoch ``e`` is
  ``derive_seed(data_seed, "epoch", e)`` on every machine and every Python version (Python's own
  ``hash()`` is salted per process and must not be used for this).
* :func:`rng_state` / :func:`set_rng_state` capture and restore all generator states in a form
  that can be written without pickle: torch states stay uint8 tensors (for safetensors), the
  Python and NumPy states become JSON-able lists (see :mod:`llfc.checkpoint`).
* :func:`environment` records library versions and the device, to be stored next to results.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
from importlib import metadata
from typing import Any

import numpy as np
import torch

__all__ = [
    "seed_everything",
    "set_deterministic",
    "derive_seed",
    "rng_state",
    "set_rng_state",
    "environment",
]

_MASK63 = (1 << 63) - 1


def seed_everything(seed: int, deterministic: bool | None = None) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU + all CUDA devices).

    Args:
        seed: any Python int; it is reduced modulo 2**32 for NumPy (whose global seed must fit in
            32 bits) and modulo 2**63 for torch.
        deterministic: if given, also call :func:`set_deterministic` with it.

    Raises:
        TypeError: if ``seed`` is not an int (a float seed is almost always a bug).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed & _MASK63)  # also seeds every CUDA device
    if deterministic is not None:
        set_deterministic(deterministic)


def set_deterministic(flag: bool = True) -> None:
    """Ask torch for deterministic kernels (cuDNN deterministic, no benchmark autotuning).

    Uses ``torch.use_deterministic_algorithms(flag, warn_only=True)``, so an operation without a
    deterministic implementation warns instead of failing. On CUDA, full determinism of cuBLAS
    needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before cuBLAS starts; with ``flag`` true it is set
    here unless the environment already defines it.
    CPU training in llfc is deterministic for a fixed number of threads without this.
    """
    if flag:  # cuBLAS reads this when its first handle is created; harmless if CUDA is unused
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = bool(flag)
    torch.backends.cudnn.benchmark = not flag
    torch.use_deterministic_algorithms(bool(flag), warn_only=True)


def derive_seed(base: int, *tags: Any) -> int:
    """A stable 63-bit seed derived from ``base`` and ``tags``.

    The value is the first 8 bytes (big-endian) of SHA-256 over the JSON text
    ``[base, str(tag1), str(tag2), ...]``, masked to 63 bits, so it is the same on every machine,
    process and Python version, and different tags give unrelated seeds. Tags are compared by
    their ``str()``: ``derive_seed(1, "epoch", 3) == derive_seed(1, "epoch", "3")``.

    Args:
        base: the base seed (int).
        tags: any values; each is converted with ``str``.

    Returns:
        int in [0, 2**63).
    """
    if isinstance(base, bool) or not isinstance(base, (int, np.integer)):
        raise TypeError(f"base seed must be an int, got {type(base).__name__}")
    text = json.dumps([int(base), *[str(t) for t in tags]], separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & _MASK63


def rng_state() -> dict[str, Any]:
    """Snapshot of every global generator.

    Returns:
        dict with keys
        ``"python"``: ``[version, [625 ints], gauss_next]`` (JSON-able list form of
        ``random.getstate()``);
        ``"numpy"``: ``{"kind", "key" (624 ints), "pos", "has_gauss", "cached_gaussian"}`` (from
        ``np.random.get_state()``);
        ``"torch"``: uint8 tensor (CPU generator state);
        ``"cuda"``: list of uint8 tensors, one per CUDA device (empty without CUDA).
    """
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": str(kind),
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states captured by :func:`rng_state` (possibly after a JSON round trip).

    Missing keys are skipped. CUDA states are restored only when CUDA is available and the number
    of devices matches; otherwise they are ignored (a run resumed on another machine cannot
    reproduce CUDA randomness anyway).
    """
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if state.get("numpy") is not None:
        n = state["numpy"]
        np.random.set_state(
            (
                n["kind"],
                np.asarray(n["key"], dtype=np.uint32),
                int(n["pos"]),
                int(n["has_gauss"]),
                float(n["cached_gaussian"]),
            )
        )
    if state.get("torch") is not None:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda])


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


_THREADS_SOURCE = "torch default"


def default_threads() -> tuple[int, str]:
    """The torch thread count llfc uses when none is given, and why.

    ``$OMP_NUM_THREADS`` when set (the user said so); else the number of CPU cores this process
    may run on (``os.sched_getaffinity``, which respects container and ``taskset`` limits; else
    ``os.cpu_count()``). On a machine other jobs load, fewer threads are faster: pass
    ``--threads 1`` (oversubscribed threads made training several times slower on a loaded
    2-core machine).
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n), "cores available to the process"


def set_threads(n: int | None = None, source: str = "--threads") -> int:
    """Set torch's intra-op thread count (``torch.set_num_threads``); returns it.

    Results are bit-identical across runs only for the same thread count (the order of float
    reductions depends on it; weights after training differed by up to 5e-3 between 1 and 2
    threads), so the count is recorded in environment.json (``threads``, ``threads_source``).

    Args:
        n: threads (≥ 1); None: :func:`default_threads`.
        source: how ``n`` was chosen, recorded as ``threads_source`` (when ``n`` is given).

    Raises:
        ConfigError: n < 1.
    """
    global _THREADS_SOURCE
    from llfc.errors import ConfigError

    if n is None:
        n, _THREADS_SOURCE = default_threads()
    else:
        if int(n) < 1:
            raise ConfigError(f"--threads must be ≥ 1, got {n}.")
        n, _THREADS_SOURCE = int(n), source
    torch.set_num_threads(n)
    return n


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """Versions and hardware to record next to results (all values JSON-able).

    Args:
        device: the device used; default "cuda" when available, else "cpu".

    Returns:
        dict with ``llfc``, ``torch``, ``torchvision``, ``numpy``, ``python`` versions,
        ``platform``, ``machine``, ``device``, ``device_name`` (GPU name or processor),
        ``cuda`` (torch's CUDA version or None), ``threads`` (torch intra-op threads; results
        are bit-identical only for the same count) and ``threads_source`` (how it was chosen:
        :func:`set_threads`).
    """
    import llfc

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
    return {
        "llfc": getattr(llfc, "__version__", None),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "device": str(dev),
        "device_name": name,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "threads_source": _THREADS_SOURCE,
    }
