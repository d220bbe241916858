"""Validation of config.yaml and the input functions every rule file uses (no rules here)."""

import json
import os
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

RESULTS = os.path.normpath(config["results_dir"])
DATA_ROOT = os.path.normpath(config["data_root"])

# Jobs run `python -m blocklora.cli` with this checkout first on PYTHONPATH, in the current
# environment or in envs/blocklora.yaml (snakemake copies env files into .snakemake/conda/, so a
# relative `pip: -e ..` there would not find the package). Every snakemake process, cluster jobs
# included, parses this file, so every job inherits it.
REPO = str(Path(workflow.basedir).resolve())
if REPO not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)


envvars:
    "PYTHONPATH",


DEMO_CORPUS = f"{RESULTS}/demo/corpus.npz"
DEMO_CHECKPOINT = f"{RESULTS}/demo/backbone.pt"
# Method-entry keys that are not hyper-parameters.
METHOD_KEYS = ("method", "module")


def _known(values) -> str:
    return ", ".join(sorted(values)) or "(none)"


def suite_methods(suite: str) -> list[str]:
    """The method entries a suite runs (`all` = every entry of `methods:`, in file order)."""
    methods = config["suites"][suite]["methods"]
    return list(config["methods"]) if methods == "all" else list(methods)


def check_config() -> None:
    """Cross-references the JSON schema cannot express; stops before any job, naming the culprit."""
    suites, methods, datasets = config["suites"], config["methods"], config["datasets"]
    if config["suite"] not in suites:
        raise WorkflowError(
            f"unknown suite {config['suite']!r} (config key `suite`, e.g. --config suite=NAME); "
            f"known suites: {_known(suites)}"
        )
    for name, suite in suites.items():
        for dataset in [*suite["datasets"], *suite.get("targets", [])]:
            if dataset not in datasets:
                raise WorkflowError(
                    f"suite {name!r} names unknown dataset {dataset!r}; "
                    f"known datasets (config `datasets:`): {_known(datasets)}"
                )
        chosen = suite_methods(name)
        for method in chosen:
            if method not in methods:
                raise WorkflowError(
                    f"suite {name!r} names unknown method {method!r}; "
                    f"known methods (config `methods:`): {_known(methods)}"
                )
        for method in suite.get("hparams", {}):
            if method not in chosen:
                raise WorkflowError(
                    f"suite {name!r} has hparams for method {method!r}, which it does not run; "
                    f"its methods: {', '.join(chosen)}"
                )
        uses_demo = suite["pretrained"] == "demo" or any(datasets[d].get("synthetic") for d in suite["datasets"])
        if uses_demo and "demo" not in config:
            raise WorkflowError(f"suite {name!r} uses the demo backbone or data, but config has no `demo:` section")
    for name, entry in methods.items():
        for key in METHOD_KEYS:
            if key in entry and not isinstance(entry[key], str):
                raise WorkflowError(f"method entry {name!r}: `{key}` must be a string, got {entry[key]!r}")


check_config()
SUITE = config["suite"]


def _regex(names) -> str:
    """A wildcard constraint matching exactly these names (nothing when empty)."""
    names = sorted(names)
    return "|".join(names) if names else "(?!)"


SYNTHETIC = [name for name, spec in config["datasets"].items() if spec.get("synthetic")]
DOWNLOADED = [name for name, spec in config["datasets"].items() if not spec.get("synthetic")]


wildcard_constraints:
    suite=_regex(config["suites"]),
    dataset=_regex(config["datasets"]),
    source=_regex(config["datasets"]),
    target=_regex(config["datasets"]),
    method=_regex(config["methods"]),
    shots=r"\d+",
    seed=r"\d+",


# ------------------------------------------------------------------ paths


def split_file(dataset: str) -> str:
    return f"{DATA_ROOT}/{dataset}/split.json"


def image_root(dataset: str) -> str:
    return str(Path(DATA_ROOT, dataset, config["datasets"][dataset]["image_dir"]))


def fewshot_file(dataset: str, shots, seed) -> str:
    return f"{RESULTS}/fewshot/{dataset}/shots{shots}_seed{seed}.json"


def run_dir(suite: str, dataset: str, method: str, shots, seed) -> str:
    return f"{RESULTS}/runs/{suite}/{dataset}/{method}/shots{shots}_seed{seed}"


def profile_file(suite: str, method: str) -> str:
    return f"{RESULTS}/profile/{suite}/{method}.json"


def report_dir(suite: str) -> str:
    return f"{RESULTS}/{suite}/report"


def suite_records(suite: str) -> list[str]:
    s = config["suites"][suite]
    return [
        f"{run_dir(suite, dataset, method, shots, seed)}/record.json"
        for dataset in s["datasets"]
        for method in suite_methods(suite)
        for shots in s["shots"]
        for seed in s["seeds"]
    ]


