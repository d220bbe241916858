"""Methods: one module in this package per method, registered by name.

Modules in ``blocklora/methods/`` are discovered on first lookup; a method living elsewhere is
loaded by naming its module (``module=`` here, ``module:`` in config.yaml). A method module
imports what it builds on (:mod:`~blocklora.methods.base`, :mod:`~blocklora.methods.frozen`,
:mod:`~blocklora.methods.prompting`, :mod:`~blocklora.methods.registry`), never this package's
other methods.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from blocklora import hparams
from blocklora.methods.base import EVAL_DEFAULTS, TRAIN_DEFAULTS, FewShotTask, Method
from blocklora.methods.frozen import FeatureMethod
from blocklora.methods.registry import REGISTRY, register_method

# Modules of this package that define no method: what methods are built from.
FOUNDATIONS = ("base", "frozen", "prompting", "registry")
_discovered = False


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.name not in FOUNDATIONS:
            importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str, module: str | None = None) -> type[Method]:
    """The method class registered as ``name`` (importing ``module`` first, if given)."""
    if module:
        importlib.import_module(module)
    _discover()
    if name not in REGISTRY:
        raise ValueError(
            f"unknown method {name!r}; registered: {', '.join(sorted(REGISTRY))}. A new method is a module "
            "in blocklora/methods/ with a @register_method class (or name its module with module:)"
        )
    return REGISTRY[name]


def method_names() -> list[str]:
    _discover()
    return sorted(REGISTRY)


def configured_method(
    name: str,
    module: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    dataset: str | None = None,
    shots: int | None = None,
) -> tuple[type[Method], dict[str, Any]]:
    """The method class registered as ``name`` and its hyper-parameters for a run on ``dataset``
    with ``shots`` (:func:`resolve_hparams`)."""
    method = get_method(name, module)
    return method, resolve_hparams(method, overrides, dataset=dataset, shots=shots)


def resolve_hparams(
    method: type[Method],
    overrides: dict[str, Any] | None = None,
    *,
    dataset: str | None = None,
    shots: int | None = None,
) -> dict[str, Any]:
    """The method's defaults, its rules for ``dataset`` and ``shots``, then ``overrides`` (with their
    own ``when`` rules), checked and coerced (:func:`blocklora.hparams.resolve`)."""
    return hparams.resolve(
        method.name,
        method.all_defaults(),
        method.all_types(),
        overrides,
        rules=method.when,
        dataset=dataset,
        shots=shots,
    )


__all__ = [
    "EVAL_DEFAULTS",
    "TRAIN_DEFAULTS",
    "FeatureMethod",
    "FewShotTask",
    "Method",
    "configured_method",
    "get_method",
    "method_names",
    "register_method",
    "resolve_hparams",
]
