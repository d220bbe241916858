import json
from pathlib import Path

from blocklora.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_fewshot_command_writes_the_sampled_subset(toy_dataset, tmp_path):
    _, split = toy_dataset
    out = tmp_path / "fs.json"
    assert main(["fewshot", str(split), "--shots", "2", "--seed", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    full = json.loads(split.read_text())
    assert set(data) == {"train", "val", "test"}
    assert len(data["train"]) == 2 * 4 and len(data["val"]) == 2 * 4
    assert data["test"] == full["test"]


def test_listing_commands(capsys):
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert "blocklora" in listed and "lora" in listed and "zeroshot" in listed
    assert main(["datasets"]) == 0
    assert "oxford_pets" in capsys.readouterr().out


def test_prepare_names_an_unknown_dataset(tmp_path, caplog):
    assert main(["prepare", "imagenet_x", "--data-root", str(tmp_path)]) == 1
    assert "imagenet_x" in caplog.text and "oxford_pets" in caplog.text


def test_every_option_of_every_command_explains_itself():
    import argparse

    from blocklora.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helpless = [
        f"{name} {action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert not helpless, helpless
    summaries = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(summaries) == set(commands.choices) and all(summaries.values())


def test_the_commands_that_ask_for_a_method_or_dataset_list_them(capsys):
    import pytest

    from blocklora.catalog import load_catalog

    for command in ("train", "transfer", "profile", "prepare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        if command != "prepare":
            assert all(name in text for name in load_catalog()), command
        if command != "profile":
            assert "oxford_pets" in text and "imagenet_sketch" in text, command


def test_listings_have_headers_and_start_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; from blocklora.cli import main; main(['methods']); main(['datasets']); "
        "print('torch' in sys.modules, 'open_clip' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["method", "summary"]
    assert next(line for line in lines if line.startswith("dataset")).split()[:3] == [
        "dataset",
        "title",
        "classes",
    ]
    assert "CoOp's split file" in out and "manual download" in out
    assert lines[-1] == "False False"


def test_a_listing_into_a_closed_pipe_exits_quietly():
    import subprocess
    import sys

    listing = subprocess.Popen(
        [sys.executable, "-m", "blocklora.cli", "datasets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    listing.stdout.read(10)
    listing.stdout.close()  # as `| head -c 10` does
    _, stderr = listing.communicate(timeout=60)
    assert listing.returncode == 0 and b"Traceback" not in stderr and b"BrokenPipe" not in stderr


def test_plan_prints_jobs_iterations_and_data_before_anything_runs(capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "config.yaml"
    assert main(["plan", "--configfile", str(config), "--suite", "paper"]) == 0
    out = capsys.readouterr().out
    assert "suite paper: ViT-B-16 (openai), 11 datasets, 15 methods" in out
    lora = next(line for line in out.splitlines() if line.strip().startswith("lora "))
    assert lora.split()[1:4] == ["165", "0", "511,500"]  # 11 datasets x 3 seeds x 500 x (1+2+4+8+16)
    assert "2321 train" in out and "no profile" in out and "snakemake profiles" in out
    assert "154.6 GB" in out and "manual: ILSVRC2012_img_train.tar" in out
    # CoCoOp on ImageNet: 10 epochs of 16,000 one-image steps, 1000 prompts each; 50,000 test images
    assert (
        "most prompts in one run: cocoop on imagenet (16 shots, seed 1): 160,000 steps, "
        "160.0 M prompts in training and 50.0 M at test time"
    ) in out
    assert main(["plan", "--configfile", str(config), "--config", "without=[imagenet,sun397]"]) == 0
    out = capsys.readouterr().out
    assert "left out (without:): imagenet, sun397" in out and "1899 train" in out  # 9 x (14 x 15 + 1)


def test_a_script_runs_as_python_would_run_it(tmp_path):
    """`blocklora script` (a rule-made baseline's job, started from the preloaded process)."""
    import os
    import subprocess
    import sys

    (tmp_path / "helper.py").write_text("VALUE = 'from beside the script'\n")
    script = tmp_path / "baseline.py"
    script.write_text(
        "import sys\n"
        "import helper\n"
        "if __name__ == '__main__':\n"
        "    print(sys.argv[1:], helper.VALUE)\n"
        "    if sys.argv[1] == 'fail':\n"
        "        raise RuntimeError('boom')\n"
        "    sys.exit('bad hyper-parameter' if sys.argv[1] == 'refuse' else int(sys.argv[1]))\n"
    )
    env = {**os.environ, "BLOCKLORA_PRELOAD": "0"}  # in-process: what the preloaded child runs

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "blocklora.cli", "script", str(script), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)

    done = run("0", "--k", "20")
    assert done.returncode == 0 and done.stdout == "['0', '--k', '20'] from beside the script\n", done.stderr
    assert run("3").returncode == 3
    refused = run("refuse")
    assert refused.returncode == 1 and refused.stderr.strip() == "bad hyper-parameter"
    failed = run("fail")
    assert failed.returncode == 1 and "Traceback" in failed.stderr and "RuntimeError: boom" in failed.stderr
