"""Hyper-parameters: names and types checked against a method's defaults, values coerced where they
arrive as text. Light to import: the workflow checks config.yaml with it before any job runs, and
every job checks its own hyper-parameters with it again.

A method declares each hyper-parameter's type by its default (``0.5`` is a number, ``[0.9, 0.999]``
a list, …) or, where the default does not say it (``None``, a flag that also takes a mode), by a
spec in ``hparam_types``: ``"int"``, ``"float"`` (an int is accepted), ``"bool"``, ``"str"``,
``"list"``, ``"dict"``, ``"null"``, ``"any"``, or several joined by ``|`` (``"int|null"``).
Text such as ``"4"``, ``"true"``, ``"null"`` or ``"[0.5, 1.0]"`` (what ``snakemake --config``
gives for nested values) becomes the value the spec asks for.

Some values depend on the dataset or the shot count (ProGrad's λ at 8 and 16 shots on three
datasets, TaskRes's learning rate on ImageNet, CoOp's epochs per shot count). They are rules under
the reserved key ``when``, each a condition and the values it sets::

    when:
      - {dataset: imagenet, set: {lr: 2.0e-4}}
      - {dataset: [oxford_flowers, dtd, eurosat], shots: [8, 16], set: {lambda: 0.8}}

A rule applies to a run whose dataset and shot count it names (a condition it leaves out matches
every run). Precedence, lowest first: the method's defaults, the method's own rules, the flat
overrides, the overrides' rules; among rules, a later one wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

TYPES = ("int", "float", "bool", "str", "list", "dict", "null", "any")
WHEN = "when"  # the reserved key of the rules that set values per dataset and shot count
RULE_KEYS = ("dataset", "shots", "set")
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
            return [plain(item) for item in value]
        return value
    if isinstance(value, str):
        for option in options:  # text that reads as another option is that option ("null" is None)
            parsed, result = _from_text(value, option)
            if parsed:
                return [plain(item) for item in result] if isinstance(result, list) else result
        if "str" in options:
            return value
    raise ValueError(f"expected {' or '.join(options)}, got {value!r}")


def plain(item: Any) -> Any:
    """List items as YAML would type them (``"0.5"`` -> 0.5), so coerced lists equal written ones."""
    if isinstance(item, str):
        try:
            parsed = yaml.safe_load(item)
        except yaml.YAMLError:
            return item
        return parsed if isinstance(parsed, int | float | bool) or parsed is None else item
    return item


def _typed(
    method: str, defaults: Mapping[str, Any], types: Mapping[str, str], values: Mapping[str, Any], prefix: str
) -> dict[str, Any]:
    """``values`` checked against ``defaults`` (names) and coerced to their types."""
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(
            f"{prefix}unknown hyper-parameter(s) {unknown} for method {method!r}; "
            f"known: {', '.join(sorted(defaults))}"
        )
    typed = {}
    for key, value in values.items():
        spec = types.get(key) or type_of_default(defaults[key])
        try:
            typed[key] = coerce(value, spec)
        except ValueError as exc:
            raise ValueError(
                f"{prefix}hyper-parameter {key!r} of method {method!r}: {exc} (default {defaults[key]!r})"
            ) from None
    return typed


def _names(value: Any, what: str, kind: type, prefix: str) -> list:
    items = value if isinstance(value, list | tuple) else [value]
    try:
        items = [coerce(item, "int") if kind is int else item for item in items]
    except ValueError:
        items = [None]
    if not items or not all(isinstance(item, kind) and not isinstance(item, bool) for item in items):
        raise ValueError(
            f"{prefix}`{what}` of a `when` rule takes a {kind.__name__} or a list of them, got {value!r}"
        )
    return items


def check_rules(
    method: str,
    rules: Any,
    defaults: Mapping[str, Any],
    types: Mapping[str, str],
    *,
    where: str = "",
) -> list[dict[str, Any]]:
    """``when`` rules checked (conditions, hyper-parameter names and types) and normalized: every
    condition a list, every value coerced. A ValueError names the rule and what to write instead."""
    prefix = f"{where}: " if where else ""
    if rules is None:
        return []
    if not isinstance(rules, list | tuple):
        raise ValueError(f"{prefix}`when` of method {method!r} takes a list of rules, got {rules!r}")
    checked = []
    for number, rule in enumerate(rules, 1):
        at = f"{prefix}rule {number} of `when`: "
        if not isinstance(rule, Mapping):
            raise ValueError(f"{at}expected {{dataset: ..., shots: ..., set: {{...}}}}, got {rule!r}")
        unknown = sorted(set(rule) - set(RULE_KEYS))
        if unknown:
            raise ValueError(f"{at}unknown key(s) {unknown}; a rule has `dataset`, `shots` and `set`")
        if "set" not in rule or not isinstance(rule["set"], Mapping) or not rule["set"]:
            raise ValueError(f"{at}`set` must name the hyper-parameters it sets, e.g. set: {{lr: 0.001}}")
        if "dataset" not in rule and "shots" not in rule:
            raise ValueError(
                f"{at}name the `dataset` or the `shots` it applies to (or set the value directly)"
            )
        if WHEN in rule["set"]:
            raise ValueError(f"{at}rules do not nest: `set` cannot hold `when`")
        normalized: dict[str, Any] = {"set": _typed(method, defaults, types, rule["set"], at)}
        if "dataset" in rule:
            normalized["dataset"] = _names(rule["dataset"], "dataset", str, at)
        if "shots" in rule:
            normalized["shots"] = _names(rule["shots"], "shots", int, at)
        checked.append(normalized)
    return checked


def rule_values(rules: list[dict[str, Any]], dataset: str | None, shots: int | None) -> dict[str, Any]:
    """What the (checked) rules that apply to a run on ``dataset`` with ``shots`` set, later ones winning.

    A run with no dataset or no shot count (a profile, zero-shot) matches only rules that do not ask.
    """
    values: dict[str, Any] = {}
    for rule in rules:
        if "dataset" in rule and dataset not in rule["dataset"]:
            continue
        if "shots" in rule and shots not in rule["shots"]:
            continue
        values.update(rule["set"])
    return values


def resolve(
    method: str,
    defaults: Mapping[str, Any],
    types: Mapping[str, str],
    overrides: Mapping[str, Any] | None,
    *,
    where: str = "",
    rules: list[dict[str, Any]] | None = None,
    dataset: str | None = None,
    shots: int | None = None,
) -> dict[str, Any]:
    """The hyper-parameters of a run of ``method`` on ``dataset`` with ``shots``, each checked and
    coerced to its type.

    ``defaults`` updated by the method's own ``rules`` that apply, then by ``overrides``, then by
    the rules of ``overrides[WHEN]`` that apply (module docstring). An unknown name or a value of
    the wrong type is a ValueError that names the method, the hyper-parameter, what it expects and
    ``where`` it was set.
    """
    overrides = dict(overrides or {})
    prefix = f"{where}: " if where else ""
    own = check_rules(method, rules, defaults, types, where=f"method {method!r}")
    added = check_rules(method, overrides.pop(WHEN, None), defaults, types, where=where)
    resolved = dict(defaults)
    resolved.update(rule_values(own, dataset, shots))
    resolved.update(_typed(method, defaults, types, overrides, prefix))
    resolved.update(rule_values(added, dataset, shots))
    return resolved
