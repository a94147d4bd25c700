"""Name -> model-factory registry.

Every architecture module decorates its factories with :func:`register`; users build
models with :func:`create` and list them with :func:`available`.

A factory is any callable taking ``num_classes`` as a keyword argument (plus optional
architecture-specific keyword arguments) and returning an ``nn.Module`` whose
``forward(x)`` returns plain logits of shape ``[N, num_classes]``.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from locakd.errors import ConfigError

__all__ = ["available", "count_parameters", "create", "register"]

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}

_NAME_RE = re.compile(r"^[a-z0-9_]+$")

# Spellings used by mdistiller / CRD configs, mapped to our names, so the unknown-name
# error can point users at the right entry.
_ALIASES: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "mobile_half": "mobilenetv2",
    "mobilenetv2": "mobilenetv2",
    "shufflev1": "shufflenetv1",
    "shufflev2": "shufflenetv2",
    "vgg8_bn": "vgg8",
    "vgg11_bn": "vgg11",
    "vgg13_bn": "vgg13",
    "vgg16_bn": "vgg16",
    "vgg19_bn": "vgg19",
    "mobilenetv1": "imagenet_mobilenetv1",
    "mobilenet_v1": "imagenet_mobilenetv1",
}


def register(name: str) -> Callable[[F], F]:
    """Class/function decorator registering a model factory under ``name``.

    ``name`` must be lower-case (``[a-z0-9_]+``). Registering a different factory under
    an existing name raises :class:`ConfigError`; re-registering the same object is a no-op.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"model name must be a non-empty lower-case string of [a-z0-9_], got {name!r}")

    def decorator(factory: F) -> F:
        if not callable(factory):
            raise ConfigError(f"register({name!r}) expects a callable, got {type(factory).__name__}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ConfigError(f"model name {name!r} is already registered (by {_qualname(existing)})")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available() -> list[str]:
    """Sorted list of every registered model name."""
    return sorted(_REGISTRY)


def create(name: str, num_classes: int, *, seed: int | None = None, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name`` with a ``num_classes``-way output.

    ``seed``: if given, parameters are initialised from a private RNG seeded with it (the
    global torch RNG state is left untouched), so the same seed always yields the same
    weights. If ``None`` the global torch RNG is used, as with any ``nn.Module``.
    Extra keyword arguments are forwarded to the factory (e.g. ``input_length`` for the
    MNIST-1D models); unknown ones raise :class:`ConfigError`.
    """
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {type(name).__name__}: {name!r}")
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(_unknown_name_message(name))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r} (model {name!r})")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed must be an int or None, got {seed!r}")
    _check_kwargs(name, factory, num_classes, kwargs)
    if seed is None:
        return factory(num_classes=num_classes, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (shared parameters counted once)."""
    params = model.parameters()
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)


def _check_kwargs(name: str, factory: Factory, num_classes: int, kwargs: dict[str, object]) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return
    try:
        sig.bind(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        accepted = [
            p.name
            for p in sig.parameters.values()
            if p.name != "num_classes" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        raise ConfigError(
            f"bad arguments for model {name!r}: {exc}; accepted keyword arguments: "
            f"{', '.join(accepted) if accepted else '(none besides num_classes)'}"
        ) from None


def _unknown_name_message(name: str) -> str:
    names = available()
    lowered = name.lower()
    suggestions: list[str] = []
    if lowered in _REGISTRY and lowered != name:
        suggestions.append(lowered)
    alias = _ALIASES.get(lowered)
    if alias is not None and alias in _REGISTRY and alias not in suggestions:
        suggestions.append(alias)
    for match in difflib.get_close_matches(lowered, names, n=5, cutoff=0.6):
        if match not in suggestions:
            suggestions.append(match)
    msg = f"unknown model name {name!r}"
    if suggestions:
        msg += f"; did you mean {', '.join(repr(s) for s in suggestions)}?"
    msg += f" Available models: {', '.join(names)}"
    return msg


def _qualname(obj: object) -> str:
    module = getattr(obj, "__module__", "?")
    qual = getattr(obj, "__qualname__", repr(obj))
    return f"{module}.{qual}"
