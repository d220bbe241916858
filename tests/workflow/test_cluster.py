"""Running beyond one machine: the Slurm profile, dry-run through snakemake-executor-plugin-slurm."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

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


def test_the_gpu_resource_becomes_slurm_gpus():
    class Resources(dict):
        __getattr__ = dict.get

    job = SimpleNamespace(resources=Resources(gpu=1, mem_mb=32000))
    assert slurm_utils.set_gres_string(job).strip() == "--gpus=1"


def test_slurm_profile_counts_gpus_per_job():
    text = (PROFILE / "config.yaml").read_text()
    assert re.search(r"set-resource-scopes:\s*\n\s+gpu: local", text)
    assert "executor: slurm" in text
