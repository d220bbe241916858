"""The plan of the chosen suites and the input functions the rule files use (no rules here).

Everything the workflow decides lives in blocklora.plan, which the Snakefile imports from this
checkout (its light modules only: no torch, so this works in a bare snakemake environment too): the
config is typed, checked (names, hyper-parameters, transfers) and expanded into runs keyed by what
they are, each made once whichever suites ask for it.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# Jobs run `python -m blocklora.cli` with this checkout first on PYTHONPATH, in the current
# environment or in envs/blocklora.yaml (snakemake copies env files into .snakemake/conda/, so a
# relative `pip: -e ..` there would not find the package). Every snakemake process, cluster jobs
# included, parses this file, so every job inherits it.
REPO = str(Path(workflow.basedir).resolve())
if REPO not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ["BLOCKLORA_REPO"] = REPO  # for envs/blocklora.post-deploy.sh, which installs blocklora itself


envvars:
    "PYTHONPATH",
    "BLOCKLORA_REPO",


from blocklora.plan import DEMO_CHECKPOINT, FIXTURES, ConfigError, Plan, coerce_config

SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
coerce_config(config, yaml.safe_load(SCHEMA.read_text()))
validate(config, schema=str(SCHEMA))
try:
    PLAN = Plan(config, root=REPO)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

RESULTS = PLAN.results
DATA_ROOT = PLAN.data_root
RUNS = PLAN.all_runs()
TRANSFERS = PLAN.all_transfers()
PROFILES = PLAN.all_profiles()
DEMO_CORPUS = f"{RESULTS}/demo/corpus.npz"
DEMO_BACKBONE = f"{RESULTS}/{DEMO_CHECKPOINT}"
SOURCES = f"{RESULTS}/{FIXTURES}/sources.json" if PLAN.rehearsing else None


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
    setup=r"[^/]+",
    # the library's methods: a run folder of a rule-made method matches its own rule only (external_output)
    method=rf"(?:{_regex(PLAN.library_methods())})-[0-9a-f]{{8}}",
    cell=r"shots\d+_seed\d+|any_shots",
    shots=r"\d+",
    seed=r"\d+",
    classes=r"\d+",


# ------------------------------------------------------------------ what a job is


def _lookup(table: dict, key: str, what: str):
    try:
        return table[key]
    except KeyError:
        raise WorkflowError(f"{key} is not a {what} of the chosen suites ({', '.join(PLAN.chosen)})") from None


def run_of(w):
    return _lookup(RUNS, f"runs/{w.setup}/{w.dataset}/{w.method}/{w.cell}", "run")


def transfer_of(w):
    return _lookup(TRANSFERS, f"runs/{w.setup}/{w.target}/{w.method}/{w.cell}_from_{w.source}", "transfer")


def profile_of(w):
    return _lookup(PROFILES, f"profile/{w.setup}/{w.method}/classes{w.classes}.json", "profile")


def train_inputs(w) -> dict:
    run = run_of(w)
    return {
        "split": PLAN.split_file(run.dataset),
        "fewshot": PLAN.fewshot_file(run),
        "checkpoint": PLAN.checkpoint_inputs(run.setup),
    }


def train_args(w) -> str:
    run = run_of(w)
    args = [*PLAN.method_args(run.setup, run.method), "--dataset", run.dataset]
    args += ["--fewshot", PLAN.fewshot_file(run), "--image-root", PLAN.image_root(run.dataset)]
    if run.shots is not None:
        args += ["--shots", str(run.shots), "--seed", str(run.seed)]
    return shlex.join([*args, "--cache-dir", f"{RESULTS}/cache"])


def transfer_inputs(w) -> dict:
    transfer = transfer_of(w)
    run = transfer.run
    return {
        "state": f"{RESULTS}/{run.folder}/state.safetensors",
        "source_fewshot": PLAN.fewshot_file(run),
        "split": PLAN.split_file(transfer.target),
        "checkpoint": PLAN.checkpoint_inputs(run.setup),
    }


def transfer_args(w) -> str:
    transfer = transfer_of(w)
    run = transfer.run
    args = [*PLAN.method_args(run.setup, run.method), "--source", run.dataset]
    args += ["--source-fewshot", PLAN.fewshot_file(run), "--state", f"{RESULTS}/{run.folder}/state.safetensors"]
    args += ["--dataset", transfer.target, "--split", PLAN.split_file(transfer.target)]
    args += ["--image-root", PLAN.image_root(transfer.target)]
    if run.shots is not None:
        args += ["--shots", str(run.shots), "--seed", str(run.seed)]
    return shlex.join([*args, "--cache-dir", f"{RESULTS}/cache"])


def profile_inputs(w) -> list[str]:
    return PLAN.checkpoint_inputs(profile_of(w).setup)


def profile_args(w) -> str:
    profile = profile_of(w)
    timing = config.get("profile", {})
    args = [*PLAN.method_args(profile.setup, profile.method), "--classes", str(profile.classes)]
    args += ["--steps", str(timing.get("steps", 20)), "--warmup", str(timing.get("warmup", 5))]
    return shlex.join(args)


def report_inputs(w) -> dict:
    return PLAN.report_inputs(w.suite)


def report_args(w) -> str:
    return shlex.join(PLAN.report_args(w.suite))


# ------------------------------------------------------------------ a baseline as a rule (README)
# A method entry `NAME: {rule: RULE, ...}` is made by RULE, a rule of its own (workflow/rules/knn_baseline.smk
# is the worked example). These give it its paths, inputs and params.


def external_output(rule_name: str, name: str = "record.json") -> str:
    """A file in the run folder of a run made by ``rule_name``: its record (the default) or another
    file it keeps (``state.npz``); only that rule's runs match it."""
    folder = f"{{method,{rule_name}-[0-9a-f]{{8}}}}"
    return f"{RESULTS}/runs/{{setup}}/{{dataset}}/{folder}/{{cell}}/{name}"


