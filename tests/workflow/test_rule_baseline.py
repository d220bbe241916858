"""A baseline as a rule of its own (README, "Adding a baseline as a rule"): the README's skeleton, put
into a copy of the workflow, gets its jobs under its own rule's name; a `rule:` that names no rule
stops the workflow before any job."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.workflow.test_workflow import (
    CONFIG,
    REPO,
    RUN_PATH,
    failed_before_any_job,
    job_counts,
    outputs_of,
    snakemake,
)

README = (REPO / "README.md").read_text()
SECTION = README.split("## Adding a baseline as a rule\n", 1)[1].split("\n## ", 1)[0]
SKELETON = re.search(r"```python\n# workflow/rules/my_baseline\.smk\n(.*?)```", SECTION, re.S)[1]
INCLUDE = re.search(r"```python\n(include: .*?)\n```", SECTION, re.S)[1]
ENTRY = yaml.safe_load(re.search(r"```yaml\n(.*?)```", SECTION, re.S)[1])


def workflow_copy(root: Path) -> Path:
    """The repository's workflow in ``root``, the package and environments linked, not copied."""
    root.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "workflow", root / "workflow")
    for name in ("blocklora", "envs"):
        (root / name).symlink_to(REPO / name)
    return root


def test_the_readmes_rule_skeleton_gets_its_jobs_under_its_own_name(tmp_path):
    repo = workflow_copy(tmp_path / "repo")
    (repo / "workflow" / "rules" / "my_baseline.smk").write_text(SKELETON)
    (repo / "workflow" / "scripts" / "my_baseline.py").write_text("# the user's script\n")
    snakefile = repo / "Snakefile"
    example = 'include: "workflow/rules/knn_baseline.smk"\n'
    snakefile.write_text(snakefile.read_text().replace(example, example + INCLUDE + "\n"))
    config = copy.deepcopy(CONFIG)
    [(entry, spec)] = ENTRY["methods"].items()
    config["methods"][entry] = spec
    smoke = config["suites"]["smoke"]
    assert ENTRY["suites"]["smoke"]["methods"][-1] == entry  # named in a suite
    smoke["methods"] = [*smoke["methods"], entry]
    (repo / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    workdir = tmp_path / "work"
    workdir.mkdir()
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir)]
    result = subprocess.run(
        [*command, "-n", "-p", "--config", "suite=smoke"], capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    records = outputs_of(output, "my_baseline")
    cells = {f"shots{k}_seed{s}" for k in smoke["shots"] for s in smoke["seeds"]}
    assert job_counts(output)["my_baseline"] == len(records) == len(cells)
    for path in records:
        match = RUN_PATH.fullmatch(path)
        assert match and match["method"] == "my_baseline" and match["dataset"] == "demo_shapes", path
        assert path.split("/")[-2] in cells
    assert not any("my_baseline" in path for path in outputs_of(output, "train"))
    hparams = json.dumps({key: value for key, value in spec.items() if key != "rule"}, sort_keys=True)
    shell = [line for line in output.splitlines() if "my_baseline.py --fewshot" in line]
    assert len(shell) == len(cells) and all(f"--hparams '{hparams}'" in line for line in shell)
    assert all("--image-root results/data/demo_shapes/images" in line for line in shell)
    assert all("--pretrained none" in line for line in shell)
    # RUN_THREADS and RUN_RESOURCES: what the suite asks for its runs (config.yaml, smoke's `resources: train:`)
    blocks = [
        b for b in re.split(r"\n(?=(?:local)?rule \w+:)", output) if b.strip().startswith("rule my_baseline:")
    ]
    train = smoke["resources"]["train"]
    assert len(blocks) == len(cells)
    for block in blocks:
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)  # snakemake shows only more than 1
        assert (int(threads[1]) if threads else 1) == train["threads"], block
        resources = re.search(r"^\s+resources: (.+)$", block, re.M)[1]
        assert f"mem_mb={train['mem_mb']}," in resources and f"runtime={train['runtime']}" in resources


def test_a_rule_that_the_workflow_lacks_stops_it_before_any_job_listing_the_rules(tmp_path):
    config = copy.deepcopy(CONFIG)
    config["methods"]["knn"]["rule"] = "knn_baselin"
    text = failed_before_any_job(snakemake(tmp_path, "-n", "--config", "suite=smoke", config=config))
    assert "method entry 'knn': `rule: knn_baselin` names no rule of this workflow" in text
    assert "rules that write run records: knn_baseline" in text


def test_a_rule_that_writes_no_run_record_is_refused(tmp_path):
    config = copy.deepcopy(CONFIG)
    config["methods"]["knn"]["rule"] = "report"
    text = failed_before_any_job(snakemake(tmp_path, "-n", "--config", "suite=smoke", config=config))
    assert "rule 'report' must be the one rule that writes the records of its runs, but no rule does" in text
