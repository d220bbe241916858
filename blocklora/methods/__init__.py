"""The method registry: a method is one module in this package, registered by name.

Modules in ``blocklora/methods/`` are discovered on first lookup; a method living elsewhere is
loaded by naming its module (``module=`` here, ``module:`` in config.yaml).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from blocklora.methods.base import EVAL_DEFAULTS, TRAIN_DEFAULTS, FewShotTask, Method

_REGISTRY: dict[str, type[Method]] = {}
_discovered = False


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(
            f"method name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str, module: str | None = None) -> type[Method]:
    """The method class registered as ``name`` (importing ``module`` first, if given)."""
    if module:
        importlib.import_module(module)
    _discover()
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown method {name!r}; registered: {', '.join(sorted(_REGISTRY))}. A new method is a module "
            "in blocklora/methods/ with a @register_method class (or name its module with module:)"
        )
    return _REGISTRY[name]


def method_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def resolve_hparams(method: type[Method], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's defaults updated by ``overrides``; an unknown key is an error naming it."""
    defaults = method.all_defaults()
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {unknown} for method {method.name!r}; known: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **overrides}


__all__ = [
    "EVAL_DEFAULTS",
    "TRAIN_DEFAULTS",
    "FewShotTask",
    "Method",
    "get_method",
    "method_names",
    "register_method",
    "resolve_hparams",
]
