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
from blocklora.published import FEW_SHOT_DATASETS, PublishedEntry, load_published
from blocklora.records import PROTOCOL_VERSION

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
    """A run record with the contract's fields (workflow/schemas/record.schema.json), and one more (suite)."""
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
        "protocol_version": PROTOCOL_VERSION,
        "inputs": {"fewshot": "0" * 64},
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
        record["protocol_version"] = PROTOCOL_VERSION - 1
        path.write_text(json.dumps(record))
    older, newer = PROTOCOL_VERSION - 1, PROTOCOL_VERSION
    with pytest.raises(
        ValueError, match=rf"different protocol versions \(version {older}: 3 record.*version {newer}: "
    ):
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


# ------------------------------------------------------------------ paired comparison

T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student t quantiles, from a table


def paired_runs() -> pd.DataFrame:
    """Block-LoRA on datasets a and b (seeds 1, 2); LoRA missing b's seed 2; zero-shot without seed;
    CoOp on one pair only; dataset c outside the average; 4 shots run by LoRA alone."""
    rows = [
        ("blocklora", "a", 1, 1, 70.0), ("blocklora", "a", 1, 2, 72.0),
        ("blocklora", "b", 1, 1, 60.0), ("blocklora", "b", 1, 2, 64.0),
        ("blocklora", "c", 1, 1, 10.0),
        ("lora", "a", 1, 1, 71.0), ("lora", "a", 1, 2, 70.0), ("lora", "b", 1, 1, 61.0),
        ("lora", "c", 1, 1, 90.0), ("lora", "a", 4, 1, 80.0),
        ("zeroshot", "a", None, None, 70.0), ("zeroshot", "b", None, None, 62.0),
        ("coop", "a", 1, 1, 75.0),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["label", "dataset", "shots", "seed", "acc"])


def test_paired_differences_pair_by_seed_and_zero_shot_with_every_seed():
    pairs = report.paired_differences(paired_runs(), "blocklora", [1, 4], datasets=["a", "b"])
    by = {(r.label, r.shots, r.dataset, r.seed): r.diff for r in pairs.itertuples()}
    assert by == {
        ("coop", 1, "a", 1.0): 5.0,
        ("lora", 1, "a", 1.0): 1.0,
        ("lora", 1, "a", 2.0): -2.0,
        ("lora", 1, "b", 1.0): 1.0,
        ("zeroshot", 1, "a", 1.0): 0.0,
        ("zeroshot", 1, "a", 2.0): -2.0,
        ("zeroshot", 1, "b", 1.0): 2.0,
        ("zeroshot", 1, "b", 2.0): -2.0,
    }


def test_paired_summary_against_a_hand_computation():
    pairs = report.paired_differences(paired_runs(), "blocklora", [1, 4], datasets=["a", "b"])
    summary = report.paired_summary(pairs, ["zeroshot", "lora", "coop"], [1, 4])
    assert list(summary.columns) == list(report.PAIRED_COLUMNS)
    summary = summary.set_index(["label", "shots"])

    lora = summary.loc[("lora", 1)]  # d = 1, -2, 1: mean 0, sd √3
    assert lora["n"] == 3 and lora["mean_diff"] == pytest.approx(0.0)
    assert lora["ci_high"] == pytest.approx(T_975[2] * 3**0.5 / 3**0.5)
    assert lora["ci_low"] == pytest.approx(-lora["ci_high"])
    assert (lora["wins"], lora["ties"], lora["losses"]) == (2, 0, 1)

    zeroshot = summary.loc[("zeroshot", 1)]  # d = 0, -2, 2, -2: mean -0.5, variance 11/3
    half = T_975[3] * (11 / 3) ** 0.5 / 2
    assert zeroshot["n"] == 4 and zeroshot["mean_diff"] == pytest.approx(-0.5)
    assert (zeroshot["ci_low"], zeroshot["ci_high"]) == pytest.approx((-0.5 - half, -0.5 + half))
    assert (zeroshot["wins"], zeroshot["ties"], zeroshot["losses"]) == (1, 1, 2)

    coop = summary.loc[("coop", 1)]  # one pair: a mean, no interval
    assert coop["n"] == 1 and coop["mean_diff"] == 5.0 and coop["wins"] == 1
    assert pd.isna(coop["ci_low"]) and pd.isna(coop["ci_high"])

    for label in ("lora", "zeroshot", "coop"):  # no reference run at 4 shots
        assert summary.loc[(label, 4), "n"] == 0 and pd.isna(summary.loc[(label, 4), "mean_diff"])

    table = report.paired_table(summary.reset_index())
    assert list(table.index) == ["Zero-shot CLIP", "LoRA", "CoOp"]
    assert table.loc["Zero-shot CLIP", "1 shot"] == f"−0.5 [−{half + 0.5:.1f}, +{half - 0.5:.1f}], 1/4 wins"
    assert table.loc["LoRA", "1 shot"] == "0.0 [−4.3, +4.3], 2/3 wins"
    assert table.loc["CoOp", "1 shot"] == "+5.0, 1/1 wins"
    assert table.loc["LoRA", "4 shots"] == report.MISSING


