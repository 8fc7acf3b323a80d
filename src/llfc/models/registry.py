"""Model registry (in the style of timm's): architectures by name.

A model factory is registered with :func:`register_model` and takes keyword arguments only.
Every factory accepts ``input_shape`` (C, H, W) and ``num_classes`` so that a dataset's
:class:`~llfc.data.DatasetInfo` can be passed straight through; further keyword arguments are
architecture options (widths, width multiplier, normalisation...). The name and the keyword
arguments are saved in each checkpoint's JSON sidecar, so :func:`create_model` can rebuild it.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from llfc.errors import ConfigError, unknown_name

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under ``name``.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Sorted names of all registered architectures."""
    return sorted(_REGISTRY)


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory registered under ``name``.

    Raises:
        UnknownNameError: listing the valid names.
    """
    if name not in _REGISTRY:
        raise unknown_name("model", name, _REGISTRY)
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build architecture ``name`` with keyword arguments ``kwargs``.

    Raises:
        UnknownNameError: unknown name (the message lists the valid ones).
        ConfigError: an argument the factory does not accept.
    """
    fn = model_factory(name)
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(kwargs) - set(params))
        if bad:
            raise ConfigError(
                f"model {name!r} does not accept argument(s) {', '.join(bad)}; it accepts: {', '.join(params)}."
            )
    return fn(**kwargs)
