"""The workflow through a real Slurm: the single-node cluster of workflow/slurm/local_cluster.sh
(started here if it is not running, and stopped again; CI starts it) and workflow/profiles/slurm,
as a user runs them. The smoke suite ends in the report a local run writes; a training cancelled
inside Slurm resumes from its checkpoint; a snakemake killed with kill -9 while its jobs run loses
nothing and trains nothing twice; a job that fails shows its log; two stand-in GPUs run two GPU
jobs at once, each on its own, while a third waits.

Marked `slurm`: only `python -m pytest -m slurm` runs them (docs/testing.md).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.workflow.test_faults import one_run_config
from tests.workflow.test_workflow import CONFIG, REPO, job_counts, snakemake

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "workflow" / "slurm" / "local_cluster.sh"
PROFILE = REPO / "workflow" / "profiles" / "slurm"
# The profile as a user runs it, but with the first status check after 1 s instead of 20 and 1 s
# between the first checks: how soon a finished job is noticed, nothing else.
SLURM = [
    "--workflow-profile", str(PROFILE),
    "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "1",
]  # fmt: skip
ENV = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
# what a run computed (not when, where or how fast): equal in two runs of the same configuration on CPU
COMPUTED = ("method", "dataset", "shots", "seed", "accuracy", "num_classes", "test_size", "trainable_params",
            "iterations", "hparams", "config_hash", "inputs", "inputs_hash", "protocol_version")  # fmt: skip


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="session")
def local_slurm():
    """The local cluster: the running one, or one started here (needs root) and stopped afterwards."""
    if subprocess.run([str(SCRIPT), "status"], capture_output=True, timeout=60).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip(
            "the local Slurm is not running and only root can start it: run "
            "`sudo workflow/slurm/local_cluster.sh start` first, or the tests as root"
        )
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it (slurm-wlm and munge)")
    started = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.skip(
            f"workflow/slurm/local_cluster.sh start could not start Slurm here: {_tail(started.stderr, 5)}"
        )
    yield
    subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=300, check=True)


def jobs_in(workdir: Path, states: str | None = None) -> list[dict[str, str]]:
    """This user's Slurm jobs working in ``workdir`` (queued and running; ``states="all"``: finished too)."""
    command = ["squeue", f"--user={os.getuid()}", "--noheader", "--format=%i|%T|%j|%k|%Z"]
    listing = subprocess.run(
        [*command, *([f"--states={states}"] if states else [])], capture_output=True, text=True, timeout=60,
        check=True,
    ).stdout  # fmt: skip
    jobs = []
    for line in listing.splitlines():
        job_id, state, name, comment, folder = line.split("|", 4)
        if Path(folder).resolve() == workdir.resolve():
            jobs.append({"id": job_id, "state": state, "name": name, "comment": comment})
    return jobs


def wait_until(condition, seconds: float, what: str, head: subprocess.Popen | None = None):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        if head is not None and head.poll() is not None:
            pytest.fail(f"snakemake ended (exit status {head.returncode}) before {what}")
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f} s"
        time.sleep(0.2)
    return found


def data_made_locally(workdir: Path, config: dict) -> None:
    """The synthetic data and few-shot files, made by a local snakemake beforehand: the test is about
    the jobs after them, and each step through Slurm costs tens of seconds of status checks."""
    result = snakemake(workdir, "--cores", "2", "--until", "fewshot", config=config, env=ENV)
    assert result.returncode == 0, _tail(result.stdout + result.stderr, 40)
    assert list((workdir / "results" / "fewshot").rglob("*.json"))


def head_command(workdir: Path, config: dict) -> list[str]:
    """`snakemake` on the repository's Snakefile in ``workdir`` through the Slurm profile."""
    path = workdir / "config.test.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(path), *SLURM]  # fmt: skip