def test_the_paired_comparison_covers_the_average_datasets_only(tmp_path):
    runs = paired_runs().assign(backbone="ViT-B-16", iterations=0, train_seconds=0.0, path="x")
    out = tmp_path / "out"
    report.write_report(runs, pd.DataFrame(columns=["label"]), out, shots=[1], average_over=["a", "b"])
    paired = pd.read_csv(out / "paired.csv").set_index("label")
    assert paired.loc["lora", "n"] == 3  # dataset c (LoRA +80 there) is not in the Average
    assert paired.loc["lora", "mean_diff"] == pytest.approx(0.0)
    assert set(paired["reference"]) == {"blocklora"}
    assert "−0.5 [" in (out / "paired.md").read_text()
    assert r"$-$0.5 [" in (out / "paired.tex").read_text()


def test_a_report_without_the_reference_says_so_in_one_line(tmp_path):
    runs = report.load_runs(write_records(tmp_path / "results"))
    out = tmp_path / "out"
    report.write_report(runs, pd.DataFrame(columns=["label"]), out, methods=["zeroshot", "lora"])
    section = (out / "report.md").read_text().split("## Paired comparison with Block-LoRA\n")[1]
    assert section.split("\n## ")[0].strip() == (
        "No paired comparison: this report has no runs of the reference, `blocklora`."
    )
    assert pd.read_csv(out / "paired.csv").empty
    report.write_report(runs, pd.DataFrame(columns=["label"]), out, reference="lora")
    assert "## Paired comparison with LoRA" in (out / "report.md").read_text()
    assert set(pd.read_csv(out / "paired.csv")["label"]) == {"zeroshot", "blocklora"}


# ------------------------------------------------------------------ published numbers

SHIPPED = Path(__file__).resolve().parents[1] / "workflow" / "published" / "few_shot.yaml"


def fake_published(method: str = "Fake") -> PublishedEntry:
    """An entry with striking numbers on the test datasets, to be found wherever it leaks."""
    return PublishedEntry(
        method=method,
        backbone="ViT-B/16",
        source="Nobody, 2099",
        url="https://example.org/fake",
        accuracy={d: {k: 99.87 for k in SHOTS} for d in DATASETS} | {"average": {1: 12.34}},
    )


def test_published_rows_never_enter_the_measured_files(tmp_path):
    runs = report.load_runs(write_records(tmp_path / "results"))
    profiles = pd.DataFrame(columns=["label"])
    report.write_report(runs, profiles, tmp_path / "without", methods=METHODS)
    report.write_report(
        runs, profiles, tmp_path / "with", methods=METHODS, published=[fake_published("LoRA")]
    )
    for name in ("runs.csv", "accuracy.csv", "accuracy.md", "accuracy.tex", "paired.csv", "paired.md"):
        written = (tmp_path / "with" / name).read_text()
        assert written == (tmp_path / "without" / name).read_text(), name
        assert "99.87" not in written and "99.9" not in written, name
    text = (tmp_path / "with" / "report.md").read_text()
    assert "| LoRA (published) | 99.9 | 99.9 | 99.9 | 12.3 |" in text
    measured = text.split("### 1 shot\n")[1].split("Published (not run here)")[0]
    assert "99.9" not in measured and "(published)" not in measured
    published = pd.read_csv(tmp_path / "with" / "published.csv")
    assert set(published["title"]) == {"LoRA (published)"} and (published["accuracy"] == 99.87).sum() == 9


