"""The report: tables (numbers, shape), runs.csv, figures and the CLI, from fabricated records."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest

from blocklora import report
from blocklora.cli import main as cli_main

DATASETS = ["caltech101", "dtd", "eurosat"]
METHODS = ["zeroshot", "lora", "blocklora"]
SHOTS = [1, 4, 16]
SEEDS = [1, 2, 3]
PARAMS = {"zeroshot": 0, "lora": 184_320, "blocklora": 103_680}


def fake_accuracy(method: str, dataset: str, shots: int, seed: int) -> float:
    """A deterministic accuracy in 0..1 that differs by every key (seed spread included)."""
    base = {"zeroshot": 0.60, "lora": 0.70, "blocklora": 0.72}[method]
    bonus = 0.0 if method == "zeroshot" else 0.02 * SHOTS.index(shots)
    return base + bonus + 0.01 * DATASETS.index(dataset) + 0.003 * seed * (method != "zeroshot")


def make_record(method: str, dataset: str, shots: int, seed: int, suite: str = "paper") -> dict:
    """A run record with the contract's fields."""
    return {
        "method": method,
        "dataset": dataset,
        "suite": suite,
        "shots": shots,
        "seed": seed,
        "backbone": "ViT-B-16",
        "pretrained": "openai",
        "accuracy": fake_accuracy(method, dataset, shots, seed),
        "num_classes": 10,
        "test_size": 100,
        "trainable_params": PARAMS.get(method, 5000),
        "total_params": 149_620_737,
        "iterations": 500 * shots,
        "train_seconds": 1.5,
        "eval_seconds": 0.5,
        "peak_memory_mib": None,
        "device": "cpu",
        "hparams": {"rank": 2, "betas": [0.9, 0.999]},
        "versions": {"torch": "2.x"},
        "git_commit": None,
        "created": "2026-01-01T00:00:00+00:00",
    }


def write_records(
    root: Path, methods=METHODS, suite: str = "paper", variants: dict | None = None
) -> list[Path]:
    """Records at results/runs/<suite>/<dataset>/<label>/shots<K>_seed<S>/record.json."""
    paths = []
    variants = variants or {}
    for label in methods:
        for dataset in DATASETS:
            for shots in SHOTS:
                for seed in SEEDS:
                    path = (
                        root / "runs" / suite / dataset / label / f"shots{shots}_seed{seed}" / "record.json"
                    )
                    path.parent.mkdir(parents=True, exist_ok=True)
                    record = make_record(variants.get(label, label), dataset, shots, seed, suite)
                    path.write_text(json.dumps(record))
                    paths.append(path)
    return paths


def write_profiles(root: Path) -> list[Path]:
    folder = root / "profile" / "paper"
    folder.mkdir(parents=True)
    profiles = {
        "zeroshot": {"method": "zeroshot", "trainable_params": 0, "total_params": 149_620_737},
        "lora": {
            "method": "lora",
            "trainable_params": 184_320,
            "total_params": 149_805_057,
            "train_flops_per_step": 3.4e12,
            "step_ms": 82.0,
            "peak_memory_mib": 4900.0,
            "latency_ms_merged": 10.0,
            "latency_ms_frozen": 10.0,
        },
        "blocklora": {
            "method": "blocklora",
            "trainable_params": 103_680,
            "total_params": 149_724_417,
            "step_ms": 80.0,
            "latency_ms_merged": 10.2,
            "latency_ms_frozen": 10.0,
        },
    }
    paths = []
    for label, profile in profiles.items():
        path = folder / f"{label}.json"
        path.write_text(json.dumps(profile))
        paths.append(path)
    return paths


@pytest.fixture
def runs(tmp_path) -> pd.DataFrame:
    return report.load_runs(write_records(tmp_path))


def expected_cell(method: str, dataset: str, shots: int) -> str:
    values = [100 * fake_accuracy(method, dataset, shots, s) for s in SEEDS]
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def test_load_runs_has_one_row_per_record_with_percent_accuracy(runs):
    assert len(runs) == len(METHODS) * len(DATASETS) * len(SHOTS) * len(SEEDS)
    row = runs[
        (runs["label"] == "lora") & (runs["dataset"] == "dtd") & (runs["shots"] == 4) & (runs["seed"] == 2)
    ]
    assert row["acc"].item() == pytest.approx(100 * fake_accuracy("lora", "dtd", 4, 2))


def test_summary_is_mean_and_sample_std_over_seeds(runs):
    summary = report.accuracy_summary(runs)
    row = summary[
        (summary["label"] == "blocklora") & (summary["dataset"] == "eurosat") & (summary["shots"] == 16)
    ]
    values = [100 * fake_accuracy("blocklora", "eurosat", 16, s) for s in SEEDS]
    assert row["mean"].item() == pytest.approx(statistics.mean(values))
    assert row["std"].item() == pytest.approx(statistics.stdev(values))
    assert row["n"].item() == 3