def start_head(command: list[str], workdir: Path) -> subprocess.Popen:
    log = (workdir / "head.log").open("w")
    return subprocess.Popen(
        command, cwd=workdir, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def run(command: list[str], workdir: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=workdir, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout
    )
    result.output = result.stdout + result.stderr
    return result


def records(results: Path) -> dict[str, dict]:
    return {
        str(path.relative_to(results)): json.loads(path.read_text())
        for path in sorted((results / "runs").rglob("record.json"))
    }


def computed(record: dict) -> dict:
    return {
        **{key: record.get(key) for key in COMPUTED},
        "loss_last": (record.get("train_stats") or {}).get("loss_last"),
    }


# ------------------------------------------------------------------ the smoke suite, here and there


def smoke_config() -> dict:
    config = copy.deepcopy(CONFIG)
    config["suite"] = "smoke"
    return config


@pytest.fixture(scope="module")
def slurm_smoke(local_slurm, tmp_path_factory) -> tuple[Path, str, float]:
    """The smoke suite through the Slurm profile, every job a Slurm job."""
    workdir = tmp_path_factory.mktemp("smoke_slurm")
    started = time.monotonic()
    result = snakemake(workdir, *SLURM, config=smoke_config(), env=ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 0, _tail(output, 80)
    return workdir / "results", output, time.monotonic() - started


@pytest.fixture(scope="module")
def local_smoke(tmp_path_factory) -> Path:
    """The same suite run locally, as the README's smoke command runs it."""
    workdir = tmp_path_factory.mktemp("smoke_local")
    result = snakemake(workdir, "--cores", "2", config=smoke_config(), env=ENV)
    assert result.returncode == 0, _tail(result.stdout + result.stderr, 80)
    return workdir / "results"


def test_the_smoke_suite_through_slurm_ends_in_the_report_of_a_local_run(slurm_smoke, local_smoke):
    results, output, seconds = slurm_smoke
    print(f"the smoke suite through Slurm took {seconds:.0f} s")
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", output)
    counts = job_counts(output)
    assert len(set(submitted)) == sum(counts.values()) - counts.get("all", 0)  # every job, in Slurm
    here, there = records(local_smoke), records(results)
    assert set(there) == set(here) and len(here) > 20
    for path in here:
        assert computed(there[path]) == computed(here[path]), path
    for name in ("accuracy.md", "accuracy.csv", "paired.md", "paired.csv", "runs.csv"):
        text = (results / "smoke" / "report" / name).read_text()
        if name == "runs.csv":  # one row per run, with its timings and paths: the same rows
            assert len(text.splitlines()) == len(
                (local_smoke / "smoke" / "report" / name).read_text().splitlines()
            )
        else:
            assert text and text == (local_smoke / "smoke" / "report" / name).read_text(), name
    profiles = {
        str(path.relative_to(results)): json.loads(path.read_text())["trainable_params"]
        for path in (results / "profile").rglob("*.json")
    }
    assert profiles and profiles == {
        str(path.relative_to(local_smoke)): json.loads(path.read_text())["trainable_params"]
        for path in (local_smoke / "profile").rglob("*.json")
    }


def test_small_suites_ask_slurm_for_small_jobs_and_get_them(slurm_smoke):
    """The smoke suite's jobs asked for 2 GB and minutes (config.yaml), and fit in them."""
    results, output, _ = slurm_smoke
    train = [
        re.search(r"^\s+resources: (.+)$", block, re.M)[1]
        for block in re.split(r"\n(?=(?:local)?rule \w+:)", output)
        if block.strip().startswith("rule train:")
    ]
    assert train and all("mem_mb=2000" in r and "runtime=10" in r and "gpu=1" in r for r in train)
    rss = []
    for table in (results / "benchmarks" / "train").rglob("*.tsv"):
        header, values = (line.split("\t") for line in table.read_text().splitlines()[:2])
        rss.append(float(dict(zip(header, values, strict=True))["max_rss"]))
    assert rss and max(rss) < 2000, f"a smoke training job took {max(rss):.0f} MB"


def test_job_states_come_from_squeue_on_a_cluster_without_accounting(local_slurm, slurm_smoke):
    """sacct knows no job here, so the plugin's default would wait forever; the profile's squeue works."""
    sacct = subprocess.run(["sacct", "-n"], capture_output=True, text=True, timeout=60)
    assert "accounting storage is disabled" in (sacct.stdout + sacct.stderr).lower()
    text = (PROFILE / "config.yaml").read_text()
    assert re.search(r"^slurm-status-command: squeue$", text, re.M)
    _, output, _ = slurm_smoke
    assert "Falling back to 'sacct'" not in output and "steps (100%) done" in output


# ------------------------------------------------------------------ a training cancelled in Slurm


def test_a_training_cancelled_in_slurm_resumes_from_its_checkpoint_when_run_again(local_slurm, tmp_path):
    config = one_run_config(iterations=400)
    reference = tmp_path / "uninterrupted"
    reference.mkdir()
    assert snakemake(reference, "--cores", "1", config=config, env=ENV).returncode == 0
    [expected] = records(reference / "results").values()

    workdir = tmp_path / "cancelled"
    workdir.mkdir()
    data_made_locally(workdir, config)
    command = head_command(workdir, config)
    head = start_head(command, workdir)
    runs = workdir / "results" / "runs"
    wait_until(lambda: list(runs.rglob("record.checkpoint.pt")), 300, "a checkpoint was written", head)
    [job] = [j for j in jobs_in(workdir) if j["comment"].startswith("rule_train")]
    subprocess.run(["scancel", job["id"]], check=True, timeout=60)
    head.wait(timeout=300)
    log = (workdir / "head.log").read_text()
    assert head.returncode != 0, _tail(log, 40)
    assert f"SLURM-job '{job['id']}' failed, SLURM status is: 'CANCELLED'" in log, _tail(log, 40)
    assert not list(runs.rglob("record.json")) and list(runs.rglob("record.checkpoint.pt"))

    again = run(command, workdir)
    assert again.returncode == 0, _tail(again.output, 60)
    [record] = records(workdir / "results").values()
    assert record["train_stats"]["resumed_from"] > 0
    assert computed(record) == computed(expected)
    assert not list(runs.rglob("record.checkpoint*.pt"))  # a finished run keeps no checkpoint


# ------------------------------------------------------------------ the head killed, its jobs left


def three_runs_config() -> dict:
    """Three LoRA runs of some seconds each: two at once on the two GPUs, the third waiting."""
    config = one_run_config(iterations=900)
    config["suites"]["faults"]["shots"] = [1, 2, 4]
    config["profile"] = {"steps": 2, "warmup": 1}
    return config


def test_after_kill_9_of_snakemake_the_same_command_loses_nothing_and_trains_nothing_twice(
    local_slurm, tmp_path
):
    """What a user does (README, "When something fails"): kill -9 of snakemake while its jobs run
    in Slurm, `--unlock`, the same command; it refuses while those jobs run and says how to wait for
    them; once they ended, the same command makes only what is missing."""
    workdir = tmp_path / "killed"
    workdir.mkdir()
    config = three_runs_config()
    data_made_locally(workdir, config)
    command = head_command(workdir, config)
    head = start_head(command, workdir)
    runs = workdir / "results" / "runs"
    wait_until(lambda: list(runs.rglob("record.checkpoint.pt")), 300, "a training checkpointed", head)
    head.send_signal(signal.SIGKILL)
    head.wait()
    left = jobs_in(workdir)
    assert left, "no job of the killed snakemake was left in Slurm: make the runs longer"

    locked = run(command, workdir)
    assert locked.returncode != 0 and "--unlock" in locked.output, _tail(locked.output)
    assert run([*command, "--unlock"], workdir).returncode == 0

    refused = run(command, workdir)
    assert refused.returncode != 0
    assert "still queued or running" in refused.output, _tail(refused.output, 30)
    wait = re.search(r"`(squeue --name [\w,-]+)`", refused.output)
    assert wait and left[0]["name"] in wait[1], _tail(refused.output, 30)
    assert {j["id"] for j in jobs_in(workdir)} <= {j["id"] for j in left}  # it submitted nothing

    def ended() -> bool:
        return not subprocess.run(
            [*wait[1].split(), "--noheader"], capture_output=True, text=True
        ).stdout.strip()

    wait_until(ended, 600, "the killed snakemake's jobs ended")
    before = {path: (workdir / "results" / path).stat().st_mtime_ns for path in records(workdir / "results")}
    assert before, "none of the killed snakemake's trainings finished"
    again = run(command, workdir)
    assert again.returncode == 0, _tail(again.output, 60)
    after = records(workdir / "results")
    assert len(after) == 3 and all(r["train_stats"]["resumed_from"] == 0 for r in after.values())
    for path, mtime in before.items():  # what the old jobs made stays as they made it
        assert (workdir / "results" / path).stat().st_mtime_ns == mtime, path
    assert job_counts(again.output).get("train", 0) == 3 - len(before)  # only what was missing
    assert (workdir / "results" / "faults" / "report" / "report.md").is_file()


# ------------------------------------------------------------------ a job that fails


def test_a_job_that_fails_in_slurm_shows_its_log(local_slurm, tmp_path):
    config = one_run_config(iterations=5)
    # 7 blocks divide no width of demo-tiny: the job fails when it builds the adapters
    config["methods"]["blocklora_n7"] = {"method": "blocklora", "blocks": 7}
    config["suites"]["faults"]["methods"] = ["blocklora_n7"]
    config["suites"]["faults"]["hparams"] = {"blocklora_n7": {"iterations": 5, "batch_size": 8}}
    data_made_locally(tmp_path, config)
    result = run(head_command(tmp_path, config), tmp_path)
    assert result.returncode != 0
    [log] = (tmp_path / "results" / "logs" / "train").rglob("*.log")
    assert "blocks=7 does not divide its input width" in log.read_text()
    # show-failed-logs: the job's own log, printed by snakemake under the path of the log
    assert str(log.relative_to(tmp_path)) in result.output, _tail(result.output, 40)
    assert "blocks=7 does not divide its input width" in result.output, _tail(result.output, 40)
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'FAILED'", result.output)
    slurm_log = re.search(r"\(log: (\S*/\.snakemake/slurm_logs/rule_train/\S+?\.log)\)", result.output)
    assert slurm_log and Path(slurm_log[1]).is_file(), _tail(result.output, 40)  # kept: the job failed


# ------------------------------------------------------------------ two GPUs, three jobs


def gpus_idle() -> bool:
    listing = subprocess.run(
        ["squeue", "--noheader", "--partition=gpu", "--format=%i"], capture_output=True, text=True, timeout=60,
        check=True,
    ).stdout  # fmt: skip
    return not listing.strip()


GPU_JOB = """#!{python}
import json, os, sys, time
sys.path.insert(0, {repo!r})
from blocklora.gpus import claim_gpu, visible_gpus

started = time.time()
given = os.environ.get("CUDA_VISIBLE_DEVICES")
seen = visible_gpus()
claimed = claim_gpu(sys.argv[2])  # one visible GPU: used as it is, no lock
time.sleep(float(sys.argv[3]))
record = dict(job=os.environ["SLURM_JOB_ID"], given=given, seen=seen, claimed=claimed, start=started, end=time.time())
with open(sys.argv[1], "w") as out:
    json.dump(record, out)
"""


def test_two_stand_in_gpus_run_two_gpu_jobs_at_once_each_on_its_own_while_a_third_waits(
    local_slurm, tmp_path
):
    wait_until(gpus_idle, 600, "no GPU job of an earlier test is left")
    script = tmp_path / "gpu_job.py"
    script.write_text(GPU_JOB.format(python=sys.executable, repo=str(REPO)))
    script.chmod(0o755)

    def sbatch(name: str, *options: str, seconds: float = 8) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", "--job-name", f"gpu-test-{name}", "--mem=300", "--time=5", f"--chdir={tmp_path}",
             f"--output={tmp_path / name}.out", *options, str(script), str(tmp_path / f"{name}.json"),
             str(tmp_path / "locks"), str(seconds)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        return out.strip().split(";")[0]

    gpu_jobs = [sbatch(f"gpu{i}", "--partition=gpu", "--gpus=1") for i in range(3)]

    def states() -> dict[str, str]:
        listing = subprocess.run(
            ["squeue", "--noheader", "--states=all", "--format=%i|%T", f"--jobs={','.join(gpu_jobs)}"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        found = dict(line.split("|") for line in listing.split())
        failed = {
            j: s
            for j, s in found.items()
            if s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "COMPLETED")
        }
        assert not failed, f"{failed}: {[p.read_text() for p in tmp_path.glob('*.out')]}"
        return found

    def two_run_one_waits() -> str | None:  # the node's allocation meanwhile
        now = states()
        if sorted(now.get(j) for j in gpu_jobs) != ["PENDING", "RUNNING", "RUNNING"]:
            return None
        node = subprocess.run(
            ["scontrol", "--details", "--oneliner", "show", "node"],
            capture_output=True,
            text=True,
            check=True,
        )
        return node.stdout

    node = wait_until(two_run_one_waits, 60, "two GPU jobs ran while the third waited")
    assert re.search(r"GresUsed=gpu:2\b", node), node  # both GPUs given out
    wait_until(lambda: set(states().values()) == {"COMPLETED"}, 180, "the three jobs finished")
    jobs = sorted(
        (json.loads((tmp_path / f"gpu{i}.json").read_text()) for i in range(3)), key=lambda job: job["start"]
    )
    for job in jobs:  # each sees one GPU, the one Slurm gave it, and blocklora uses that one
        assert (
            job["given"] in {"0", "1"} and job["seen"] == [job["given"]] and job["claimed"] == job["given"]
        ), job
    first, second, third = jobs
    assert second["start"] < first["end"] and first["given"] != second["given"]  # two at once, each its own
    assert third["start"] > min(first["end"], second["end"])  # the third waited for a GPU to be freed
    freed = first if first["end"] < second["end"] else second
    assert third["given"] == freed["given"] or third["start"] > max(first["end"], second["end"])