def test_the_published_table_shows_the_suites_datasets_the_entry_has_and_its_average():
    plot, clip_lora = load_published(SHIPPED)
    table = report.published_table([plot, clip_lora], 16, ["dtd", "eurosat", "demo_colors"])
    assert list(table.columns) == ["DTD", "EuroSAT", report.AVERAGE]
    assert table.loc["PLOT++ (published)"].tolist() == ["71.4", "92.0", "82.1"]
    assert table.loc["CLIP-LoRA (published)"].tolist() == [report.MISSING, report.MISSING, "83.0"]
    demo = report.published_table([plot, clip_lora], 8, ["demo_colors", "demo_combos"])
    assert list(demo.columns) == [report.AVERAGE]
    assert demo[report.AVERAGE].tolist() == [f"{plot.average(8):.1f}", "80.3"]
    assert report.published_table([plot], 3, ["dtd"]).empty  # no number at 3 shots


def test_published_csv_holds_every_number_and_the_computed_averages():
    frame = report.published_frame(load_published(SHIPPED))
    assert list(frame.columns) == list(report.PUBLISHED_COLUMNS)
    plot = frame[frame["method"] == "PLOT++"]
    assert len(plot) == 11 * 5 + 5 and plot["computed"].sum() == 5
    average = plot[plot["dataset"] == "average"].set_index("shots")["accuracy"]
    assert round(average[1], 2) == 70.71 and round(average[16], 2) == 82.09
    clip_lora = frame[frame["method"] == "CLIP-LoRA"]
    assert len(clip_lora) == 5 and not clip_lora["computed"].any()


def measured_runs(backbone: str, datasets=FEW_SHOT_DATASETS, source: str | None = None) -> pd.DataFrame:
    return pd.DataFrame(
        [{"label": "lora", "dataset": d, "shots": 1, "seed": 1, "acc": 50.0, "backbone": backbone,
          "source_dataset": source} for d in datasets]
    )  # fmt: skip


def test_published_averages_are_drawn_only_beside_the_same_backbone_and_datasets():
    entries = load_published(SHIPPED)
    eleven = list(FEW_SHOT_DATASETS)
    assert report.comparable_published(entries, measured_runs("ViT-B-16"), eleven) == entries
    assert report.comparable_published(entries, measured_runs("demo-tiny"), eleven) == []
    assert report.comparable_published(entries, measured_runs("ViT-B-32"), eleven) == []
    assert report.comparable_published(entries, measured_runs("ViT-B-16", DATASETS), DATASETS) == []
    assert report.comparable_published(entries, measured_runs("ViT-B-16", source="imagenet"), eleven) == []


def test_the_average_panel_draws_published_averages_as_grey_dashed_hollow_lines(runs):
    import matplotlib.pyplot as plt

    entries = load_published(SHIPPED)
    fig = report.plot_accuracy_vs_shots(report.accuracy_summary(runs), METHODS, DATASETS, entries)
    average = next(ax for ax in fig.axes if ax.get_title() == report.AVERAGE)
    lines = {line.get_label(): line for line in average.get_lines()}
    plot = lines["PLOT++ (published)"]
    assert list(plot.get_xdata()) == SHOTS
    assert list(plot.get_ydata()) == pytest.approx([entries[0].average(k) for k in SHOTS])
    assert plot.get_linestyle() == "--" and plot.get_markerfacecolor() == "none"
    red, green, blue, _ = matplotlib_rgba(plot.get_color())
    assert red == green == blue  # grey
    assert "CLIP-LoRA (published)" in lines
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert "PLOT++ (published)" in legend and "Block-LoRA" in legend
    dtd = next(ax for ax in fig.axes if ax.get_title() == "DTD")
    assert not any("(published)" in line.get_label() for line in dtd.get_lines())
    plt.close(fig)


def matplotlib_rgba(color) -> tuple[float, float, float, float]:
    from matplotlib.colors import to_rgba

    return to_rgba(color)


def test_a_report_of_another_backbone_shows_the_published_rows_as_context(tmp_path):
    paths = write_records(tmp_path / "results")
    for path in paths:
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "backbone": "demo-tiny"}))
    out = tmp_path / "out"
    report.build_report(paths, [], out, published=SHIPPED)
    text = (out / "report.md").read_text()
    assert "measured with ViT-B/16, this suite with demo-tiny: they are context, not comparable." in text
    assert text.count("Published (not run here)") == len(SHOTS)
    assert "| PLOT++ (published) |" in text and "| CLIP-LoRA (published) |" in text
    assert "Sources: PLOT++: Chen et al." in text and "(ViT-B/16; its Average is the mean" in text


