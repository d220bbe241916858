"""Hyper-parameters: names and types checked against a method's defaults, values coerced where they
arrive as text. Light to import: the workflow checks config.yaml with it before any job runs, and
every job checks its own hyper-parameters with it again.

A method declares each hyper-parameter's type by its default (``0.5`` is a number, ``[0.9, 0.999]``
a list, …) or, where the default does not say it (``None``, a flag that also takes a mode), by a
spec in ``hparam_types``: ``"int"``, ``"float"`` (an int is accepted), ``"bool"``, ``"str"``,
``"list"``, ``"dict"``, ``"null"``, ``"any"``, or several joined by ``|`` (``"int|null"``).
Text such as ``"4"``, ``"true"``, ``"null"`` or ``"[0.5, 1.0]"`` (what ``snakemake --config``
gives for nested values) becomes the value the spec asks for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

TYPES = ("int", "float", "bool", "str", "list", "dict", "null", "any")
_NULLS = ("null", "none", "~", "")
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def type_of_default(value: Any) -> str:
    """The spec a default implies: ``None`` says nothing (``"any"``)."""
    if value is None:
        return "any"
    for spec, kind in (
        ("bool", bool),
        ("int", int),
        ("float", float),
        ("str", str),
        ("list", list),
        ("dict", dict),
    ):
        if isinstance(value, kind):
            return spec
    return "any"


def _matches(value: Any, spec: str) -> bool:
    if spec == "any":
        return True
    if spec == "null":
        return value is None
    if spec == "bool":
        return isinstance(value, bool)
    if spec == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "list": list | tuple, "dict": dict}[spec])


def _from_text(text: str, spec: str) -> tuple[bool, Any]:
    """(parsed, value): ``text`` read as ``spec``; parsed is False when it cannot be."""
    lowered = text.strip().lower()
    try:
        if spec == "null" and lowered in _NULLS:
            return True, None
        if spec == "bool" and lowered in _TRUE + _FALSE:
            return True, lowered in _TRUE
        if spec == "int":
            return True, int(text)
        if spec == "float":
            return True, float(text)
        if spec in ("list", "dict"):
            value = yaml.safe_load(text)
            return _matches(value, spec), value
    except (ValueError, yaml.YAMLError):
        return False, None
    return False, None


def coerce(value: Any, spec: str) -> Any:
    """``value`` as ``spec`` asks, converting text (and the items of lists of text); ValueError if it is not."""
    options = [s.strip() for s in spec.split("|")]
    unknown = [s for s in options if s not in TYPES]
    if unknown:
        raise ValueError(f"unknown type {unknown[0]!r} in spec {spec!r}: use {', '.join(TYPES)}")
    if any(_matches(value, s) for s in options):
        if isinstance(value, list | tuple):
            return [_plain(item) for item in value]
        return value
    if isinstance(value, str):
        for option in options:  # text that reads as another option is that option ("null" is None)
            parsed, result = _from_text(value, option)
            if parsed:
                return [_plain(item) for item in result] if isinstance(result, list) else result
        if "str" in options:
            return value
    raise ValueError(f"expected {' or '.join(options)}, got {value!r}")


def _plain(item: Any) -> Any:
    """List items as YAML would type them (``"0.5"`` -> 0.5), so coerced lists equal written ones."""
    if isinstance(item, str):
        try:
            parsed = yaml.safe_load(item)
        except yaml.YAMLError:
            return item
        return parsed if isinstance(parsed, int | float | bool) or parsed is None else item
    return item


def resolve(
    method: str,
    defaults: Mapping[str, Any],
    types: Mapping[str, str],
    overrides: Mapping[str, Any] | None,
    *,
    where: str = "",
) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``, each checked and coerced to its type.

    An unknown name or a value of the wrong type is a ValueError that names the method, the
    hyper-parameter, what it expects and ``where`` it was set.
    """
    overrides = dict(overrides or {})
    prefix = f"{where}: " if where else ""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(
            f"{prefix}unknown hyper-parameter(s) {unknown} for method {method!r}; "
            f"known: {', '.join(sorted(defaults))}"
        )
    resolved = dict(defaults)
    for key, value in overrides.items():
        spec = types.get(key) or type_of_default(defaults[key])
        try:
            resolved[key] = coerce(value, spec)
        except ValueError as exc:
            raise ValueError(
                f"{prefix}hyper-parameter {key!r} of method {method!r}: {exc} (default {defaults[key]!r})"
            ) from None
    return resolved
