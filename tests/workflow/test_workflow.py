"""The Snakemake workflow: the DAG of each suite (dry runs), lint, and config errors caught before any job.

Snakemake runs as a subprocess with ``--directory`` set to a temporary folder, so its metadata and
any output path land there, never in the repository.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
PAPER = CONFIG["suites"]["paper"]


def snakemake(
    workdir: Path, *args: str, config: dict | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m snakemake`` on the repository's Snakefile in ``workdir`` (``config`` replaces config.yaml)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    if config is not None:
        path = workdir / "config.test.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        command += ["--configfile", str(path)]
    return subprocess.run(
        [*command, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, **(env or {})},
    )


def job_counts(output: str) -> dict[str, int]:
    """The dry run's job-stats table as {rule: count}."""
    table = output[output.index("Job stats:") :]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def outputs_of(output: str, rule: str) -> set[str]:
    """Output paths of the jobs of ``rule`` listed by a dry run."""
    paths = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        if re.match(rf"(?:local)?rule {rule}:", block.strip()):
            found = re.search(r"^\s+output: (.+)$", block, re.M)
            if found:
                paths.update(p.strip() for p in found[1].split(","))
    return paths


def failed_before_any_job(result: subprocess.CompletedProcess) -> str:
    """The combined output of a run that failed while reading the config (no job was planned)."""
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert "Job stats" not in text and "rule train:" not in text, text
    return text


@pytest.fixture(scope="module")
def paper_dry_run(tmp_path_factory) -> str:
    result = snakemake(tmp_path_factory.mktemp("paper"), "-n")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


RUN_PATH = re.compile(
    r"results/runs/(?P<setup>[^/]+)/(?P<dataset>\w+)/(?P<method>\w+)-(?P<hash>[0-9a-f]{8})/"
    r"(?:shots(?P<shots>\d+)_seed(?P<seed>\d+)|any_shots)/record\.json"
)


def planned_runs(output: str, rule: str = "train", configuration: bool = False) -> list[tuple]:
    """(setup, dataset, method, shots, seed) of each record a dry run plans (shots/seed None for
    any_shots); with ``configuration``, the method is its folder, hash of its hyper-parameters included."""
    runs = []
    for path in outputs_of(output, rule):
        if path.endswith("record.json"):
            match = RUN_PATH.fullmatch(path)
            assert match, path
            shots, seed = match["shots"], match["seed"]
            runs.append(
                (match["setup"], match["dataset"], match["method"], shots and int(shots), seed and int(seed))
            )
    return runs


def test_paper_dry_run_has_one_train_job_per_dataset_method_shots_seed_and_zero_shot_once(paper_dry_run):
    counts = job_counts(paper_dry_run)
    datasets, methods, shots, seeds = (len(PAPER[k]) for k in ("datasets", "methods", "shots", "seeds"))
    assert counts["train"] == datasets * (methods - 1) * shots * seeds + datasets == 11 * 14 * 5 * 3 + 11
    assert counts["download"] == counts["prepare"] == 11
    assert counts["fewshot"] == 11 * 5 * 3
    assert counts["profile"] == 15
    assert counts["report"] == 1
    assert "pretrain_demo" not in counts


def test_paper_dry_run_lists_every_run_record_and_fewshot_file(paper_dry_run):
    expected_records = {
        ("ViT-B-16_openai", d, m, k, s)
        for d in PAPER["datasets"]
        for m in PAPER["methods"]
        for k in PAPER["shots"]
        for s in PAPER["seeds"]
        if m != "zeroshot"
    } | {("ViT-B-16_openai", d, "zeroshot", None, None) for d in PAPER["datasets"]}
    runs = planned_runs(paper_dry_run)
    assert len(runs) == len(set(runs)) and set(runs) == expected_records
    expected_fewshot = {
        f"results/fewshot/{d}/shots{k}_seed{s}.json"
        for d in PAPER["datasets"]
        for k in PAPER["shots"]
        for s in PAPER["seeds"]
    }
    assert outputs_of(paper_dry_run, "fewshot") == expected_fewshot
    assert outputs_of(paper_dry_run, "prepare") == {f"results/data/{d}/split.json" for d in PAPER["datasets"]}


def made_by_rules(entries: list[str]) -> list[str]:
    """The entries whose runs a rule of their own makes (`rule:`), not the library's train jobs."""
    return [entry for entry in entries if "rule" in CONFIG["methods"][entry]]


def test_the_demo_suite_builds_the_demo_backbone_and_data_first(tmp_path):
    result = snakemake(tmp_path, "-n", "-p", "--config", "suite=demo")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    demo = CONFIG["suites"]["demo"]
    cells = len(demo["shots"]) * len(demo["seeds"])
    library = len(demo["methods"]) - len(made_by_rules(demo["methods"]))
    runs = len(demo["datasets"]) * ((library - 1) * cells + 1)  # zero-shot once per dataset
    assert counts["train"] == runs
    assert counts["knn_baseline"] == len(demo["datasets"]) * cells
    knn_lines = [
        line for line in result.stdout.splitlines() if "cli script" in line and "knn_baseline.py" in line
    ]
    assert len(knn_lines) == counts["knn_baseline"]
    assert all("--pretrained results/demo/backbone.pt" in line for line in knn_lines)
    assert counts["demo_corpus"] == counts["pretrain_demo"] == 1
    assert counts["demo_data"] == len(demo["datasets"])
    assert "prepare" not in counts
    train_lines = [line for line in result.stdout.splitlines() if "blocklora.cli train" in line]
    assert len(train_lines) == runs
    assert all("--pretrained results/demo/backbone.pt" in line for line in train_lines)