def test_a_transfer_suite_leaves_the_published_few_shot_numbers_out(tmp_path):
    paths = write_records(tmp_path / "results")
    for path in paths:
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "source_dataset": "imagenet"}))
    out = tmp_path / "out"
    report.build_report(paths, [], out, published=SHIPPED)
    text = (out / "report.md").read_text()
    assert "Published few-shot numbers are not shown" in text and "(published) |" not in text
    assert len(pd.read_csv(out / "published.csv")) == 11 * 5 + 5 + 5


def test_report_cli_writes_both_new_sections(tmp_path, caplog):
    write_records(tmp_path / "results")
    out = tmp_path / "report"
    argv = ["report", "--records", str(tmp_path / "results" / "runs"), "--out-dir", str(out)]
    assert cli_main([*argv, "--methods", *METHODS, "--published", str(SHIPPED)]) == 0
    text = (out / "report.md").read_text()
    accuracy, paired = text.split("## Paired comparison with Block-LoRA\n")
    assert "Published (not run here), 16 shots:" in accuracy and "| PLOT++ (published) |" in accuracy
    assert "over the 11 datasets, this suite's over 3" in accuracy
    assert "Each cell compares a method with Block-LoRA on the same few-shot subsets" in paired
    assert "| LoRA | −2.0 [" in paired and "0/9 wins" in paired
    assert len(pd.read_csv(out / "paired.csv")) == 2 * len(SHOTS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {method: X, backbone: b, source: s, url: u, accuracy: {dtdd: {1: 5}}}\n")
    assert cli_main([*argv, "--published", str(bad)]) == 1
    assert re.search(r"bad\.yaml, entry 1 \(X\), field `accuracy\.dtdd`: unknown dataset", caplog.text)


# ------------------------------------------------------------------ the record schema, and runs made by a rule


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("accuracy", ..., "field 'accuracy': missing"),
        ("accuracy", "72.3", "field 'accuracy': '72.3' is not of type 'number'"),
        ("seed", 1.5, "field 'seed': 1.5 is not of type 'integer', 'null'"),
    ],
)
def test_a_record_that_breaks_the_schema_stops_the_report_naming_file_and_field(
    tmp_path, caplog, field, value, message
):
    paths = write_records(tmp_path / "results")
    bad = paths[7]
    record = json.loads(bad.read_text())
    if value is ...:
        del record[field]
    else:
        record[field] = value
    bad.write_text(json.dumps(record))
    out = tmp_path / "report"
    argv = ["report", "--records", str(tmp_path / "results" / "runs"), "--out-dir", str(out)]
    assert cli_main(argv) == 1
    assert f"{bad}: {message}" in caplog.text
    assert not (out / "report.md").exists()


def test_a_method_made_by_a_rule_shows_in_the_efficiency_table_as_not_profiled(tmp_path):
    paths = write_records(tmp_path / "results", methods=[*METHODS, "knn"], variants={"knn": "lora"})
    for path in paths:
        record = json.loads(path.read_text())
        if "/knn/" in str(path):
            record.update(method="knn_baseline", external=True, rule="knn_baseline", trainable_params=0)
            record.update(code_version=None, command="python knn.py")
            path.write_text(json.dumps(record))
    # labelled LABEL=PATH, as the workflow gives them
    runs = report.load_runs([f"{path.parent.parent.name}={path}" for path in paths])
    profiles = report.load_profiles(write_profiles(tmp_path / "results"))
    out = tmp_path / "out"
    report.write_report(runs, profiles, out, methods=[*METHODS, "knn"])
    table = (out / "efficiency.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| k-NN"))
    assert row.split(" | ")[1:3] == ["0", "0.000"]  # trainable parameters, from its records
    assert row.count(report.NOT_PROFILED) == 4
    assert "Not profiled: k-NN (CLIP features) (rule `knn_baseline`)" in table
    assert "| LoRA | 184,320 |" in table and table.count(report.NOT_PROFILED) == 4  # its cells only
    text = (out / "report.md").read_text()
    assert "Not profiled: k-NN (CLIP features)" in text.split("## Efficiency")[1]
    assert "| k-NN (CLIP features) |" in text.split("## Paired comparison")[0]
    efficiency = pd.read_csv(out / "efficiency.csv").set_index("label")
    assert efficiency.loc["knn", "rule"] == "knn_baseline" and not efficiency.loc["knn", "profiled"]
    assert "Not profiled" in (out / "efficiency.tex").read_text()
    without = tmp_path / "without"
    report.write_report(runs, profiles, without, methods=METHODS)
    assert report.NOT_PROFILED not in (without / "efficiency.md").read_text()
