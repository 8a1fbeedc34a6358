"""Heads, created by name like timm models: ``create_head("slots", in_dims, num_classes, num_slots=11)``.

Every head is an ``nn.Module`` with ``task`` ("classify" | "detect"),
``forward(features) -> outputs``, ``loss(outputs, targets) -> {"loss": total, ...parts}``,
``metrics(outputs, targets) -> {name: (sum, count)}`` and ``decode(...)``; see the
contract in each head's docstring. A head file registers itself with ``@register_head(name)``.
"""
from __future__ import annotations

import importlib
import inspect

from torch import nn

from metaldefect.errors import ConfigError

_HEADS: dict[str, type[nn.Module]] = {}

# Modules under metaldefect.models.heads that define heads; imported on first use.
HEAD_MODULES = ("classifier", "single", "slots", "dense", "ensemble")


def register_head(name: str):
    """Class decorator adding a head to the registry under ``name``."""
    def decorator(cls):
        _HEADS[name] = cls
        cls.head_name = name
        return cls
    return decorator


def _load_builtin_heads() -> None:
    for module in HEAD_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def list_heads() -> list[str]:
    _load_builtin_heads()
    return sorted(_HEADS)


def head_class(name: str) -> type[nn.Module]:
    """The registered class of head ``name`` (its ``task`` attribute says "classify" or "detect")."""
    _load_builtin_heads()
    if name not in _HEADS:
        raise ConfigError(f"unknown head {name!r}; known heads: {', '.join(sorted(_HEADS))}")
    return _HEADS[name]


def create_head(name: str, in_dims: dict, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered head; unknown names and bad keyword arguments raise ConfigError."""
    cls = head_class(name)
    parameters = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(set(kwargs) - set(parameters)) if not accepts_any else []
    if unknown:
        options = sorted(set(parameters) - {"self", "in_dims", "num_classes"})
        raise ConfigError(f"head {name!r}: unknown option {unknown[0]!r} (options: {', '.join(options)})")
    return cls(in_dims, num_classes, **kwargs)