def test_the_smoke_suite_needs_no_pre_training_and_lists_the_rule_made_runs_under_their_rule(tmp_path):
    result = snakemake(tmp_path, "-n", "-p", "--config", "suite=smoke")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    assert "pretrain_demo" not in counts and "demo_corpus" not in counts
    smoke = CONFIG["suites"]["smoke"]
    assert counts["demo_data"] == len(smoke["datasets"])
    # the k-NN baseline: its own rule's jobs, one per shots x seed, in folders keyed by that rule
    assert made_by_rules(smoke["methods"]) == ["knn"]
    knn = planned_runs(result.stdout, "knn_baseline")
    assert sorted(run[3:] for run in knn) == [(k, s) for k in smoke["shots"] for s in smoke["seeds"]]
    assert {run[2] for run in knn} == {"knn_baseline"} and counts["knn_baseline"] == len(knn)
    assert not any("knn" in path for path in outputs_of(result.stdout, "train"))
    assert counts["profile"] == len(smoke["methods"]) - 1  # the library cannot profile its code


@pytest.mark.parametrize("suite", sorted(CONFIG["suites"]))
def test_every_suite_builds_its_dag(tmp_path, suite):
    result = snakemake(tmp_path, "-n", "-q", "rules", "--config", f"suite={suite}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert job_counts(result.stdout)["report"] == 1


def test_variant_runs_its_library_method_with_its_overrides(tmp_path):
    result = snakemake(tmp_path, "-n", "-p", "--config", "suite=ablation")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [
        line
        for line in result.stdout.splitlines()
        if "blocklora.cli train" in line and "--dataset dtd" in line and '"blocks": 4' in line
    ]
    assert len(lines) == 3  # blocklora_n4: 16 shots x 3 seeds
    assert all("--method blocklora " in line and "/dtd/blocklora-" in line for line in lines)


def test_a_run_several_suites_ask_for_is_planned_once(tmp_path):
    result = snakemake(
        tmp_path, "-n", "-p", "--config", "suite=[paper,ablation,cross_dataset,domain_generalization]"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    runs = planned_runs(output)
    # paper: 2321 runs; ablation adds its 10 entries the paper lacks (not lora, and blocklora_n8 is
    # blocklora), 11 datasets x 16 shots x 3 seeds each; cross_dataset and domain_generalization train
    # only what the paper trains already (ImageNet, 16 shots)
    assert job_counts(output)["train"] == len(runs) == 2321 + 10 * 11 * 3
    paper_lora = '--method lora --hparams \'{"alpha": 1.0, "dropout": 0.25, "rank": 2}\''
    imagenet_lora = [
        line
        for line in output.splitlines()
        if "blocklora.cli train" in line and paper_lora in line and "--dataset imagenet" in line
        and "--shots 16 --seed 1" in line
    ]  # fmt: skip
    assert len(imagenet_lora) == 1  # asked for by all four suites
    # blocklora_n8 is blocklora with the same hyper-parameters: one run, one profile
    blocklora_16 = [r for r in runs if r[1] == "dtd" and r[2] == "blocklora" and r[3:] == (16, 1)]
    # n = 8 (the paper's blocklora), n in 1, 2, 4, 16, r in 1, 4, 8 and the matched initialization
    assert len(blocklora_16) == 1 + 8
    counts = job_counts(output)
    assert counts["report"] == 4 and counts["profile"] == 25
    # each report still gathers all of its runs, under its own labels
    assert output.count("blocklora_n8=results/runs/ViT-B-16_openai/dtd/blocklora-") == 3


def test_methods_all_means_every_method_entry(tmp_path):
    config = copy.deepcopy(CONFIG)
    config["suite"] = "tiny"
    config["suites"]["tiny"] = {**config["suites"]["smoke"], "methods": "all", "hparams": {}}
    result = snakemake(tmp_path, "-n", "-q", "rules", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    # every library entry is profiled; blocklora_n8 has blocklora's hyper-parameters, so they share one
    assert job_counts(result.stdout)["profile"] == len(config["methods"]) - 1 - len(
        made_by_rules(config["methods"])
    )


def test_lint_passes(tmp_path):
    result = snakemake(tmp_path, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_suite_fails_naming_it_and_the_known_suites(tmp_path):
    text = failed_before_any_job(snakemake(tmp_path, "-n", "--config", "suite=nosuchsuite"))
    assert "unknown suite 'nosuchsuite'" in text
    assert "paper" in text and "smoke" in text


def test_unknown_method_fails_naming_it(tmp_path):
    config = copy.deepcopy(CONFIG)
    config["suites"]["paper"]["methods"] = ["zeroshot", "lorra"]
    text = failed_before_any_job(snakemake(tmp_path, "-n", config=config))
    assert "unknown method 'lorra'" in text and "suite 'paper'" in text
    assert "blocklora" in text  # the known methods are listed


def test_unknown_dataset_fails_naming_it(tmp_path):
    config = copy.deepcopy(CONFIG)
    config["suites"]["demo"]["datasets"] = ["demo_shapes", "imagenett"]
    text = failed_before_any_job(snakemake(tmp_path, "-n", config=config))
    assert "unknown dataset 'imagenett'" in text and "suite 'demo'" in text


@pytest.mark.parametrize(
    ("where", "key"),
    [((), "sutie"), (("suites", "paper"), "seed"), (("datasets", "dtd"), "imagedir")],
)
def test_misspelt_key_fails_naming_it(tmp_path, where, key):
    config = copy.deepcopy(CONFIG)
    node = config
    for step in where:
        node = node[step]
    node[key] = 1
    text = failed_before_any_job(snakemake(tmp_path, "-n", config=config))
    assert f"'{key}'" in text


def test_wrong_type_fails_naming_the_value(tmp_path):
    config = copy.deepcopy(CONFIG)
    config["suites"]["paper"]["shots"] = [1, "two"]
    text = failed_before_any_job(snakemake(tmp_path, "-n", config=config))
    assert "'two'" in text


def test_hparams_for_an_entry_that_is_no_method_fail_and_a_subset_of_methods_keeps_its_hparams(tmp_path):
    config = copy.deepcopy(CONFIG)
    config["suites"]["smoke"]["hparams"]["lora_r44"] = {"lr": 0.1}
    (tmp_path / "typo").mkdir()
    text = failed_before_any_job(snakemake(tmp_path / "typo", "-n", config=config))
    assert "unknown method 'lora_r44'" in text and "suite 'smoke'" in text
    subset = "suites={smoke: {methods: [zeroshot, lora]}}"  # smoke has hparams for all eight
    result = snakemake(tmp_path, "-n", "--config", "suite=smoke", subset)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_profile_and_archives_dir_reach_the_jobs(tmp_path):
    result = snakemake(
        tmp_path,
        "-n",
        "--workflow-profile",
        str(REPO / "workflow" / "profiles" / "default"),
        "--config",
        "archives_dir=my_archives",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    prepare = [line for line in result.stdout.splitlines() if "blocklora.cli prepare" in line]
    assert len(prepare) == len(PAPER["datasets"])
    assert all("--archives-dir my_archives" in line for line in prepare)


def test_config_datasets_agree_with_the_registry():
    from blocklora.data.registry import dataset_names, get_dataset

    assert set(CONFIG["datasets"]) == set(dataset_names())
    for name, entry in CONFIG["datasets"].items():
        spec = get_dataset(name)
        assert entry["image_dir"] == spec.image_dir, name
        assert entry.get("synthetic", False) == spec.synthetic, name


def test_a_subset_of_a_suite_from_the_command_line_gets_the_schemas_types(tmp_path):
    subset = "suites={paper: {datasets: [dtd], shots: [4], seeds: [1], hparams: {lora: {iterations: 12}}}}"
    result = snakemake(tmp_path, "-n", "-p", "--config", subset)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert job_counts(output)["train"] == len(PAPER["methods"])  # dtd, 4 shots, seed 1 (zero-shot: any shots)
    lora = [line for line in output.splitlines() if "cli train --method lora" in line]
    assert len(lora) == 1 and '"iterations": 12' in lora[0] and "--shots 4 --seed 1" in lora[0]


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ("{lora: {itrations: 5}}", r"unknown hyper-parameter\(s\) \['itrations'\] for method 'lora'"),
        ("{lora: {num_workers: 0}}", r"unknown hyper-parameter\(s\) \['num_workers'\]"),
        ("{coop: {lr: fast}}", r"hyper-parameter 'lr' of method 'coop': expected float, got 'fast'"),
    ],
)
def test_a_wrong_hyper_parameter_stops_the_workflow_before_any_job(tmp_path, hparams, message):
    text = failed_before_any_job(
        snakemake(tmp_path, "-n", "--config", f"suites={{paper: {{hparams: {hparams}}}}}")
    )
    assert re.search(message, text) and "suite 'paper'" in text


def test_a_config_value_that_reaches_a_shell_cannot_run_commands(tmp_path):
    """demo.backbone is a word of the pre-training job's command line: a value carrying shell syntax
    is refused by the schema (naming it), and would be quoted anyway."""
    injected = "demo-tiny$(touch INJECTED)"
    result = snakemake(
        tmp_path, "--cores", "1", "results/demo/backbone.pt",
        "--config", f"demo={{backbone: '{injected}', corpus_images: 2}}",
        env={"BLOCKLORA_PRELOAD": "0", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert not (tmp_path / "INJECTED").exists(), "a config value ran a shell command"
    text = failed_before_any_job(result)
    assert injected in text and "does not match" in text and "backbone" in text
