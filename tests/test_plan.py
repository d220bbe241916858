"""The plan: typed config, checks that stop before any job, runs keyed by what they are."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from blocklora import hparams
from blocklora.catalog import build_catalog, load_catalog
from blocklora.plan import ConfigError, Plan, coerce_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def config(**changes) -> dict:
    cfg = copy.deepcopy(CONFIG)
    cfg.update(changes)
    return cfg


def test_the_shipped_catalog_is_the_registry():
    assert load_catalog() == build_catalog(), "stale: run `blocklora methods --write-catalog` and commit it"


def test_text_from_the_command_line_gets_the_schemas_types():
    cfg = config()
    cfg["suites"]["paper"].update(shots=["4", "16"], seeds=["1"], profile_classes="100")
    cfg["without"] = ["imagenet"]
    cfg["rehearse"] = "false"
    coerce_config(cfg, SCHEMA)
    assert cfg["suites"]["paper"]["shots"] == [4, 16] and cfg["suites"]["paper"]["seeds"] == [1]
    assert cfg["suites"]["paper"]["profile_classes"] == 100 and cfg["rehearse"] is False
    assert cfg["suite"] == "paper" and cfg["without"] == ["imagenet"]  # strings stay strings


def test_hyper_parameters_arriving_as_text_are_typed_by_the_methods_defaults():
    cfg = config()
    cfg["suites"]["paper"]["hparams"] = {
        "lora": {"lr": "0.001", "rank": "4", "iterations": "null", "crop_scale": "[0.5, 1.0]"},
        "coop": {"compile": "reduce-overhead", "epochs": "12"},
    }
    plan = Plan(cfg)
    lora = plan.method_setup("paper", "lora").overrides
    assert lora["lr"] == 0.001 and lora["rank"] == 4 and lora["iterations"] is None
    assert lora["crop_scale"] == [0.5, 1.0]
    coop = plan.method_setup("paper", "coop").overrides
    assert coop == {"compile": "reduce-overhead", "epochs": 12}


@pytest.mark.parametrize(
    ("entry", "overrides", "message"),
    [
        ("lora", {"rnak": 4}, r"unknown hyper-parameter\(s\) \['rnak'\] for method 'lora'"),
        ("lora", {"lr": "fast"}, r"hyper-parameter 'lr' of method 'lora': expected float, got 'fast'"),
        ("linear_probe", {"C": [1]}, r"hyper-parameter 'C' of method 'linear_probe': expected float or null"),
        ("coop", {"epochs": 1.5}, r"'epochs' of method 'coop': expected int, got 1.5"),
        ("coop", {"iterations": 10}, r"unknown hyper-parameter\(s\) \['iterations'\] for method 'coop'"),
        ("prograd", {"when": {"shots": 8}}, r"`when` of method 'prograd' takes a list of rules"),
        ("prograd", {"when": [{"shots": 8}]}, r"rule 1 of `when`: `set` must name the hyper-parameters"),
        (
            "prograd",
            {"when": [{"set": {"lambda": 0.5}}]},
            r"rule 1 of `when`: name the `dataset` or the `shots`",
        ),
        (
            "prograd",
            {"when": [{"shot": 8, "set": {"lambda": 0.5}}]},
            r"rule 1 of `when`: unknown key\(s\) \['shot'\]",
        ),
        (
            "prograd",
            {"when": [{"shots": 8, "set": {"lamda": 0.5}}]},
            r"unknown hyper-parameter\(s\) \['lamda'\]",
        ),
        (
            "prograd",
            {"when": [{"shots": 8, "set": {"lambda": "high"}}]},
            r"'lambda' of method 'prograd': expected float",
        ),
        (
            "prograd",
            {"when": [{"shots": "eight", "set": {"lambda": 0.5}}]},
            r"`shots` of a `when` rule takes a int",
        ),
        (
            "taskres",
            {"when": [{"dataset": "imagnet", "set": {"lr": 0.1}}]},
            r"rule 1 of `when` names unknown dataset 'imagnet'",
        ),
    ],
)
def test_a_wrong_hyper_parameter_is_an_error_naming_suite_entry_and_key(entry, overrides, message):
    cfg = config()
    cfg["suites"]["paper"]["hparams"] = {entry: overrides}
    with pytest.raises(ConfigError, match=message) as err:
        Plan(cfg)
    assert f"suite 'paper', method entry '{entry}'" in str(err.value)


def test_a_subset_of_a_suites_methods_keeps_their_hparams_and_a_misnamed_entry_is_an_error():
    cfg = config(suite="demo")
    cfg["suites"]["demo"]["methods"] = ["zeroshot", "lora"]  # the demo has hparams for all eight
    runs = Plan(cfg).suites["demo"].runs
    assert {label for label, _ in runs} == {"zeroshot", "lora"}
    assert Plan(cfg).method_setup("demo", "lora").overrides["iterations"] == 200
    cfg["suites"]["demo"]["hparams"]["blocklra"] = {"rank": 4}
    with pytest.raises(ConfigError, match=r"suite 'demo' has hparams for unknown method 'blocklra'"):
        Plan(cfg)


def test_a_method_tied_to_its_classes_cannot_be_a_cross_dataset_transfer():
    cfg = config(suite="cross_dataset")
    cfg["suites"]["cross_dataset"]["methods"].append("linear_probe")
    with pytest.raises(ConfigError, match=r"'linear_probe' learns parameters tied to imagenet's classes"):
        Plan(cfg)
    Plan(config(suite="domain_generalization"))  # ImageNet's variants share its classes: fine


def test_runs_are_keyed_by_what_they_are_and_shared_between_suites():
    plan = Plan(config(suite=["paper", "ablation"]))
    paper = {
        label: run for label, run in plan.suites["paper"].runs if run.dataset == "dtd" and run.shots == 16
    }
    ablation = {label: run for label, run in plan.suites["ablation"].runs if run.dataset == "dtd"}
    assert paper["blocklora"] == ablation["blocklora_n8"]  # same resolved hyper-parameters
    assert paper["lora"].folder == ablation["lora"].folder
    assert ablation["lora_r4"].folder != ablation["lora"].folder
    assert paper["lora"].folder.startswith("runs/ViT-B-16_openai/dtd/lora-")
    assert paper["lora"].folder.endswith("/shots16_seed1") or paper["lora"].seed != 1
    zeroshot = [run for label, run in plan.suites["paper"].runs if label == "zeroshot"]
    assert len(zeroshot) == len(CONFIG["suites"]["paper"]["datasets"]) and zeroshot[0].cell == "any_shots"


def test_without_leaves_datasets_out_and_the_report_is_told():
    plan = Plan(config(without=["imagenet", "sun397"]))
    paper = plan.suites["paper"]
    assert "imagenet" not in paper.datasets and paper.left_out == ["imagenet", "sun397"]
    args = plan.report_args("paper")
    assert args[args.index("--left-out") + 1 :] == ["imagenet", "sun397"]
    with pytest.raises(ConfigError, match=r"suite 'cross_dataset' trains only on imagenet"):
        Plan(config(suite="cross_dataset", without=["imagenet"]))
    with pytest.raises(ConfigError, match=r"`without:` names unknown dataset 'imagnet'"):
        Plan(config(without=["imagnet"]))


def test_a_transfer_suite_averages_over_its_targets():
    args = Plan(config(suite="domain_generalization")).report_args("domain_generalization")
    assert args[args.index("--average-over") + 1 :][:4] == [
        "imagenet_v2",
        "imagenet_sketch",
        "imagenet_a",
        "imagenet_r",
    ]


def test_the_report_gets_the_published_numbers_as_an_input_under_the_repository(tmp_path):
    plan = Plan(config(suite="demo"), root=REPO)
    shipped = str(REPO / "workflow" / "published" / "few_shot.yaml")
    args = plan.report_args("demo")
    assert args[args.index("--published") + 1] == shipped
    assert plan.report_inputs("demo")["published"] == [shipped]  # editing it re-makes the report
    for off in (None, "null"):  # config.yaml, or --config published=null
        plan = Plan(config(suite="demo", published=off), root=REPO)
        assert "--published" not in plan.report_args("demo") and plan.report_inputs("demo")["published"] == []
    mine = tmp_path / "mine.yaml"
    mine.write_text((REPO / "workflow" / "published" / "few_shot.yaml").read_text())
    assert Plan(config(published="mine.yaml"), root=tmp_path).published == str(mine)


def test_a_malformed_published_file_stops_the_plan_naming_file_entry_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {method: X, backbone: ViT-B/16, source: s, url: u, accuracy: {dtd: {1: 140}}}\n")
    with pytest.raises(
        ConfigError,
        match=r"config `published:`: .*bad\.yaml, entry 1 \(X\), field `accuracy\.dtd\.1`: accuracy 140",
    ):
        Plan(config(published=str(bad)))
    with pytest.raises(ConfigError, match=r"cannot read published numbers .*nowhere\.yaml"):
        Plan(config(published="nowhere.yaml"), root=tmp_path)


def test_the_rehearsal_overlays_the_real_suites():
    plan = Plan(config(rehearse=True))
    assert plan.chosen == CONFIG["rehearsal"]["suites"] and plan.results == "results/rehearsal"
    assert plan.archives_dir == "results/rehearsal/fixtures"
    for name in plan.chosen:
        suite = plan.suites[name]
        assert suite.shots == [1] and suite.seeds == [1]
        assert {run.setup.backbone for _, run in suite.runs} == {"demo-tiny"}
        lora = next(run for label, run in suite.runs if label == "lora").method.overrides
        assert lora["iterations"] == 2
    # the real suites' names, datasets, methods and transfers are all kept
    assert plan.suites["paper"].datasets == CONFIG["suites"]["paper"]["datasets"]
    assert len(plan.suites["domain_generalization"].transfers) == 14 * 4


def _paper_runs(plan: Plan, entry: str) -> dict[tuple[str, int], object]:
    return {
        (run.dataset, run.shots): run
        for label, run in plan.suites["paper"].runs
        if label == entry and run.seed == 1
    }


def test_values_set_per_dataset_and_shot_count_reach_exactly_their_runs():
    runs = _paper_runs(Plan(config()), "prograd")
    lam = {cell: run.method.hparams["lambda"] for cell, run in runs.items()}
    assert lam[("dtd", 8)] == lam[("eurosat", 16)] == lam[("oxford_flowers", 8)] == 0.8  # ProGrad's README
    assert lam[("dtd", 4)] == lam[("caltech101", 16)] == 1.0
    epochs = {cell: run.method.hparams["epochs"] for cell, run in runs.items()}
    assert (epochs[("dtd", 1)], epochs[("dtd", 2)], epochs[("dtd", 8)], epochs[("imagenet", 16)]) == (
        50,
        100,
        200,
        50,
    )
    taskres = _paper_runs(Plan(config()), "taskres")
    assert (
        taskres[("imagenet", 4)].method.hparams["lr"] == 2e-4
        and taskres[("dtd", 4)].method.hparams["lr"] == 2e-3
    )
    assert taskres[("oxford_flowers", 1)].method.hparams["alpha"] == 1.0


def test_config_rules_win_over_the_methods_own_and_move_only_the_runs_they_change():
    before = _paper_runs(Plan(config()), "prograd")
    cfg = config()
    # a flat value beats the method's rules; the config's rules beat the flat value
    cfg["methods"]["prograd"] = {
        "lambda": 0.9,
        "when": [{"dataset": "dtd", "shots": ["16"], "set": {"lambda": "0.5"}}],
    }
    after = _paper_runs(Plan(cfg), "prograd")
    assert after[("dtd", 16)].method.hparams["lambda"] == 0.5
    assert (
        after[("dtd", 8)].method.hparams["lambda"] == after[("caltech101", 1)].method.hparams["lambda"] == 0.9
    )
    # the job resolves the same values from the overrides it is given
    from blocklora.methods import get_method, resolve_hparams

    job = after[("dtd", 16)].method
    assert resolve_hparams(get_method("prograd"), job.overrides, dataset="dtd", shots=16) == job.hparams
    # a rule for one dataset leaves the runs of the others where they were
    cfg["methods"]["prograd"] = {"when": [{"dataset": "dtd", "set": {"temperature": 2.0}}]}
    ruled = _paper_runs(Plan(cfg), "prograd")
    assert ruled[("dtd", 4)].folder != before[("dtd", 4)].folder
    assert ruled[("eurosat", 4)].folder == before[("eurosat", 4)].folder


def test_coerce_reads_each_spec():
    assert hparams.coerce("4", "int") == 4 and hparams.coerce("true", "bool") is True
    assert hparams.coerce("null", "int|null") is None and hparams.coerce("x", "bool|str") == "x"
    assert hparams.coerce(["0.5", "1"], "list") == [0.5, 1] and hparams.coerce(3, "float") == 3
    with pytest.raises(ValueError, match="expected int"):
        hparams.coerce(True, "int")


# ------------------------------------------------------------------ baselines made by a rule of their own


def test_a_rule_made_method_runs_every_cell_in_its_own_folders_with_no_profile():
    plan = Plan(config(suite="smoke"))
    smoke = plan.suites["smoke"]
    knn = [run for label, run in smoke.runs if label == "knn"]
    assert [(run.shots, run.seed) for run in knn] == [(1, 1), (2, 1)]  # every shot count and seed
    assert all(run.method.rule == "knn_baseline" and run.method.library == "knn_baseline" for run in knn)
    assert knn[0].folder.startswith("runs/demo-tiny_random/demo_shapes/knn_baseline-")
    assert "knn" not in {label for label, _ in smoke.profiles}  # the library cannot profile its code
    assert plan.external_rules() == {"knn_baseline": ["knn"]}
    assert "knn_baseline" not in plan.library_methods() and "lora" in plan.library_methods()
    args = plan.report_args("smoke")
    assert f"knn=results/{knn[0].folder}/record.json" in args  # the report finds it as any run
    params = plan.rule_params(knn[1])
    assert params == {
        "method": "knn_baseline", "dataset": "demo_shapes", "shots": "2", "seed": "1", "backbone": "demo-tiny",
        "pretrained": "none", "model_configs": str(REPO / "blocklora" / "model_configs"),
        "image_root": "results/data/demo_shapes/images", "hparams": '{"k": 20, "temperature": 0.07}',
        "device": "auto", "run_dir": f"results/{knn[1].folder}",
    }  # fmt: skip
    assert plan.rule_inputs(knn[1]) == {
        "split": "results/data/demo_shapes/split.json",
        "fewshot": "results/fewshot/demo_shapes/shots2_seed1.json",
        "checkpoint": [],
    }
    demo = Plan(config(suite="demo"))
    run = next(run for label, run in demo.suites["demo"].runs if label == "knn")
    assert demo.rule_inputs(run)["checkpoint"] == ["results/demo/backbone.pt"]  # built before its jobs
    assert demo.rule_params(run)["pretrained"] == "results/demo/backbone.pt"


def test_a_rule_made_methods_folder_is_keyed_by_its_rule_and_resolved_hyper_parameters():
    cfg = config(suite="smoke")
    cfg["methods"]["knn_k5"] = {"rule": "knn_baseline", "k": "5", "temperature": 0.07}  # --config gives text
    cfg["methods"]["knn_same"] = {"rule": "knn_baseline", "k": 20, "temperature": 0.07}
    cfg["methods"]["knn_ruled"] = {
        "rule": "knn_baseline",
        "k": 20,
        "temperature": 0.07,
        "when": [{"shots": ["2"], "set": {"k": "3"}}],
    }
    cfg["suites"]["smoke"]["methods"] = ["knn", "knn_k5", "knn_same", "knn_ruled"]
    runs = {(label, run.shots): run for label, run in Plan(cfg).suites["smoke"].runs}
    assert runs[("knn_k5", 1)].method.hparams == {"k": 5, "temperature": 0.07}
    assert runs[("knn_same", 1)].folder == runs[("knn", 1)].folder  # one run, whichever entry asks
    assert runs[("knn_k5", 1)].folder != runs[("knn", 1)].folder
    assert runs[("knn_ruled", 1)].folder == runs[("knn", 1)].folder  # the rule leaves 1 shot alone
    assert runs[("knn_ruled", 2)].method.hparams["k"] == 3


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"rule": "knn_baseline", "method": "lora"}, r"says its runs are made by that rule, not by the library: drop `method`"),
        ({"rule": "lora"}, r"rule 'lora' has the name of a method of the library"),
        ({"rule": "knn-baseline"}, r"`rule: knn-baseline` is not a rule name"),
        ({"rule": "knn_baseline", "when": [{"dataset": "dtdd", "set": {"k": 3}}]}, r"names unknown dataset 'dtdd'"),
    ],
)  # fmt: skip
def test_a_wrong_rule_entry_is_an_error_naming_it(entry, message):
    cfg = config(suite="smoke")
    cfg["methods"]["knn"] = entry
    with pytest.raises(ConfigError, match=message) as err:
        Plan(cfg)
    assert "method entry 'knn'" in str(err.value)


def test_a_rule_made_method_cannot_be_tested_on_other_datasets():
    cfg = config(suite="cross_dataset")
    cfg["suites"]["cross_dataset"]["methods"].append("knn")
    with pytest.raises(
        ConfigError, match=r"'knn' is made by rule 'knn_baseline', whose runs cannot be tested"
    ):
        Plan(cfg)


def test_the_budget_counts_a_rule_made_methods_jobs_under_its_rule():
    from blocklora.budget import lines

    out = "\n".join(lines(Plan(config(suite="smoke"))))
    knn = next(line for line in out.splitlines() if line.strip().startswith("knn "))
    assert knn.split()[1:] == ["2", "0", "0", "0", "0", "own", "rule"]
    assert "29 train, 2 knn_baseline, 0 transfer, 15 profile, 1 report" in out
    assert "'own rule': made by a rule of its own (knn_baseline)" in out


def test_a_suites_jobs_ask_for_its_own_resources_over_the_top_level_ones():
    plan = Plan(config(suite=["paper", "smoke"]))
    paper = plan.all_runs()[next(run.folder for _, run in plan.suites["paper"].runs)]
    smoke = plan.all_runs()[next(run.folder for _, run in plan.suites["smoke"].runs)]
    assert plan.job_resources("train", paper.folder) == CONFIG["resources"]["train"]
    assert plan.job_resources("train", smoke.folder) == CONFIG["suites"]["smoke"]["resources"]["train"]
    assert plan.job_resources("train", smoke.folder)["mem_mb"] <= 2000
    profile = next(p.path for _, p in plan.suites["smoke"].profiles)
    assert plan.job_resources("profile", profile)["runtime"] <= 10
    # a job no run names (few-shot files, reports): the largest of the chosen suites
    assert plan.job_resources("other") == CONFIG["resources"]["other"]
    assert (
        Plan(config(suite="smoke")).job_resources("other") == CONFIG["suites"]["smoke"]["resources"]["other"]
    )


def test_a_run_that_suites_share_asks_for_the_largest_of_their_resources_key_by_key():
    cfg = config(suite=["paper", "ablation"])
    cfg["resources"] = {"train": {"mem_mb": 1000, "runtime": 5}}  # the top level, under both
    cfg["suites"]["paper"]["resources"] = {"train": {"mem_mb": 24000}}
    cfg["suites"]["ablation"]["resources"] = {"train": {"runtime": 600, "gpu": 2}}
    plan = Plan(cfg)
    shared = {run.folder for _, run in plan.suites["paper"].runs} & {
        run.folder for _, run in plan.suites["ablation"].runs
    }
    only_paper = next(run.folder for _, run in plan.suites["paper"].runs if run.folder not in shared)
    assert shared
    assert plan.job_resources("train", sorted(shared)[0]) == {
        "gpu": 2,
        "mem_mb": 24000,
        "runtime": 600,
        "threads": 1,
    }
    assert plan.job_resources("train", only_paper) == {"gpu": 1, "mem_mb": 24000, "runtime": 5, "threads": 1}
    with pytest.raises(ConfigError, match="no job kind 'trian'"):
        plan.job_resources("trian")


def test_the_rehearsal_asks_for_small_jobs_whatever_the_real_suites_ask_for():
    plan = Plan(config(rehearse=True))
    small = CONFIG["rehearsal"]["resources"]
    for name, suite in plan.suites.items():
        assert plan.job_resources("train", suite.runs[0][1].folder) == small["train"], name
    assert plan.job_resources("data") == small["data"]


@pytest.mark.parametrize(
    ("resources", "where"),
    [
        ({"train": {"memory": 3000}}, "memory"),
        ({"other": {"gpu": 1}}, "gpu"),
        ({"train": {"mem_mb": 0}}, "0"),
        ({"gpus": {"gpu": 1}}, "gpus"),
    ],
)
def test_resources_are_checked_by_the_schema(resources, where):
    import jsonschema

    cfg = config()
    cfg["suites"]["smoke"]["resources"] = resources
    with pytest.raises(jsonschema.ValidationError, match=where):
        jsonschema.validate(cfg, SCHEMA)