def external_log(rule_name: str) -> str:
    return f"{RESULTS}/logs/{rule_name}/{{setup}}/{{dataset}}/{{method}}/{{cell}}.log"


def external_benchmark(rule_name: str) -> str:
    return f"{RESULTS}/benchmarks/{rule_name}/{{setup}}/{{dataset}}/{{method}}/{{cell}}.tsv"


def external_inputs(w) -> dict:
    """input.split, input.fewshot and input.checkpoint (the backbone's weights file, if any) of a rule-made run."""
    return PLAN.rule_inputs(run_of(w))


def _external_param(key: str):
    def param(w) -> str:
        return PLAN.rule_params(run_of(w))[key]

    param.__name__ = f"external_{key}"
    return param


# params.method, .dataset, .shots, .seed, .backbone, .pretrained, .model_configs, .image_root, .hparams
# (JSON), .device, .run_dir of a rule-made run: `params: **EXTERNAL_PARAMS`.
EXTERNAL_PARAMS = {
    key: _external_param(key)
    for key in (
        "method",
        "dataset",
        "shots",
        "seed",
        "backbone",
        "pretrained",
        "model_configs",
        "image_root",
        "hparams",
        "device",
        "run_dir",
    )
}


def check_external_rules() -> None:
    """Every method entry with `rule:` names a rule of this workflow that, alone, writes its runs'
    records; called from the Snakefile once every rule file is included, before any job is planned."""
    dataset = next(iter(config["datasets"]))

    def example(rule_name: str) -> str:
        return f"{RESULTS}/runs/backbone_weights/{dataset}/{rule_name}-0123abcd/shots1_seed1/record.json"

    rules = {r.name: r for r in workflow.rules}
    makers = sorted(name for name, r in rules.items() if r.is_producer(example(name)))
    how = (
        "rules that write run records: "
        + (", ".join(makers) or "none")
        + ". A rule of your own goes in a file under workflow/rules/, included from the Snakefile, with "
        "output record=external_output(RULE) (README, 'Adding a baseline as a rule')"
    )
    for rule_name, entries in sorted(PLAN.external_rules().items()):
        where = f"method entr{'y' if len(entries) == 1 else 'ies'} {', '.join(map(repr, entries))}"
        if rule_name not in rules:
            raise WorkflowError(f"{where}: `rule: {rule_name}` names no rule of this workflow; {how}")
        producers = [name for name, r in rules.items() if r.is_producer(example(rule_name))]
        if producers != [rule_name]:
            raise WorkflowError(
                f"{where}: rule {rule_name!r} must be the one rule that writes the records of its runs, "
                f"but {', '.join(producers) or 'no rule'} does; give it output record=external_output({rule_name!r})"
            )


# ------------------------------------------------------------------ what a job asks a scheduler for
# config `resources:`, per kind of job, of the suites the job serves (a suite's own over the top-level
# ones; where several suites share a job, the largest of theirs): blocklora.plan.Plan.job_resources.


def job_resource(kind: str, key: str, job=None):
    """A rule's `threads:` or one of its `resources:`: ``kind`` of config `resources:` (train, profile,
    pretrain, data, other); ``job(wildcards)`` names the run, transfer or profile (else every chosen
    suite decides)."""

    def value(wildcards) -> int:
        return PLAN.job_resources(kind, job(wildcards) if job else None)[key]

    value.__name__ = f"{kind}_{key}"
    return value


