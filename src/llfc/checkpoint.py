"""Checkpoints: safetensors weights + a JSON sidecar, written atomically. No pickle anywhere.

A checkpoint named ``run/final`` is two files:

* ``run/final.safetensors``: the tensors. Model weights keep their state-dict keys; every other
  tensor lives under a reserved prefix (``extra/``, ``optimizer/``, ``rng/``) so that the file is
  an ordinary state dict to any other tool that strips those keys.
* ``run/final.json``: metadata, e.g. ``{"model": {"name": "mlp", "kwargs": {...}},
  "dataset": "digits", "seeds": {...}, "epoch": 30, "environment": {...}, ...}``.

Both files carry the same random ``checkpoint_id`` (in the safetensors header metadata and in the
JSON), so a pair torn by an interrupted save (new weights, old sidecar) is detected on load.

Every file is written atomically (:func:`atomic_write_bytes` and friends): into a temporary file
in the same folder, flushed and fsync'ed, then moved over the target with ``os.replace``; a
crash or an exception leaves the old file intact. Use these helpers for every result file.

The full training state (:func:`save_training_state`) adds the optimizer state (tensors such as
momentum buffers under ``optimizer/state/<param index>/<name>``, everything else in the JSON),
the LR-scheduler state (JSON), the RNG states (:func:`llfc.seeding.rng_state`) and the epoch, so a
run can be resumed or spawned (Frankle et al. 2020) bit-for-bit.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llfc.errors import CheckpointError, IncompatibleModelsError, NonFiniteWeightsError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "checkpoint_paths",
    "checkpoint_exists",
    "save_checkpoint",
    "load_checkpoint",
    "load_extra_tensors",
    "build_model",
    "check_finite",
    "check_state_dict_matches",
    "fit_key_prefix",
    "matching_key_prefix",
    "strip_prefix",
    "save_training_state",
    "load_training_state",
]

FORMAT = "llfc-checkpoint"
FORMAT_VERSION = 1
_RESERVED = ("extra/", "optimizer/", "rng/")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


# ----------------------------------------------------------------------------------------------
# atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and ``os.replace`` it onto
    ``path``; on any exception delete it and leave ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    # make the rename itself durable (best effort: not every file system supports it)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    Creates missing parent folders. On failure the previous content of ``path`` is untouched and
    no temporary file is left behind. Returns ``Path(path)``.
    """
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _json_default(obj: Any) -> Any:
    """JSON fallback for common harmless types (paths, numpy scalars/arrays, 0-d tensors)."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalar
        return obj.item()
    if hasattr(obj, "tolist") and not isinstance(obj, torch.Tensor):  # numpy array
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±Infinity) replaced by ``None``.

    ``NaN`` and ``Infinity`` are not JSON (RFC 8259); strict parsers reject them. A ``null``
    number in llfc's JSON files means "undefined" (e.g. the scale c = 1/s when s = 0;
    docs/results.md). Containers are copied; other values are returned as they are.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as strict JSON and write it to ``path`` atomically.

    Paths become strings, sets sorted lists, NumPy/torch scalars Python numbers, non-finite
    floats ``null`` (:func:`json_safe`). The text is produced before the file is touched, so an
    unserialisable object raises ``TypeError`` and leaves any existing file as it was.
    """
    text = json.dumps(json_safe(obj), indent=indent, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


# ----------------------------------------------------------------------------------------------
# tagged JSON: exact round trip of optimizer / scheduler state without pickle


def _enc(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}  # 'nan', 'inf', '-inf'
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return {
            "__tensor__": {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "data": t.flatten().tolist(),
            }
        }
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return _enc(obj.item(), where)
    if isinstance(obj, tuple):
        return {"__tuple__": [_enc(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_enc(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [_enc(v, where) for v in sorted(obj)]}
    if isinstance(obj, Mapping):
        if (
            isinstance(obj, collections.Counter)
            or not all(isinstance(k, str) for k in obj)
            or any(k.startswith("__") and k.endswith("__") for k in obj)
        ):
            tag = "__counter__" if isinstance(obj, collections.Counter) else "__dict__"
            return {tag: [[_enc(k, where), _enc(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
        return {k: _enc(v, f"{where}.{k}") for k, v in obj.items()}
    raise CheckpointError(
        f"cannot save {where}: values of type {type(obj).__name__} are not supported in the JSON "
        f"sidecar (only numbers, strings, lists, dicts and tensors; llfc never uses pickle)."
    )


def _dec(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_dec(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, val),) = obj.items()
        if tag == "__float__":
            return float(val)
        if tag == "__tuple__":
            return tuple(_dec(v) for v in val)
        if tag == "__set__":
            return {_dec(v) for v in val}
        if tag == "__dict__":
            return {_hashable(_dec(k)): _dec(v) for k, v in val}
        if tag == "__counter__":
            return collections.Counter({_hashable(_dec(k)): _dec(v) for k, v in val})
        if tag == "__tensor__":
            dtype = getattr(torch, val["dtype"])
            return torch.tensor(val["data"], dtype=dtype).reshape(val["shape"])
    return {k: _dec(v) for k, v in obj.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k


# ----------------------------------------------------------------------------------------------
# paths, reading


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights, sidecar)`` paths of checkpoint ``path``.

    ``path`` may be given without suffix (``run/final``) or with ``.safetensors`` or ``.json``;
    other suffixes are kept as part of the name (``run/model.v2`` → ``run/model.v2.safetensors``).
    """
    s = os.fspath(path)
    for suffix in (".safetensors", ".json"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
            break
    return Path(s + ".safetensors"), Path(s + ".json")


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """True when both files of checkpoint ``path`` exist."""
    w, j = checkpoint_paths(path)
    return w.is_file() and j.is_file()


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix (``module.`` from DataParallel/DDP, ``_orig_mod.`` from
    ``torch.compile``) when *every* key carries it; otherwise return the keys unchanged."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _read(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors (reserved prefixes included) and the decoded meta of checkpoint ``path``."""
    wpath, jpath = checkpoint_paths(path)
    missing = [p for p in (wpath, jpath) if not p.is_file()]
    if len(missing) == 2 and os.fspath(path).endswith(TORCH_SUFFIXES) and Path(path).is_file():
        return load_torch_state_dict(path), {}
    if len(missing) == 2:
        raise CheckpointError(
            f"no checkpoint at {os.fspath(path)!r}: neither {wpath} nor {jpath} exists. Check the "
            f"path (give it without suffix or with .safetensors), or train/save the model first."
        )
    if missing:
        other = jpath if missing[0] == wpath else wpath
        raise CheckpointError(
            f"incomplete checkpoint: {missing[0]} is missing (found {other}). An llfc checkpoint "
            f"is a .safetensors file plus a .json sidecar with the same name; restore the missing "
            f"file or re-create the checkpoint."
        )
    try:
        text = jpath.read_text(encoding="utf-8")
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"the checkpoint sidecar {jpath} is not valid JSON ({e}); it is corrupted or was "
            f"edited by hand. Fix the JSON or re-create the checkpoint."
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"the checkpoint sidecar {jpath} must hold a JSON object, found {type(meta).__name__}; "
            f"re-create the checkpoint."
        )
    try:
        with safe_open(os.fspath(wpath), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"the weights file {wpath} is corrupted or truncated and cannot be read ({e}). "
            f"Re-create it (re-run the training or the save that produced it)."
        ) from None
    sid, jid = header.get("checkpoint_id"), meta.get("checkpoint_id")
    if sid is not None and jid is not None and sid != jid:
        raise CheckpointError(
            f"{wpath} and {jpath} come from different saves (checkpoint ids {sid} vs {jid}); a "
            f"save was probably interrupted between the two files. Re-create the checkpoint."
        )
    return tensors, meta


def _split(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weights = {k: v for k, v in tensors.items() if not k.startswith(_RESERVED)}
    reserved = {k: v for k, v in tensors.items() if k.startswith(_RESERVED)}
    return weights, reserved


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read checkpoint ``path`` (without suffix, or with .safetensors / .json).

    Works on weight checkpoints (:func:`save_checkpoint`) and on training states
    (:func:`save_training_state`); only the model weights are returned (a ``module.`` /
    ``_orig_mod.`` prefix is stripped). Extra tensors: :func:`load_extra_tensors`.

    Returns:
        (state_dict, meta): tensors on ``device`` with the dtypes they were saved with, and the
        JSON sidecar as a dict.

    Raises:
        CheckpointError: a file is missing (named), the safetensors file is corrupted or
            truncated, the JSON is invalid, or the two files come from different saves.
    """
    tensors, meta = _read(path, device)
    weights, _ = _split(tensors)
    return strip_prefix(weights), meta


TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict saved in PyTorch's own format (``torch.save(model.state_dict(), "x.pt")``).

    Read with ``torch.load(weights_only=True)`` (no code is executed). A dict holding the state
    dict under ``"state_dict"``, ``"model_state_dict"`` or ``"model"`` (the usual training
    checkpoints) is unwrapped; a ``module.`` / ``_orig_mod.`` prefix is stripped.

    Returns:
        {name: tensor} on the CPU, with the dtypes they were saved with.

    Raises:
        CheckpointError: the file is missing, corrupt (or no PyTorch file), holds Python objects
            that ``weights_only`` loading refuses (e.g. a pickled whole model), or holds no tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {os.fspath(path)!r}: the file does not exist.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # errors of many types; torch's own text may advise weights_only=False: not quoted
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # a sound file that holds Python objects besides tensors
            raise CheckpointError(
                f"{p} holds Python objects besides tensors (it needs {found.group(1)}, e.g. a pickled "
                f"whole model or optimizer); llfc reads only tensors, without running pickled code. Save "
                f"the weights with torch.save(model.state_dict(), path) or "
                f"safetensors.torch.save_file(model.state_dict(), path)."
            ) from None
        raise CheckpointError(
            f"{p} is unreadable: it is not a PyTorch file llfc can read, most likely corrupt or truncated "
            f"(an interrupted save or copy) or not a .pt file at all ({type(e).__name__}). Save or copy the "
            f"weights again: torch.save(model.state_dict(), path)."
        ) from None
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}
    if not sd:
        raise CheckpointError(
            f"{p} holds no tensors under string keys (found a {type(obj).__name__}); expected a "
            f"state dict saved with torch.save(model.state_dict(), path)."
        )
    return strip_prefix(sd)


def load_weights(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights of any checkpoint llfc can read, and its metadata ({} when there is none).

    * an llfc checkpoint (``.safetensors`` + ``.json`` sidecar): :func:`load_checkpoint`;
    * a plain ``.safetensors`` state dict without a sidecar;
    * a PyTorch ``.pt`` / ``.pth`` / ``.bin`` state dict: :func:`load_torch_state_dict`.

    Plain files carry no architecture: the caller needs it from elsewhere (``--model``).
    A ``module.`` / ``_orig_mod.`` prefix is stripped in every case.

    Raises:
        CheckpointError: as :func:`load_checkpoint` and :func:`load_torch_state_dict`.
    """
    if os.fspath(path).endswith(TORCH_SUFFIXES):
        return {k: v.to(device) for k, v in load_torch_state_dict(path).items()}, {}
    wpath, jpath = checkpoint_paths(path)
    if wpath.is_file() and not jpath.is_file():
        from safetensors.torch import load_file

        try:
            return strip_prefix(load_file(os.fspath(wpath), device=str(device))), {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{wpath} is not a readable safetensors file ({e}). Re-create it, or check the path."
            ) from None
    return load_checkpoint(path, device)


def load_extra_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The ``extra_tensors`` given to :func:`save_checkpoint`, by their original names."""
    tensors, _ = _read(path, device)
    return {k[len("extra/") :]: v for k, v in tensors.items() if k.startswith("extra/")}


# ----------------------------------------------------------------------------------------------
# writing


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # a private contiguous CPU copy: safetensors refuses tensors that share storage
    return t.detach().to("cpu", copy=True).contiguous()


def _write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    from llfc.seeding import environment

    wpath, jpath = checkpoint_paths(path)
    cid = uuid.uuid4().hex
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "checkpoint_id": cid}
    full_meta.update({k: v for k, v in meta.items() if k not in full_meta})
    full_meta.setdefault("environment", environment())
    try:  # serialise first: a bad meta must not leave a half-written checkpoint
        text = json.dumps(json_safe(full_meta), indent=2, default=_json_default, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"cannot save checkpoint {wpath}: its metadata is not JSON-serialisable ({e}). Pass "
            f"only numbers, strings, lists and dicts in meta."
        ) from None
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"cannot save checkpoint {wpath}: entry {k!r} is a {type(v).__name__}, not a "
                f"tensor; put non-tensor values in meta."
            )
    tensors = {k: _cpu_copy(v) for k, v in tensors.items()}
    with atomic_target(wpath) as tmp:
        save_file(tensors, os.fspath(tmp), metadata={"format": "pt", "checkpoint_id": cid})
    atomic_write_text(jpath, text)
    return wpath


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save model weights and metadata as ``<path>.safetensors`` + ``<path>.json``, atomically.

    Args:
        path: checkpoint name, without suffix or ending in .safetensors; parent folders are
            created.
        state_dict: name → tensor (any device/dtype; saved as a CPU copy with its dtype). A
            ``module.``/``_orig_mod.`` prefix on every key is stripped.
        meta: JSON-able metadata. Conventional keys: ``model`` = ``{"name": registry name,
            "kwargs": factory keyword arguments}`` (needed by :func:`build_model`), ``dataset``,
            ``seeds``, ``epoch``, and free-form extras. ``format``, ``format_version``,
            ``checkpoint_id`` and (unless given) ``environment`` (:func:`llfc.seeding.environment`)
            are added.
        extra_tensors: further tensors (e.g. a permutation), stored under ``extra/<name>`` and
            read back with :func:`load_extra_tensors`.

    Returns:
        the path of the .safetensors file.

    Raises:
        CheckpointError: meta not JSON-serialisable, a value that is not a tensor, or a key that
            uses a reserved prefix (``extra/``, ``optimizer/``, ``rng/``).
    """
    sd = strip_prefix(state_dict)
    bad = [k for k in sd if k.startswith(_RESERVED)]
    if bad:
        raise CheckpointError(
            f"state-dict key {bad[0]!r} starts with a prefix reserved by llfc checkpoints "
            f"({', '.join(_RESERVED)}); rename the module."
        )
    tensors = dict(sd)
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra/{k}"] = v
    m = dict(meta or {})
    m.setdefault("kind", "weights")
    m["extra_tensors"] = sorted(extra_tensors or {})
    return _write(path, tensors, m)


# ----------------------------------------------------------------------------------------------
# checks, model building


def check_finite(state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise if any floating-point tensor of ``state_dict`` holds NaN or ±Inf.

    Args:
        state_dict: name → tensor.
        where: what the state dict is (e.g. "model A (run/a/final)"), used in the message.

    Raises:
        NonFiniteWeightsError: naming the first offending key and its count of bad values.
    """
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            bad = int((~torch.isfinite(v)).sum())
            if bad:
                raise NonFiniteWeightsError(
                    f"{where}: tensor {k!r} holds {bad} NaN/Inf value(s) out of {v.numel()}. The "
                    f"training probably diverged; retrain (e.g. with a lower learning rate) or use "
                    f"an earlier checkpoint."
                )


def check_state_dict_matches(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise unless ``got`` has exactly the keys and shapes of ``expected``.

    Args:
        expected: e.g. ``model.state_dict()`` of the architecture.
        got: the state dict read from a file.
        where: names the source of ``got`` in the message.

    Raises:
        IncompatibleModelsError: naming the first missing key (in ``expected``'s order), the first
            unexpected key, or the first key whose shape differs, with both shapes.
    """
    for k, v in expected.items():
        if k not in got:
            prefix = matching_key_prefix(expected, got)
            if prefix is not None:
                others = [q for q in got if not (q.startswith(prefix) and q[len(prefix) :] in expected)]
                besides = (
                    f" (and {len(others)} other key{'s' * (len(others) > 1)}, e.g. {others[0]!r})" if others else ""
                )
                raise IncompatibleModelsError(
                    f"{where} does not fit the architecture as it is: key {k!r} is missing, but it holds "
                    f"every key of the model under the prefix {prefix!r}{besides}: a wrapper's checkpoint, "
                    f"such as a Lightning module's. Save the wrapped network's weights alone "
                    f"({prefix[:-1]}.state_dict() of the wrapper)."
                )
            raise IncompatibleModelsError(
                f"{where} does not fit the architecture: key {k!r} (shape {tuple(v.shape)}) is "
                f"missing from it. The checkpoint was made with another architecture or options; "
                f"build the model it was saved from (see its JSON sidecar)."
            )
        if tuple(got[k].shape) != tuple(v.shape):
            raise IncompatibleModelsError(
                f"{where} does not fit the architecture: key {k!r} has shape "
                f"{tuple(got[k].shape)} in the checkpoint but {tuple(v.shape)} in the model "
                f"(different widths or options?). Build the model with the arguments it was saved "
                f"with."
            )
    extra = [k for k in got if k not in expected]
    if extra:
        raise IncompatibleModelsError(
            f"{where} does not fit the architecture: it holds key {extra[0]!r} (shape "
            f"{tuple(got[extra[0]].shape)}) that the model does not have ({len(extra)} unexpected "
            f"key(s) in all). Build the model it was saved from."
        )


def matching_key_prefix(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str | None:
    """A key prefix P (ending in ".") such that every key of ``expected`` is in ``got`` as P + key; None
    when there is none (or ``got`` already holds ``expected``'s keys).

    Example: a Lightning module keeps its network as ``self.model``, so its checkpoint's keys are
    ``model.<the network's keys>`` (next to, perhaps, a loss's buffers): P = ``"model."``.
    """
    if not expected or expected.keys() <= got.keys():
        return None
    first = next(iter(expected))
    for k in got:
        if k.endswith("." + first):
            p = k[: len(k) - len(first)]
            if all(p + q in got for q in expected):
                return p
    return None


def fit_key_prefix(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """``got`` with a key prefix removed when every key carries it and it is all that keeps the keys from
    being exactly ``expected``'s (:func:`matching_key_prefix`; e.g. ``model.`` of a Lightning module),
    with a warning naming it; else ``got`` unchanged (:func:`check_state_dict_matches` then says what
    differs, and suggests a prefix that only some keys carry).

    Args:
        expected: e.g. ``model.state_dict()`` of the architecture.
        got: the state dict read from a file.
        where: names the source of ``got`` in the warning.
    """
    prefix = matching_key_prefix(expected, got)
    if prefix is None or len(got) != len(expected):  # other keys too: suggested, not guessed
        return dict(got)
    warnings.warn(
        f"{where}: stripped the key prefix {prefix!r} from every key (a wrapper's, e.g. a Lightning module's "
        f"self.{prefix[:-1]}); the keys are then exactly the model's.",
        stacklevel=2,
    )
    return {k[len(prefix) :]: v for k, v in got.items()}


def _load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> None:
    check_state_dict_matches(model.state_dict(), sd, where)
    model.load_state_dict(sd, strict=True)


def build_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture recorded in checkpoint ``path`` and load its weights.

    Uses ``llfc.models.create_model(meta["model"]["name"], **meta["model"]["kwargs"])``, then a
    strict ``load_state_dict``. The model is returned on ``device`` in eval mode.

    Raises:
        CheckpointError: unreadable checkpoint, or no ``model`` entry in its sidecar.
        UnknownNameError / ConfigError: the recorded architecture is not registered / its
            arguments are not accepted.
        IncompatibleModelsError: the weights do not fit (names the first differing key/shape).
    """
    from llfc.models import create_model

    sd, meta = load_checkpoint(path)
    info = meta.get("model")
    if not isinstance(info, dict) or "name" not in info:
        raise CheckpointError(
            f'checkpoint {checkpoint_paths(path)[1]} records no architecture (no "model": '
            f'{{"name", "kwargs"}} entry). Build the model yourself and load the weights '
            f'with load_checkpoint, or re-save the checkpoint with meta["model"].'
        )
    model = create_model(info["name"], **dict(info.get("kwargs") or {}))
    _load_into(model, sd, f"checkpoint {checkpoint_paths(path)[0]}")
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------------------------
# full training state


def save_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    epoch: int,
    rng: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save everything needed to continue training exactly: weights, optimizer state, LR
    scheduler state, RNG states and the number of completed epochs.

    Layout: weights under their state-dict keys; optimizer tensors (momentum buffers, Adam
    moments and step counts...) under ``optimizer/state/<param index>/<name>``; torch RNG
    states under ``rng/torch`` and ``rng/cuda/<i>``. The optimizer's param groups and non-tensor
    state, the scheduler's ``state_dict()`` and the Python/NumPy RNG states go into the JSON
    sidecar with a tagged encoding that restores tuples, int-keyed dicts and Counters exactly.

    Args:
        path: checkpoint name (see :func:`checkpoint_paths`).
        model: the model being trained.
        optimizer, scheduler: may be None (not saved).
        epoch: number of completed epochs.
        rng: :func:`llfc.seeding.rng_state` output, or None.
        meta: JSON-able metadata (model info, config, seeds, log...).

    Returns:
        path of the .safetensors file.
    """
    tensors: dict[str, torch.Tensor] = dict(strip_prefix(model.state_dict()))
    m: dict[str, Any] = dict(meta or {})
    m["kind"] = "training_state"
    m["epoch"] = int(epoch)
    if optimizer is not None:
        osd = optimizer.state_dict()
        other: dict[str, dict[str, Any]] = {}
        for pid, st in osd["state"].items():
            for name, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"optimizer/state/{pid}/{name}"] = val
                else:
                    other.setdefault(str(pid), {})[name] = val
        m["optimizer"] = {
            "class": type(optimizer).__name__,
            "param_groups": _enc(osd["param_groups"], "optimizer.param_groups"),
            "state_other": _enc(other, "optimizer.state"),
            "state_keys": sorted(str(pid) for pid in osd["state"]),
        }
    else:
        m["optimizer"] = None
    if scheduler is not None:
        m["scheduler"] = {"class": type(scheduler).__name__, "state": _enc(scheduler.state_dict(), "scheduler")}
    else:
        m["scheduler"] = None
    if rng is not None:
        json_rng = {}
        for k, v in rng.items():
            if k == "torch" and v is not None:
                tensors["rng/torch"] = v
            elif k == "cuda":
                for i, s in enumerate(v or []):
                    tensors[f"rng/cuda/{i}"] = s
                json_rng["cuda_devices"] = len(v or [])
            else:
                json_rng[k] = _enc(v, f"rng.{k}")
        m["rng"] = json_rng
    else:
        m["rng"] = None
    return _write(path, tensors, m)


def _saved_state(meta: Mapping[str, Any], what: str, obj: Any, wpath: Path) -> dict[str, Any]:
    """The saved ``what`` ("optimizer" / "scheduler") section of a training state, checked to be
    of the same class as ``obj``.

    Raises:
        CheckpointError: the section is missing or was saved from another class.
    """
    info = meta.get(what)
    if not info:
        raise CheckpointError(f"training state {wpath} holds no {what} state.")
    if info.get("class") != type(obj).__name__:
        raise CheckpointError(
            f"training state {wpath} was saved with {what} {info.get('class')}, but a "
            f"{type(obj).__name__} was given; use the same training configuration."
        )
    return info


def load_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
    """Load a state written by :func:`save_training_state` into ``model`` (and ``optimizer``,
    ``scheduler`` when given). Build the optimizer and scheduler exactly as for the original run
    before calling this.

    Returns:
        (epoch, rng, meta): completed epochs, the RNG states in :func:`llfc.seeding.rng_state`
        form (pass to :func:`llfc.seeding.set_rng_state`) or None, and the sidecar.

    Raises:
        CheckpointError: unreadable files, not a training state, or optimizer/scheduler of
            another kind or parameter layout than the saved one.
        IncompatibleModelsError: the weights do not fit ``model``.
    """
    tensors, meta = _read(path)
    wpath = checkpoint_paths(path)[0]
    if meta.get("kind") != "training_state":
        raise CheckpointError(
            f"{wpath} is a {meta.get('kind', 'weights')!r} checkpoint, not a training state; "
            f"resume/spawn needs the 'last' state written during training."
        )
    weights, reserved = _split(tensors)
    _load_into(model, strip_prefix(weights), f"training state {wpath}")
    if optimizer is not None:
        info = _saved_state(meta, "optimizer", optimizer, wpath)
        groups = _dec(info["param_groups"])
        current = optimizer.state_dict()["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
            raise CheckpointError(
                f"training state {wpath}: the optimizer's parameter groups do not match the "
                f"model's parameters; use the same architecture and configuration."
            )
        state: dict[int, dict[str, Any]] = {int(pid): {} for pid in info.get("state_keys", [])}
        for pid, vals in _dec(info["state_other"]).items():
            state.setdefault(int(pid), {}).update(vals)
        for k, v in reserved.items():
            if k.startswith("optimizer/state/"):
                pid, name = k[len("optimizer/state/") :].split("/", 1)
                state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scheduler is not None:
        info = _saved_state(meta, "scheduler", scheduler, wpath)
        scheduler.load_state_dict(_dec(info["state"]))
    rng = None
    if meta.get("rng") is not None:
        rng = {k: _dec(v) for k, v in meta["rng"].items() if k != "cuda_devices"}
        rng["torch"] = reserved.get("rng/torch")
        n = int(meta["rng"].get("cuda_devices", 0))
        rng["cuda"] = [reserved[f"rng/cuda/{i}"] for i in range(n)]
    return int(meta["epoch"]), rng, meta