def test_average_is_mean_over_datasets_and_std_over_seed_averages(runs):
    summary = report.accuracy_summary(runs)
    row = summary[
        (summary["label"] == "lora") & (summary["dataset"] == report.AVERAGE) & (summary["shots"] == 1)
    ]
    per_seed = [statistics.mean(100 * fake_accuracy("lora", d, 1, s) for d in DATASETS) for s in SEEDS]
    assert row["mean"].item() == pytest.approx(statistics.mean(per_seed))
    assert row["std"].item() == pytest.approx(statistics.stdev(per_seed))


def test_average_is_left_out_when_a_dataset_is_missing(runs):
    partial = runs[~((runs["label"] == "lora") & (runs["dataset"] == "dtd"))]
    table = report.accuracy_table(report.accuracy_summary(partial), 4, METHODS, DATASETS)
    assert table.loc["LoRA", report.AVERAGE] == report.MISSING
    assert table.loc["LoRA", report.dataset_title("dtd")] == report.MISSING
    assert table.loc["Block-LoRA", report.AVERAGE] != report.MISSING


def test_accuracy_table_shape_and_cells(runs):
    table = report.accuracy_table(report.accuracy_summary(runs), 4, METHODS, DATASETS)
    assert list(table.index) == ["Zero-shot CLIP", "LoRA", "Block-LoRA"]
    assert list(table.columns)[-1] == report.AVERAGE
    assert table.shape == (len(METHODS), len(DATASETS) + 1)
    assert table.iloc[1, 0] == expected_cell("lora", "caltech101", 4)
    assert table.iloc[2, 2] == expected_cell("blocklora", "eurosat", 4)


def test_single_seed_cell_shows_the_mean_alone():
    assert report.format_mean_std(72.345, float("nan")) == "72.3"
    assert report.format_mean_std(72.345, 0.44) == "72.3 ± 0.4"
    assert report.format_mean_std(float("nan"), float("nan")) == report.MISSING


def test_markdown_and_latex_tables(runs):
    table = report.accuracy_table(report.accuracy_summary(runs), 16, METHODS, DATASETS)
    md = report.to_markdown(table).splitlines()
    assert md[0].startswith("| Method |") and md[0].rstrip().endswith(f"| {report.AVERAGE} |")
    assert len(md) == 2 + len(METHODS)
    tex = report.to_latex(table, caption="cap", label="tab:x")
    for token in (r"\toprule", r"\midrule", r"\bottomrule", r"\label{tab:x}", r"$\pm$", "{lrrrr}"):
        assert token in tex
    assert "±" not in tex


def test_efficiency_table_fills_missing_fields_with_a_dash(tmp_path):
    profiles = report.load_profiles(write_profiles(tmp_path))
    table = report.efficiency_table(profiles, METHODS)
    assert list(table.index) == ["Zero-shot CLIP", "LoRA", "Block-LoRA"]
    assert table.loc["LoRA", "Trainable params"] == "184,320"
    assert table.loc["LoRA", "Step (ms)"] == "82.0"
    assert table.loc["LoRA", "Latency merged / frozen"] == "1.00×"
    assert table.loc["Block-LoRA", "Peak memory (MiB)"] == report.MISSING
    assert table.loc["Block-LoRA", "Train FLOPs/step"] == report.MISSING
    assert table.loc["Zero-shot CLIP", "Latency merged / frozen"] == report.MISSING


def test_a_label_comes_with_its_path_else_from_the_method_or_its_run_folder(tmp_path):
    paths = write_records(
        tmp_path / "a", methods=["blocklora-1111aaaa"], variants={"blocklora-1111aaaa": "blocklora"}
    )
    runs = report.load_runs([f"blocklora_n4={path}" for path in paths])
    assert set(runs["label"]) == {"blocklora_n4"}
    assert set(runs["method"]) == {"blocklora"}
    assert set(report.load_runs(paths)["label"]) == {"blocklora"}  # one configuration: the method
    more = write_records(
        tmp_path / "b", methods=["blocklora-2222bbbb"], variants={"blocklora-2222bbbb": "blocklora"}
    )
    assert set(report.load_runs(paths + more)["label"]) == {"blocklora-1111aaaa", "blocklora-2222bbbb"}


