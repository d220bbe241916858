"""The whole `smoke` suite through snakemake: data, pre-training, every method (the k-NN baseline made by
its own rule among them), profiles, report."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
import pytest

from blocklora.records import file_sha256, record_problems
from tests.workflow.test_workflow import CONFIG, snakemake

SMOKE = CONFIG["suites"]["smoke"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("smoke")
    config = copy.deepcopy(CONFIG)
    config["suite"] = "smoke"
    # jobs run `python -m blocklora.cli`: the interpreter running the tests must come first
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = snakemake(workdir, "--cores", "2", config=config, env={"PATH": env_path})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return workdir / "results", output


def test_smoke_suite_writes_a_record_per_run_and_the_report(smoke_run):
    results, _ = smoke_run
    records = sorted((results / "runs").rglob("record.json"))
    cells = len(SMOKE["shots"]) * len(SMOKE["seeds"])
    assert len(records) == len(SMOKE["datasets"]) * (
        (len(SMOKE["methods"]) - 1) * cells + 1
    )  # zero-shot once
    for path in records:
        record = json.loads(path.read_text())
        assert record_problems(record) == [], path  # workflow/schemas/record.schema.json
        assert 0.0 <= record["accuracy"] <= 1.0
        assert (record["shots"] is None) == (record["method"] == "zeroshot")
        assert (path.parent / "state.safetensors").is_file() != bool(record.get("external")), path
    report = results / "smoke" / "report"
    for name in ("report.md", "accuracy.md", "accuracy.tex", "efficiency.md", "accuracy_vs_shots.png"):
        assert (report / name).stat().st_size > 0, name
    runs = pd.read_csv(report / "runs.csv")
    assert len(runs) == len(records)
    assert set(runs["label"]) == set(SMOKE["methods"])
    accuracy = (report / "accuracy.md").read_text()
    assert accuracy.count("| Zero-shot CLIP |") == len(SMOKE["shots"])  # in every shot column
    assert "(published)" not in accuracy
    text = (report / "report.md").read_text()
    assert text.count("Published (not run here)") == len(SMOKE["shots"])
    assert "| PLOT++ (published) |" in text and "context, not comparable" in text
    efficiency = (report / "efficiency.md").read_text()
    assert "| k-NN (CLIP features) | 0 | 0.000 | not profiled | not profiled |" in efficiency
    assert "| k-NN (CLIP features) |" in accuracy and "(rule `knn_baseline`)" in text
    paired = pd.read_csv(report / "paired.csv")
    assert "## Paired comparison with Block-LoRA" in text and "| LoRA |" in text.split("## Paired")[1]
    assert set(paired["label"]) == set(SMOKE["methods"]) - {"blocklora"}
    assert (paired["n"] == len(SMOKE["datasets"]) * len(SMOKE["seeds"])).all()


def test_smoke_profiles_cover_every_method(smoke_run):
    results, _ = smoke_run
    profiles = {
        p.parent.name.rsplit("-", 1)[0]: json.loads(p.read_text())
        for p in (results / "profile").rglob("*.json")
    }
    assert set(profiles) == set(SMOKE["methods"]) - {"knn"}  # made by its own rule: not profiled
    assert profiles["blocklora"]["trainable_params"] < profiles["lora"]["trainable_params"]
    assert profiles["zeroshot"]["trainable_params"] == 0


def test_the_rule_made_baselines_records_say_what_made_them(smoke_run):
    results, output = smoke_run
    knn = sorted((results / "runs").rglob("knn_baseline-*/*/record.json"))
    assert [path.parent.name for path in knn] == [
        f"shots{k}_seed{s}" for k in SMOKE["shots"] for s in SMOKE["seeds"]
    ]
    for path in knn:
        record = json.loads(path.read_text())
        assert (
            record["external"] is True
            and record["rule"] == "knn_baseline"
            and record["method"] == "knn_baseline"
        )
        assert record["trainable_params"] == 0 and record["hparams"]["k"] == CONFIG["methods"]["knn"]["k"]
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", record["code_version"])
        assert shlex.split(record["command"])[1].endswith("workflow/scripts/knn_baseline.py")
        fewshot = results / "fewshot" / "demo_shapes" / f"{path.parent.name}.json"
        split = results / "data" / "demo_shapes" / "split.json"
        assert record["inputs"] == {"fewshot": file_sha256(fewshot), "split": file_sha256(split)}
        assert record["test_size"] == len(json.loads(split.read_text())["test"])
    assert "localrule knn_baseline:" in output or "rule knn_baseline:" in output


def test_a_second_run_has_nothing_to_do(smoke_run, tmp_path):
    results, _ = smoke_run
    workdir = results.parent
    config_file = workdir / "config.test.yaml"
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = snakemake(workdir, "-n", "--configfile", str(config_file), env={"PATH": env_path})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


def test_a_run_deleted_by_hand_is_made_again_by_the_same_command(smoke_run):
    from tests.workflow.test_workflow import job_counts

    results, _ = smoke_run
    workdir = results.parent
    config_file = workdir / "config.test.yaml"
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    [record] = [
        p for p in (results / "runs").rglob("record.json") if "/lora-" in str(p) and "shots1_" in str(p)
    ]
    import shutil

    shutil.rmtree(record.parent)
    result = snakemake(workdir, "-n", "--configfile", str(config_file), env={"PATH": env_path})
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    assert counts["train"] == 1 and counts["report"] == 1  # that run, and the report that shows it
