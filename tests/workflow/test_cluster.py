"""Running beyond one machine: the Slurm profile, dry-run through snakemake-executor-plugin-slurm."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import yaml

from tests.workflow.test_workflow import REPO, job_counts, snakemake

slurm_utils = pytest.importorskip("snakemake_executor_plugin_slurm.utils")
PROFILE = REPO / "workflow" / "profiles" / "slurm"


def test_paper_suite_dry_runs_through_the_slurm_executor(tmp_path):
    result = snakemake(tmp_path, "-n", "--workflow-profile", str(PROFILE))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "workflow specific profile" in output and "profiles/slurm" in output
    counts = job_counts(output)
    assert counts["train"] > 0 and counts["prepare"] == 11
    train_resources = re.findall(r"rule train:.*?resources: ([^\n]+)", output, re.S)
    assert train_resources
    assert all("gpu=1" in r and "slurm_partition=gpu" in r and "mem_mb=32000" in r for r in train_resources)
    prepare_resources = re.findall(r"rule prepare:.*?resources: ([^\n]+)", output, re.S)
    assert prepare_resources and all(
        "gpu" not in r.replace("slurm_partition=cpu", "") for r in prepare_resources
    )


def test_the_small_suites_ask_the_slurm_executor_for_small_jobs(tmp_path):
    """What sbatch is asked for comes from the suite: the smoke suite's jobs fit a small GPU node."""
    result = snakemake(tmp_path, "-n", "--workflow-profile", str(PROFILE), "--config", "suite=smoke")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    blocks = [
        (re.match(r"\s*(?:local)?rule (\w+):", block)[1], re.search(r"^\s+resources: (.+)$", block, re.M)[1])
        for block in re.split(r"\n(?=(?:local)?rule \w+:)", output)
        if re.match(r"\s*(?:local)?rule \w+:", block)
    ]
    asked = {}
    for rule, resources in blocks:
        values = dict(item.split("=", 1) for item in resources.split(", "))
        asked.setdefault(rule, set()).add((values.get("gpu"), values.get("mem_mb"), values.get("runtime")))
    assert asked["train"] == asked["profile"] == {("1", "2000", "10")}
    assert asked["knn_baseline"] == {("1", "2000", "10")}
    assert asked["fewshot"] == asked["demo_data"] == asked["report"] == {(None, "1000", "10")}
    assert all(
        "slurm_partition=gpu" in r for rule, r in blocks if rule in ("train", "profile", "knn_baseline")
    )
    assert all("slurm_partition=cpu" in r for rule, r in blocks if rule in ("fewshot", "demo_data", "report"))


def test_the_slurm_profile_reads_job_states_with_squeue():
    """sacct is the plugin's default wherever the command exists, and waits forever without accounting."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["slurm-status-command"] == "squeue"
    # squeue sees a finished job for MinJobAge (300 s by default): 3 x the first interval must fit in it
    assert 3 * profile["slurm-init-seconds-before-status-checks"] <= 300


def test_the_gpu_resource_becomes_slurm_gpus():
    class Resources(dict):
        __getattr__ = dict.get

    job = SimpleNamespace(resources=Resources(gpu=1, mem_mb=32000))
    assert slurm_utils.set_gres_string(job).strip() == "--gpus=1"


def test_slurm_profile_counts_gpus_per_job():
    text = (PROFILE / "config.yaml").read_text()
    assert re.search(r"set-resource-scopes:\s*\n\s+gpu: local", text)
    assert "executor: slurm" in text