def test_write_report_writes_every_file(tmp_path):
    paths = write_records(tmp_path / "results")
    profiles = report.load_profiles(write_profiles(tmp_path / "results"))
    out = tmp_path / "out"
    written = report.write_report(
        report.load_runs(paths),
        profiles,
        out,
        suite="paper",
        methods=METHODS,
        datasets=DATASETS,
        note="hello",
    )
    assert sorted(written.files) == sorted(report.REPORT_FILES)
    for name in report.REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_shots.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "accuracy_vs_params.pdf").read_bytes().startswith(b"%PDF")
    assert not list(out.glob(".*.tmp")), "temporary files left behind"

    csv = pd.read_csv(out / "runs.csv")
    assert len(csv) == len(paths)
    assert {"label", "method", "dataset", "shots", "seed", "accuracy", "hparams.rank"} <= set(csv.columns)

    md = (out / "accuracy.md").read_text()
    assert md.count("| Method |") == len(SHOTS)
    assert expected_cell("blocklora", "dtd", 16) in md
    assert "hello" in (out / "report.md").read_text()
    assert (out / "accuracy.tex").read_text().count(r"\begin{table}") == len(SHOTS)


def test_methods_and_shots_select_and_order_rows(tmp_path):
    runs = report.load_runs(write_records(tmp_path))
    out = tmp_path / "out"
    report.write_report(runs, pd.DataFrame(columns=["label"]), out, methods=["blocklora", "lora"], shots=[16])
    md = (out / "accuracy.md").read_text()
    assert md.count("| Method |") == 1
    assert md.index("Block-LoRA") < md.index("| LoRA")
    assert "Zero-shot" not in md


def test_report_cli_prints_a_summary(tmp_path, capsys):
    write_records(tmp_path / "results")
    profile_paths = write_profiles(tmp_path / "results")
    out = tmp_path / "report"
    code = cli_main(
        [
            "report",
            "--suite",
            "paper",
            "--records",
            str(tmp_path / "results" / "runs"),
            "--profiles",
            *map(str, profile_paths),
            "--methods",
            *METHODS,
            "--out-dir",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{len(METHODS) * len(DATASETS) * len(SHOTS) * len(SEEDS)} runs" in printed
    assert re.search(r"16 shots: best Block-LoRA", printed)
    assert (out / "report.md").is_file()


def test_unreadable_record_names_the_file(tmp_path):
    bad = tmp_path / "record.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        report.load_runs([bad])


def test_report_files_agree_with_the_workflow_rule():
    rule = (Path(__file__).resolve().parents[1] / "workflow" / "rules" / "report.smk").read_text()
    named = set(re.findall(r"\{\{suite\}\}/report/([\w.]+)\"", rule))
    assert named == set(report.REPORT_FILES)


def test_profile_label_is_the_one_given_else_its_method(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"method": "blocklora"}))
    (tmp_path / "lora.json").write_text(json.dumps({"method": "lora"}))
    profiles = report.load_profiles([f"blocklora_n4={tmp_path / 'a.json'}", tmp_path / "lora.json"])
    assert sorted(profiles["label"]) == ["blocklora_n4", "lora"]


def test_records_of_different_protocol_versions_are_refused_unless_allowed(tmp_path):
    paths = write_records(tmp_path / "results")
    for path in paths[:3]:
        record = json.loads(path.read_text())
        record["protocol_version"] = 0
        path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"different protocol versions \(unversioned: .*version 0: 3 record"):
        report.load_runs(tmp_path / "results" / "runs")
    assert len(report.load_runs(tmp_path / "results" / "runs", allow_mixed=True)) == len(paths)


def test_training_hours_are_estimated_from_profiled_step_times():
    runs = pd.DataFrame(
        [
            {"label": "lora", "iterations": 500, "train_seconds": 60.0},
            {"label": "lora", "iterations": 1000, "train_seconds": 120.0},
            {"label": "zeroshot", "iterations": 0, "train_seconds": 0.0},
        ]
    )
    profiles = pd.DataFrame(
        [{"label": "lora", "step_ms": 72.0, "device": "H100"}, {"label": "zeroshot", "step_ms": None}]
    )
    hours = report.training_hours(runs, profiles).set_index("label")
    assert hours.loc["lora", "estimated_gpu_hours"] == pytest.approx(1500 * 72.0 / 3.6e6)
    assert hours.loc["lora", "measured_hours"] == pytest.approx(180 / 3600)
    assert pd.isna(hours.loc["zeroshot", "estimated_gpu_hours"])
    lines = report.training_hours_lines(hours.reset_index(), profiles)
    assert "0.03 device-hours" in lines[1] and "H100" in lines[1] and "1 of 2 methods" in lines[1]


def test_report_files_get_the_users_umask_permissions(tmp_path):
    """Collaborators sharing a results folder can read every file (not mkstemp's 0600)."""
    import os

    paths = write_records(tmp_path / "results")
    previous = os.umask(0o022)
    try:
        report.build_report(paths, [], tmp_path / "out")
    finally:
        os.umask(previous)
    for name in report.REPORT_FILES:
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name
