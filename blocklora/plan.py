"""The plan: config.yaml's suites expanded into the runs, transfers and profiles to make, each keyed
by what it is, so that whatever several suites ask for is made once.

A run is keyed by the backbone with its weights, the method with its resolved hyper-parameters, the
dataset, the shot count and the seed, and lives in a folder that reads as such::

    runs/<backbone>_<weights>/<dataset>/<method>-<hash>/shots<K>_seed<S>/record.json

``<hash>`` is a short sha256 of the library method and the hyper-parameters the run resolves to
(defaults, overrides, and the ``when`` rules that apply to its dataset and shot count:
``blocklora_n8`` and ``blocklora`` with the same values are one run, and a rule for one dataset
leaves the runs of the others where they were); the record holds the full configuration. A method that learns nothing from the few-shot set (zero-shot CLIP) runs once per
dataset, in ``…/<method>-<hash>/any_shots/``, and the tables show it under every shot count. A
transfer (a trained run tested on another dataset) lives among the target's runs in
``…/<cell>_from_<source>/``; a profile in ``profile/<backbone>_<weights>/<method>-<hash>/classes<C>.json``.
Suites differ only in which of these their report gathers, under which labels (their entries of
``methods:``).

A method entry with ``rule: NAME`` is a baseline made by a rule of the workflow rather than by the
library (README, "Adding a baseline as a rule"): its runs are that rule's jobs, in
``runs/<backbone>_<weights>/<dataset>/<rule>-<hash>/shots<K>_seed<S>/`` (the hash of the rule and its
hyper-parameters, which are free-form: the rule's script checks them), with no profile and no transfer.

Building the plan checks everything a job would otherwise find out hours later: suite, dataset and
method names, every hyper-parameter's name and type (against the method catalog, with the library's
own errors), which methods can be tested on other classes, and the file of published numbers the
reports show (config ``published:``). Values that ``snakemake --config`` hands over as text
(``shots: ["4"]``) are first given the types the schema asks for.

Light to import (no torch): the Snakefile builds a plan on every invocation; ``blocklora plan``
prints one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocklora import hparams as hp_types
from blocklora.catalog import load_catalog

METHOD_KEYS = ("method", "module", "rule")  # keys of a `methods:` entry that are not hyper-parameters
DEMO_CHECKPOINT = "demo/backbone.pt"  # under results_dir; built by the demo pre-training rule
PUBLISHED = "workflow/published/few_shot.yaml"  # config `published:` when not given; under the repository
FIXTURES = "fixtures"  # under the rehearsal's results_dir: the fixture archives and sources.json
MODEL_CONFIGS = Path(__file__).resolve().with_name("model_configs")  # blocklora's backbones (demo-tiny)
# What one job of each kind asks a scheduler for, where config `resources:` does not say (it does in
# config.yaml): train (train and transfer jobs, and the runs of rule-made baselines), profile, pretrain
# (the demo's pre-training, on CPU), data (download and prepare) and other (every other job: few-shot
# files, synthetic data, fixtures, reports). gpu: GPUs, mem_mb: MB, runtime: minutes, threads: CPUs.
DEFAULT_RESOURCES: dict[str, dict[str, int]] = {
    "train": {"gpu": 1, "mem_mb": 32000, "runtime": 240, "threads": 1},
    "profile": {"gpu": 1, "mem_mb": 32000, "runtime": 30, "threads": 1},
    "pretrain": {"mem_mb": 8000, "runtime": 120, "threads": 8},
    "data": {"mem_mb": 8000, "runtime": 480},
    "other": {"mem_mb": 2000, "runtime": 60},
}


class ConfigError(ValueError):
    """A mistake in config.yaml or --config, named with where it is and what to write instead."""


# ------------------------------------------------------------------ the config as typed values


def coerce_config(config: dict, schema: Mapping[str, Any]) -> dict:
    """Give text values the types ``schema`` asks for, in place (``snakemake --config`` passes nested
    values as text: ``suites={paper: {shots: [4]}}`` arrives as ``["4"]``); returns ``config``."""
    _coerce_node(config, schema, schema)
    return config


def _resolve_ref(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in node:
        target: Any = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def _coerce_node(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    schema = _resolve_ref(schema, root)
    if "oneOf" in schema:
        for option in schema["oneOf"]:
            option = _resolve_ref(option, root)
            if "const" in option and value == option["const"]:
                return value
        for option in schema["oneOf"]:
            if "const" not in _resolve_ref(option, root):
                return _coerce_node(value, option, root)
        return value
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if isinstance(value, str) and kinds and "string" not in kinds:
        spec = "|".join({"integer": "int", "number": "float", "boolean": "bool", "null": "null",
                         "array": "list", "object": "dict"}[k] for k in kinds)  # fmt: skip
        try:
            value = hp_types.coerce(value, spec)
        except ValueError:
            return value  # the schema validation names it
    if isinstance(value, list) and "items" in schema:
        value[:] = [_coerce_node(item, schema["items"], root) for item in value]
    elif isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key in list(value):
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                value[key] = _coerce_node(value[key], sub, root)
    return value


def load_config(
    configfile: str | Path, overrides: Iterable[str] = (), *, suites: Iterable[str] | None = None
) -> Plan:
    """The plan the workflow would build from ``configfile`` and ``--config``-style ``KEY=VALUE``
    overrides (merged into the config as snakemake merges them), checked against the workflow's schema."""
    import jsonschema
    import yaml

    configfile = Path(configfile)
    if not configfile.is_file():
        raise FileNotFoundError(f"no config file {configfile}; run from the repository or give --configfile")
    config = yaml.safe_load(configfile.read_text())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config takes KEY=VALUE, got {item!r}")
        _merge(config, {key: yaml.load(text, Loader=yaml.BaseLoader) if text else None})
    schema_file = configfile.resolve().parent / "workflow" / "schemas" / "config.schema.yaml"
    schema = yaml.safe_load(schema_file.read_text())
    coerce_config(config, schema)
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "the config"
        raise ConfigError(f"{where}: {exc.message}") from None
    return Plan(config, suites=suites, root=configfile.resolve().parent)


