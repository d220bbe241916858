"""Adding a baseline is one method module plus one config entry: its jobs appear, and it runs."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

from tests.workflow.test_workflow import CONFIG, REPO, job_counts, outputs_of, snakemake

README = (REPO / "README.md").read_text()
# The README's worked example of a new baseline, verbatim: this test keeps it true.
TOY_METHOD = re.search(r"```python\n# blocklora/methods/ensemble.py\n(.*?)```", README, re.S)[1]


def test_a_method_from_a_new_module_gets_its_jobs(tmp_path):
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    config = copy.deepcopy(CONFIG)
    config["methods"]["ensemble"] = {
        "module": "toy_method",
        "templates": ["a photo of a {}.", "itap of a {}."],
    }
    config["suites"]["paper"]["methods"].append("ensemble")
    result = snakemake(tmp_path, "-n", "-p", config=config)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    paper = CONFIG["suites"]["paper"]
    cells = len(paper["datasets"]) * len(paper["shots"]) * len(paper["seeds"])
    zeroshot_once = len(paper["datasets"])
    assert job_counts(output)["train"] == cells * len(paper["methods"]) + zeroshot_once
    ensemble = {p for p in outputs_of(output, "train") if "/ensemble-" in p and p.endswith("record.json")}
    assert len(ensemble) == cells
    assert "--method ensemble --module toy_method" in output


def test_the_new_method_runs_through_the_cli(tmp_path, toy_dataset, tiny_config, tiny_checkpoint):
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    images, fewshot = toy_dataset
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code = (
        "import open_clip, sys; open_clip.add_model_config(sys.argv[1]); "
        "from blocklora.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    record = tmp_path / "record.json"
    args = [
        "train", "--method", "ensemble", "--module", "toy_method", "--dataset", "toy", "--fewshot", str(fewshot),
        "--image-root", str(images), "--shots", "1", "--seed", "1", "--backbone", tiny_config,
        "--pretrained", str(tiny_checkpoint), "--hparams", '{}', "--record", str(record),
        "--state", str(tmp_path / "state.safetensors"), "--device", "cpu", "--template", "{}", "--no-progress",
    ]  # fmt: skip
    from tests.conftest import TINY_CONFIG

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / f"{tiny_config}.json").write_text(json.dumps(TINY_CONFIG))
    result = subprocess.run(
        [sys.executable, "-c", code, str(config_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(record.read_text())
    assert saved["method"] == "ensemble" and saved["trainable_params"] == 0
    assert saved["hparams"]["templates"] == ["a photo of a {}.", "a blurry photo of a {}."]