def _run_key(w) -> str:
    return run_of(w).folder


def _transfer_key(w) -> str:
    return transfer_of(w).folder


def _profile_key(w) -> str:
    return profile_of(w).path


# `threads: RUN_THREADS` and `resources: **RUN_RESOURCES` in a baseline made by its own rule (README)
RUN_THREADS = job_resource("train", "threads", _run_key)
RUN_RESOURCES = {key: job_resource("train", key, _run_key) for key in ("gpu", "mem_mb", "runtime")}
TRANSFER_THREADS = job_resource("train", "threads", _transfer_key)
TRANSFER_RESOURCES = {key: job_resource("train", key, _transfer_key) for key in ("gpu", "mem_mb", "runtime")}
PROFILE_THREADS = job_resource("profile", "threads", _profile_key)
PROFILE_RESOURCES = {key: job_resource("profile", key, _profile_key) for key in ("gpu", "mem_mb", "runtime")}
PRETRAIN_THREADS = job_resource("pretrain", "threads")
PRETRAIN_RESOURCES = {key: job_resource("pretrain", key) for key in ("mem_mb", "runtime")}
DATA_RESOURCES = {key: job_resource("data", key) for key in ("mem_mb", "runtime")}
OTHER_RESOURCES = {key: job_resource("other", key) for key in ("mem_mb", "runtime")}


# ------------------------------------------------------------------ Slurm jobs a killed snakemake left


def slurm_jobs_left_here() -> list[tuple[str, str, str]]:
    """(job id, job name, state) of the jobs snakemake submitted to Slurm for this user from this
    working directory that are still queued or running; none where there is no Slurm (no squeue, or
    a controller that does not answer)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return []
    try:
        listing = subprocess.run(
            [squeue, f"--user={os.getuid()}", "--noheader", "--format=%i|%j|%T|%k|%Z"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    here = {os.path.realpath(os.getcwd()), os.path.realpath(workflow.workdir_init)}
    jobs = []
    for line in listing.splitlines():
        fields = line.split("|", 4)
        # the executor plugin's comment on each job names its rule ("rule_<name>[_wildcards_...]")
        if len(fields) == 5 and fields[3].startswith("rule_") and os.path.realpath(fields[4]) in here:
            jobs.append((fields[0], fields[1], fields[2]))
    return jobs


def refuse_to_run_beside_slurm_jobs() -> None:
    """Called before the first job is started (`onstart`): a snakemake killed while its jobs ran in
    Slurm leaves them running there, and starting again would make their runs a second time beside
    them (rerun-incomplete takes their unfinished outputs for leftovers). README, "Slurm"."""
    if getattr(workflow.executor_plugin, "name", None) != "slurm":
        return  # squeue may take seconds to say that there is no Slurm: only asked when submitting to one
    jobs = slurm_jobs_left_here()
    if not jobs:
        return
    runs = sorted({name for _, name, _ in jobs})
    names = ",".join(runs)
    listing = ", ".join(f"{job_id} ({state.lower()})" for job_id, _, state in jobs)
    raise WorkflowError(
        f"{len(jobs)} Slurm job{'s' if len(jobs) > 1 else ''} of another snakemake run in this folder "
        f"{'are' if len(jobs) > 1 else 'is'} still queued or running: {listing}; its run ID (their job "
        f"name): {names}. Starting now would make their runs a second time beside them. If "
        f"that snakemake was killed, wait until they end (`squeue --name {names}` lists those left) "
        f"or cancel them (`scancel --name {names}`: a cancelled training resumes from its checkpoint), "
        "then run this command again; if it still runs, let it finish first."
    )


# ------------------------------------------------------------------ data


def data_args(w) -> str:
    """`--archives-dir` and (when rehearsing) `--sources` of the download and prepare jobs."""
    args = ["--data-root", DATA_ROOT]
    if PLAN.archives_dir:
        args += ["--archives-dir", PLAN.archives_dir]
    if SOURCES:
        args += ["--sources", SOURCES]
    return shlex.join(args)


def download_inputs(w) -> list[str]:
    return [SOURCES] if SOURCES else []


def pretrain_args(w) -> str:
    """`demo: pretrain:` options as command-line flags: {steps: 1200} -> --steps 1200; true -> --flag."""
    args = []
    for key, value in config["demo"].get("pretrain", {}).items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            args.append(flag)
        elif value not in (False, None):
            args += [flag, json.dumps(value) if isinstance(value, list | dict) else str(value)]
    return shlex.join(args)