def _merge(config: dict, update: Mapping[str, Any]) -> None:
    """Nested dicts merged, everything else replaced: what ``snakemake --config`` does."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(config.get(key), dict):
            _merge(config[key], value)
        else:
            config[key] = value


# ------------------------------------------------------------------ what a run is


@dataclass(frozen=True)
class Setup:
    """A backbone with its weights: ``pretrained`` as written in the config (a tag, a checkpoint
    file, ``demo`` for the demo's pre-trained tiny CLIP, or None for random weights)."""

    backbone: str
    pretrained: str | None

    @property
    def folder(self) -> str:
        if self.pretrained is None:
            weights = "random"
        elif self.pretrained == "demo" or ("/" not in self.pretrained and "." not in self.pretrained):
            weights = self.pretrained
        else:
            digest = hashlib.sha256(str(Path(self.pretrained).resolve()).encode()).hexdigest()[:6]
            weights = f"{Path(self.pretrained).stem}-{digest}"
        return f"{self.backbone}_{weights}"


@dataclass(frozen=True)
class MethodSetup:
    """A registered method with its hyper-parameters: the overrides the config gives and, for a
    method in the catalog, the resolved values the run will use (both as canonical JSON).

    A method made by a rule of the workflow (``rule``) has the rule's name as ``library``, and its
    free-form hyper-parameters, ``when`` rules applied, as its resolved values."""

    library: str
    module: str | None
    # how the config says it; the run is what the values resolve to
    overrides_json: str = field(compare=False)
    resolved_json: str
    needs_fewshot: bool = True
    class_agnostic: bool = True
    rule: str | None = None

    @property
    def overrides(self) -> dict[str, Any]:
        return json.loads(self.overrides_json)

    @property
    def hparams(self) -> dict[str, Any]:
        """The resolved hyper-parameters (for a method outside the catalog: its overrides)."""
        return json.loads(self.resolved_json)

    @property
    def folder(self) -> str:
        if self.rule:
            key: dict[str, Any] = {"rule": self.rule, "hparams": self.hparams}
        else:
            key = {"method": self.library, "module": self.module, "hparams": self.hparams}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return f"{self.library}-{digest[:8]}"


def _canonical(mapping: Mapping[str, Any]) -> str:
    return json.dumps(mapping, sort_keys=True)


@dataclass(frozen=True)
class Run:
    """One trained (or, for zero-shot, evaluated) method on one dataset's few-shot subset."""

    setup: Setup
    method: MethodSetup
    dataset: str
    shots: int | None  # None: the method does not use the few-shot set
    seed: int | None

    @property
    def cell(self) -> str:
        return "any_shots" if self.shots is None else f"shots{self.shots}_seed{self.seed}"

    @property
    def folder(self) -> str:
        return f"runs/{self.setup.folder}/{self.dataset}/{self.method.folder}/{self.cell}"


@dataclass(frozen=True)
class Transfer:
    """A run's learned state tested on another dataset's test split."""

    run: Run
    target: str

    @property
    def folder(self) -> str:
        run = self.run
        return f"runs/{run.setup.folder}/{self.target}/{run.method.folder}/{run.cell}_from_{run.dataset}"


@dataclass(frozen=True)
class Profile:
    setup: Setup
    method: MethodSetup
    classes: int

    @property
    def path(self) -> str:
        return f"profile/{self.setup.folder}/{self.method.folder}/classes{self.classes}.json"


@dataclass
class SuitePlan:
    """What one suite's report gathers, under its labels (entries of ``methods:``)."""

    name: str
    note: str | None
    datasets: list[str]
    targets: list[str]
    entries: list[str]
    shots: list[int]
    seeds: list[int]
    runs: list[tuple[str, Run]] = field(default_factory=list)
    transfers: list[tuple[str, Transfer]] = field(default_factory=list)
    profiles: list[tuple[str, Profile]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # datasets named by `without:`


# ------------------------------------------------------------------ the plan


class Plan:
    """The whole config, checked and expanded; paths are relative to ``results``.

    ``root``: the folder a relative ``published:`` path is found in (the repository, beside the
    Snakefile; default: the current folder).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        suites: Iterable[str] | None = None,
        root: str | Path | None = None,
    ) -> None:
        self.config = copy.deepcopy(dict(config))
        self.rehearsing = bool(self.config.get("rehearse"))
        if self.rehearsing:
            _apply_rehearsal(self.config)
        cfg = self.config
        self.results = str(Path(cfg["results_dir"]))
        self.data_root = str(Path(cfg["data_root"]))
        self.archives_dir = cfg.get("archives_dir")
        self.sources = cfg.get("sources")
        self.device = cfg.get("device", "auto")
        self.without = list(cfg.get("without") or [])
        self.published = _published_file(cfg.get("published", PUBLISHED), root)
        self.catalog = load_catalog()
        self._check_names()
        if self.rehearsing:
            chosen = list(cfg["rehearsal"]["suites"])
        elif suites is not None:
            chosen = list(suites)
        else:
            chosen = _as_list(cfg["suite"])
        self.chosen = chosen
        self.suites = {name: self._expand(name) for name in chosen}
        # which chosen suites ask for each run, transfer and profile (their resources decide the job's)
        self._asked_by: dict[str, set[str]] = {}
        for name, plan in self.suites.items():
            for key in [
                *(run.folder for _, run in plan.runs),
                *(t.folder for _, t in plan.transfers),
                *(p.path for _, p in plan.profiles),
            ]:
                self._asked_by.setdefault(key, set()).add(name)

    # -------------------------------------------------------------- checks

    def _check_names(self) -> None:
        cfg = self.config
        suites, methods, datasets = cfg["suites"], cfg["methods"], cfg["datasets"]
        asked = cfg["rehearsal"]["suites"] if self.rehearsing else _as_list(cfg["suite"])
        for name in asked:
            if name not in suites:
                raise ConfigError(
                    f"unknown suite {name!r} (config key `suite`, e.g. --config suite=NAME); "
                    f"known suites: {_known(suites)}"
                )
        for dataset in self.without:
            if dataset not in datasets:
                raise ConfigError(f"`without:` names unknown dataset {dataset!r}; known: {_known(datasets)}")
        for name, suite in suites.items():
            for dataset in [*suite["datasets"], *suite.get("targets", [])]:
                if dataset not in datasets:
                    raise ConfigError(
                        f"suite {name!r} names unknown dataset {dataset!r}; "
                        f"known datasets (config `datasets:`): {_known(datasets)}"
                    )
            chosen = self.entries(name)
            for entry in chosen:
                if entry not in methods:
                    raise ConfigError(
                        f"suite {name!r} names unknown method {entry!r}; "
                        f"known methods (config `methods:`): {_known(methods)}"
                    )
            for entry in suite.get(
                "hparams", {}
            ):  # entries it does not run are fine: a subset of its methods
                if entry not in methods:
                    raise ConfigError(
                        f"suite {name!r} has hparams for unknown method {entry!r}; "
                        f"known methods (config `methods:`): {_known(methods)}"
                    )
            uses_demo = suite["pretrained"] == "demo" or any(
                datasets[d].get("synthetic") for d in suite["datasets"]
            )
            if uses_demo and "demo" not in cfg:
                raise ConfigError(
                    f"suite {name!r} uses the demo backbone or data, but config has no `demo:` section"
                )
        for name, entry in methods.items():
            for key in METHOD_KEYS:
                if key in entry and not isinstance(entry[key], str):
                    raise ConfigError(f"method entry {name!r}: `{key}` must be a string, got {entry[key]!r}")
            if "rule" in entry:
                self._check_rule_entry(name, entry)
                continue
            library = entry.get("method", name)
            if not entry.get("module") and library not in self.catalog:
                raise ConfigError(
                    f"method entry {name!r} runs unknown method {library!r}; registered: "
                    f"{_known(self.catalog)}. A new method is a module in blocklora/methods/ with a "
                    "@register_method class (then `blocklora methods --write-catalog`), or name its module with module:"
                )

    def _check_rule_entry(self, name: str, entry: Mapping[str, Any]) -> None:
        """A `rule:` entry names a rule (checked against the workflow's rules once they are read:
        ``workflow/rules/common.smk``) that cannot be mistaken for the library's methods."""
        rule = entry["rule"]
        where = f"method entry {name!r}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule):
            raise ConfigError(f"{where}: `rule: {rule}` is not a rule name (letters, digits and _)")
        given = [key for key in ("method", "module") if key in entry]
        if given:
            raise ConfigError(
                f"{where}: `rule: {rule}` says its runs are made by that rule, not by the library: drop "
                f"`{'` and `'.join(given)}`"
            )
        if rule in self.library_methods():
            raise ConfigError(
                f"{where}: rule {rule!r} has the name of a method of the library, so their run folders would "
                "be one; rename the rule"
            )

    def library_methods(self) -> set[str]:
        """The methods the library's train, transfer and profile jobs run: the catalog's, and those of
        entries with ``module:``."""
        methods = self.config["methods"]
        return set(self.catalog) | {
            spec.get("method", name) for name, spec in methods.items() if spec.get("module")
        }

    def external_rules(self) -> dict[str, list[str]]:
        """``{rule: [method entries]}``: the rules that make the runs of entries with ``rule:``."""
        rules: dict[str, list[str]] = {}
        for name, spec in self.config["methods"].items():
            if spec.get("rule"):
                rules.setdefault(spec["rule"], []).append(name)
        return rules

    def entries(self, suite: str) -> list[str]:
        """The method entries a suite runs (``all`` = every entry of ``methods:``, in file order)."""
        methods = self.config["suites"][suite]["methods"]
        return list(self.config["methods"]) if methods == "all" else list(methods)

    def method_setup(
        self, suite: str, entry: str, dataset: str | None = None, shots: int | None = None
    ) -> MethodSetup:
        """One entry of ``methods:`` as ``suite`` configures it for a run on ``dataset`` with ``shots``
        (rules of ``when`` applied; none for a profile), its hyper-parameters checked."""
        spec = self.config["methods"][entry]
        library, module, rule = spec.get("method", entry), spec.get("module"), spec.get("rule")
        overrides = {k: v for k, v in spec.items() if k not in METHOD_KEYS}
        suite_overrides = dict(self.config["suites"][suite].get("hparams", {}).get(entry, {}))
        where = f"suite {suite!r}, method entry {entry!r}"
        rules = []  # the entry's, then the suite's
        for given in (overrides.pop(hp_types.WHEN, None), suite_overrides.pop(hp_types.WHEN, None)):
            if given is not None and not isinstance(given, list):
                raise ConfigError(
                    f"{where}: `when` of method {library!r} takes a list of rules, got {given!r}"
                )
            rules += given or []
        overrides.update(suite_overrides)
        if rule:
            return self._rule_setup(rule, overrides, rules, where, dataset, shots)
        if module:  # not in the catalog: checked when its first job starts
            given = {**overrides, hp_types.WHEN: rules} if rules else overrides
            return MethodSetup(library, module, _canonical(given), _canonical(given))
        known = self.catalog[library]
        try:
            checked = hp_types.check_rules(library, rules, known["defaults"], known["types"], where=where)
            self._check_rule_datasets(checked, where)
            if rules:
                overrides[hp_types.WHEN] = rules
            resolved = hp_types.resolve(
                library,
                known["defaults"],
                known["types"],
                overrides,
                where=where,
                rules=known["when"],
                dataset=dataset,
                shots=shots,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        typed = {k: resolved[k] for k in overrides if k != hp_types.WHEN}
        if checked:
            typed[hp_types.WHEN] = checked
        return MethodSetup(
            library,
            None,
            _canonical(typed),
            _canonical(resolved),
            needs_fewshot=known["needs_fewshot"],
            class_agnostic=known["class_agnostic"],
        )

    def _rule_setup(
        self,
        rule: str,
        overrides: dict[str, Any],
        rules: list[Any],
        where: str,
        dataset: str | None,
        shots: int | None,
    ) -> MethodSetup:
        """A rule-made method: its free-form hyper-parameters (text from ``--config`` read as YAML
        scalars) with the ``when`` rules that apply to ``dataset`` and ``shots``."""
        overrides = {key: _yaml_typed(value) for key, value in overrides.items()}
        names = set(overrides) | {
            key
            for r in rules
            if isinstance(r, Mapping) and isinstance(r.get("set"), Mapping)
            for key in r["set"]
        }
        try:
            checked = hp_types.check_rules(rule, _yaml_typed(rules), dict.fromkeys(names), {}, where=where)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._check_rule_datasets(checked, where)
        resolved = {**overrides, **hp_types.rule_values(checked, dataset, shots)}
        given = {**overrides, hp_types.WHEN: checked} if checked else overrides
        return MethodSetup(
            rule, None, _canonical(given), _canonical(resolved), class_agnostic=False, rule=rule
        )

    def _check_rule_datasets(self, rules: list[dict[str, Any]], where: str) -> None:
        """A rule naming a dataset the config does not know would silently never apply."""
        for number, rule in enumerate(rules, 1):
            for dataset in rule.get("dataset", []):
                if dataset not in self.config["datasets"]:
                    raise ConfigError(
                        f"{where}: rule {number} of `when` names unknown dataset {dataset!r}; "
                        f"known datasets (config `datasets:`): {_known(self.config['datasets'])}"
                    )

    # -------------------------------------------------------------- expansion

    def setup(self, suite: str) -> Setup:
        s = self.config["suites"][suite]
        return Setup(s["backbone"], s["pretrained"])

    def _expand(self, name: str) -> SuitePlan:
        s = self.config["suites"][name]
        datasets = [d for d in s["datasets"] if d not in self.without]
        targets = [d for d in s.get("targets", []) if d not in self.without]
        if not datasets:
            raise ConfigError(
                f"suite {name!r} trains only on {', '.join(s['datasets'])}, which `without:` leaves out; "
                "prepare that dataset, or run another suite"
            )
        plan = SuitePlan(
            name=name,
            note=s.get("note"),
            datasets=datasets,
            targets=targets,
            entries=self.entries(name),
            shots=list(s["shots"]),
            seeds=list(s["seeds"]),
            left_out=[d for d in [*s["datasets"], *s.get("targets", [])] if d in self.without],
        )
        setup = self.setup(name)
        for entry in plan.entries:
            method = self.method_setup(name, entry)
            if method.rule and s.get("targets"):
                raise ConfigError(
                    f"suite {name!r}: method entry {entry!r} is made by rule {method.rule!r}, whose runs cannot "
                    f"be tested on other datasets (targets: {', '.join(s['targets'])}); drop it from this "
                    "suite's methods"
                )
            cells = (
                [(k, seed) for k in plan.shots for seed in plan.seeds]
                if method.needs_fewshot
                else [(None, None)]
            )
            for dataset in datasets:
                for shots, seed in cells:
                    run = Run(setup, self.method_setup(name, entry, dataset, shots), dataset, shots, seed)
                    plan.runs.append((entry, run))
                    for target in targets:
                        self._check_transfer(name, entry, method, dataset, target)
                        plan.transfers.append((entry, Transfer(run, target)))
            if not method.rule:  # a rule's code is not the library's: nothing to profile
                plan.profiles.append((entry, Profile(setup, method, int(s["profile_classes"]))))
        return plan

    def _check_transfer(self, suite: str, entry: str, method: MethodSetup, source: str, target: str) -> None:
        if method.class_agnostic or self.same_labels(source, target):
            return
        raise ConfigError(
            f"suite {suite!r}: method entry {entry!r} learns parameters tied to {source}'s classes, so it "
            f"cannot be tested on {target}, which has other classes; drop it from this suite's methods"
        )

    @staticmethod
    def same_labels(source: str, target: str) -> bool:
        """True when ``target`` is labelled with ``source``'s classes (ImageNet and its variants)."""
        from blocklora.data.registry import builtin_spec

        target_spec, source_spec = builtin_spec(target), builtin_spec(source)
        if target_spec is None or not target_spec.imagenet_labels:
            return False
        return source == "imagenet" or (source_spec is not None and source_spec.imagenet_labels)

    # -------------------------------------------------------------- what the workflow asks

    def all_runs(self) -> dict[str, Run]:
        return {run.folder: run for plan in self.suites.values() for _, run in plan.runs}

    def all_transfers(self) -> dict[str, Transfer]:
        return {t.folder: t for plan in self.suites.values() for _, t in plan.transfers}

    def all_profiles(self) -> dict[str, Profile]:
        return {p.path: p for plan in self.suites.values() for _, p in plan.profiles}

    def pretrained_arg(self, setup: Setup) -> str:
        if setup.pretrained is None:
            return "none"
        if setup.pretrained == "demo":
            return f"{self.results}/{DEMO_CHECKPOINT}"
        return setup.pretrained

    def checkpoint_inputs(self, setup: Setup) -> list[str]:
        """The local checkpoint a backbone loads, if any (a job input; built when it is the demo's)."""
        if setup.pretrained == "demo":
            return [f"{self.results}/{DEMO_CHECKPOINT}"]
        if setup.pretrained and Path(setup.pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"}:
            return [setup.pretrained]
        return []

    def method_args(self, setup: Setup, method: MethodSetup) -> list[str]:
        """The flags of `train`, `transfer` and `profile` that say which method, how configured, on
        which backbone and device."""
        args = ["--method", method.library]
        if method.module:
            args += ["--module", method.module]
        return [
            *args,
            "--hparams",
            method.overrides_json,
            "--backbone",
            setup.backbone,
            "--pretrained",
            self.pretrained_arg(setup),
            "--device",
            self.device,
        ]

    def rule_inputs(self, run: Run) -> dict[str, Any]:
        """The input files of a rule-made run: the prepared split, the few-shot file, the backbone's
        checkpoint file (a list: empty for an open_clip tag or random weights)."""
        return {
            "split": self.split_file(run.dataset),
            "fewshot": self.fewshot_file(run),
            "checkpoint": self.checkpoint_inputs(run.setup),
        }

    def rule_params(self, run: Run) -> dict[str, str]:
        """What a rule-made run is, as text for its command line (README, "Adding a baseline as a rule")."""
        return {
            "method": str(run.method.rule),
            "dataset": run.dataset,
            "shots": str(run.shots),
            "seed": str(run.seed),
            "backbone": run.setup.backbone,
            "pretrained": self.pretrained_arg(run.setup),
            "model_configs": str(MODEL_CONFIGS),
            "image_root": self.image_root(run.dataset),
            "hparams": run.method.resolved_json,
            "device": self.device,
            "run_dir": f"{self.results}/{run.folder}",
        }

    def split_file(self, dataset: str) -> str:
        return f"{self.data_root}/{dataset}/split.json"

    def image_root(self, dataset: str) -> str:
        return str(Path(self.data_root, dataset, self.config["datasets"][dataset]["image_dir"]))

    def fewshot_file(self, run: Run) -> str:
        """The few-shot subset a run trains on (the whole split for a method that needs none)."""
        if run.shots is None:
            return self.split_file(run.dataset)
        return f"{self.results}/fewshot/{run.dataset}/shots{run.shots}_seed{run.seed}.json"

    def report_args(self, suite: str) -> list[str]:
        """`blocklora report` arguments: every record and profile with its label, table order, note."""
        plan = self.suites[suite]
        args = ["--records"]
        args += [f"{label}={self.results}/{run.folder}/record.json" for label, run in plan.runs]
        args += [f"{label}={self.results}/{t.folder}/record.json" for label, t in plan.transfers]
        args += ["--profiles", *(f"{label}={self.results}/{p.path}" for label, p in plan.profiles)]
        args += ["--methods", *plan.entries, "--datasets", *plan.datasets, *plan.targets]
        args += ["--shots", *map(str, plan.shots)]
        if self.published:
            args += ["--published", self.published]
        if plan.note:
            args += ["--note", plan.note]
        if plan.targets:  # a transfer suite: the average is over the datasets it transfers to
            args += ["--average-over", *plan.targets]
        if plan.left_out:
            args += ["--left-out", *plan.left_out]
        return args

    def report_inputs(self, suite: str) -> dict[str, list[str]]:
        """The report's input files: records, profiles and the published numbers (editing them re-makes it)."""
        plan = self.suites[suite]
        return {
            "records": [f"{self.results}/{run.folder}/record.json" for _, run in plan.runs]
            + [f"{self.results}/{t.folder}/record.json" for _, t in plan.transfers],
            "profiles": [f"{self.results}/{p.path}" for _, p in plan.profiles],
            "published": [self.published] if self.published else [],
        }

    def report_dir(self, suite: str) -> str:
        return f"{self.results}/{suite}/report"

    def suite_resources(self, suite: str) -> dict[str, dict[str, int]]:
        """What each kind of job of ``suite`` asks for: the suite's own ``resources:`` over the
        top-level ``resources:`` over :data:`DEFAULT_RESOURCES`, key by key."""
        merged = copy.deepcopy(DEFAULT_RESOURCES)
        for layer in (self.config.get("resources"), self.config["suites"][suite].get("resources")):
            for kind, values in (layer or {}).items():
                merged[kind].update(values)
        return merged

    def job_resources(self, kind: str, key: str | None = None) -> dict[str, int]:
        """What one job of ``kind`` asks for. ``key`` (a run or transfer folder, a profile path) names
        the job: the suites that ask for it decide, each value the largest of theirs where several
        share it. Without a key (data, pre-training, few-shot files, reports), every chosen suite does."""
        if kind not in DEFAULT_RESOURCES:
            raise ConfigError(
                f"no job kind {kind!r} in `resources:`; known kinds: {_known(DEFAULT_RESOURCES)}"
            )
        suites = sorted(self._asked_by.get(key, ())) if key is not None else []
        wanted = [self.suite_resources(suite)[kind] for suite in suites or self.chosen]
        return {name: max(values[name] for values in wanted) for name in wanted[0]}

    def datasets_used(self) -> list[str]:
        """Every dataset the chosen suites train or test on, in config order."""
        used = {d for plan in self.suites.values() for d in [*plan.datasets, *plan.targets]}
        return [d for d in self.config["datasets"] if d in used]


def _published_file(path: str | None, root: str | Path | None) -> str | None:
    """Config ``published:`` as a path (relative ones under ``root``), its numbers checked; None to show none
    (``--config published=null`` passes the text ``null``)."""
    if path is None or path == "null":
        return None
    from blocklora.published import PublishedError, load_published

    resolved = Path(path) if Path(path).is_absolute() or root is None else Path(root) / path
    try:
        load_published(resolved)
    except PublishedError as exc:
        raise ConfigError(f"config `published:`: {exc}") from None
    return str(resolved)


def _yaml_typed(value: Any) -> Any:
    """Text read as a YAML scalar where it is one (``"8"`` -> 8, ``"true"`` -> True), in lists and
    mappings too: ``snakemake --config`` gives nested values as text."""
    if isinstance(value, list):
        return [_yaml_typed(item) for item in value]
    if isinstance(value, dict):
        return {key: _yaml_typed(item) for key, item in value.items()}
    return hp_types.plain(value) if isinstance(value, str) else value


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _known(values: Iterable[str]) -> str:
    return ", ".join(sorted(values)) or "(none)"


def _apply_rehearsal(config: dict) -> None:
    """The real suites on offline fixtures: a tiny backbone, few shots, the iterations cut."""
    rehearsal = config["rehearsal"]
    results = rehearsal["results_dir"]
    config["results_dir"] = results
    config["data_root"] = f"{results}/data"
    config["archives_dir"] = f"{results}/{FIXTURES}"
    config["sources"] = f"{results}/{FIXTURES}/sources.json"
    if "profile" in rehearsal:
        config["profile"] = {**config.get("profile", {}), **rehearsal["profile"]}
    for name in rehearsal["suites"]:
        suite = config["suites"][name]
        if "resources" in rehearsal:  # small jobs, whatever the real suite asks for
            suite["resources"] = {**suite.get("resources", {}), **copy.deepcopy(rehearsal["resources"])}
        for key in ("backbone", "pretrained", "shots", "seeds", "profile_classes"):
            if key in rehearsal:
                suite[key] = copy.deepcopy(rehearsal[key])
        entries = list(config["methods"]) if suite["methods"] == "all" else suite["methods"]
        overrides = suite["hparams"] = dict(suite.get("hparams") or {})  # defaults may share one dict
        for entry in entries:
            spec = config["methods"][entry]
            library = spec.get("rule") or spec.get("method", entry)
            cut = rehearsal.get("hparams", {}).get(library)
            if cut:
                overrides[entry] = {**overrides.get(entry, {}), **cut}