def transfer_dir(suite: str, source: str, target: str, method: str, shots, seed) -> str:
    return f"{RESULTS}/runs/{suite}/{target}/{method}/shots{shots}_seed{seed}_from_{source}"


def suite_transfer_records(suite: str) -> list[str]:
    """Each trained run of the suite tested on each of its `targets:`."""
    s = config["suites"][suite]
    return [
        f"{transfer_dir(suite, source, target, method, shots, seed)}/record.json"
        for source in s["datasets"]
        for target in s.get("targets", [])
        for method in suite_methods(suite)
        for shots in s["shots"]
        for seed in s["seeds"]
    ]


def suite_profiles(suite: str) -> list[str]:
    return [profile_file(suite, method) for method in suite_methods(suite)]


# ------------------------------------------------------------------ per-job values


def library_method(method: str) -> str:
    """The registered library method a method entry runs (a variant names it with `method:`)."""
    return config["methods"][method].get("method", method)


def hparams(suite: str, method: str) -> dict:
    """Overrides for one (suite, method): the method entry, then the suite's own overrides."""
    entry = {k: v for k, v in config["methods"][method].items() if k not in METHOD_KEYS}
    return {**entry, **config["suites"][suite].get("hparams", {}).get(method, {})}


def method_args(wildcards) -> str:
    """The flags every job of one (suite, method entry) passes: which method, configured how, on which
    backbone and device (`train`, `transfer` and `profile` share them)."""
    method, suite = wildcards.method, wildcards.suite
    args = ["--method", library_method(method)]
    if config["methods"][method].get("module"):
        args += ["--module", config["methods"][method]["module"]]
    args += [
        "--name",
        method,
        "--hparams",
        json.dumps(hparams(suite, method), sort_keys=True),
        "--backbone",
        config["suites"][suite]["backbone"],
        "--pretrained",
        pretrained(suite),
        "--device",
        config["device"],
    ]
    return shlex.join(args)


def pretrained(suite: str) -> str:
    value = config["suites"][suite]["pretrained"]
    if value is None:
        return "none"
    return DEMO_CHECKPOINT if value == "demo" else value


def checkpoint_inputs(suite: str) -> list[str]:
    """The local checkpoint a suite's backbone loads, if any: a job input (built if it is the demo's)."""
    value = config["suites"][suite]["pretrained"]
    if value == "demo":
        return [DEMO_CHECKPOINT]
    if value and Path(value).suffix in {".pt", ".pth", ".bin", ".safetensors"}:
        return [value]
    return []


def transfer_inputs(wildcards) -> dict:
    w = wildcards
    return {
        "state": f"{run_dir(w.suite, w.source, w.method, w.shots, w.seed)}/state.safetensors",
        "source_fewshot": fewshot_file(w.source, w.shots, w.seed),
        "split": split_file(w.target),
        "checkpoint": checkpoint_inputs(w.suite),
    }


def train_inputs(wildcards) -> dict:
    return {
        "split": split_file(wildcards.dataset),
        "fewshot": fewshot_file(wildcards.dataset, wildcards.shots, wildcards.seed),
        "checkpoint": checkpoint_inputs(wildcards.suite),
    }


def profile_inputs(wildcards) -> list[str]:
    return checkpoint_inputs(wildcards.suite)


def resource(kind: str, key: str, default: int) -> int:
    return config.get("resources", {}).get(kind, {}).get(key, default)


def report_inputs(wildcards) -> dict:
    return {
        "records": suite_records(wildcards.suite) + suite_transfer_records(wildcards.suite),
        "profiles": suite_profiles(wildcards.suite),
    }


def report_args(wildcards) -> str:
    """--methods/--datasets/--shots (table order) and --note of a suite for `blocklora report`."""
    s = config["suites"][wildcards.suite]
    args = [
        "--methods",
        *suite_methods(wildcards.suite),
        "--datasets",
        *s["datasets"],
        *s.get("targets", []),
        "--shots",
        *map(str, s["shots"]),
    ]
    if s.get("note"):
        args += ["--note", s["note"]]
    return shlex.join(args)


def archives_arg(wildcards) -> str:
    folder = config.get("archives_dir")
    return f"--archives-dir {shlex.quote(folder)}" if folder else ""


def pretrain_args(wildcards) -> str:
    """`demo: pretrain:` options as command-line flags: {steps: 1200} -> --steps 1200; true -> --flag."""
    args = []
    for key, value in config["demo"].get("pretrain", {}).items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            args.append(flag)
        elif value not in (False, None):
            args += [flag, json.dumps(value) if isinstance(value, list | dict) else str(value)]
    return shlex.join(args)
