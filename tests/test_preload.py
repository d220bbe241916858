"""The preload server: heavy commands run in a forked child that behaves as the command line would."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blocklora import preload
from tests.conftest import write_toy_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path):
    """A private server folder, preloading forced on, and two fake GPUs whose locks name the claimer."""
    environ = {
        **os.environ,
        "BLOCKLORA_PRELOAD": "1",
        "BLOCKLORA_PRELOAD_DIR": str(tmp_path / "servers"),
        "BLOCKLORA_NUM_GPUS": "2",
        "BLOCKLORA_GPU_LOCKS": str(tmp_path / "locks"),
        "PYTHONPATH": str(REPO),
    }
    environ.pop("CUDA_VISIBLE_DEVICES", None)
    yield environ
    subprocess.run([sys.executable, "-m", "blocklora.cli", "preload", "--stop"], env=environ, check=False)


@pytest.fixture
def toy(tmp_path):
    """A 4-class toy dataset in tmp_path/data, referred to by relative paths from tmp_path."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fewshot.json").write_text(
        json.dumps(write_toy_dataset(tmp_path / "data" / "images"))
    )
    return tmp_path


def train_argv(method: str, hparams: dict, out: str) -> list[str]:
    return [
        sys.executable, "-m", "blocklora.cli", "train", "--method", method, "--hparams", json.dumps(hparams),
        "--dataset", "toy", "--template", "{}", "--fewshot", "data/fewshot.json", "--image-root", "data/images",
        "--shots", "2", "--seed", "1", "--backbone", "demo-tiny", "--pretrained", "none",
        "--record", f"{out}/record.json", "--state", f"{out}/state.safetensors", "--no-progress", "--threads", "1",
    ]  # fmt: skip


def claimer(tmp_path: Path, timeout: float = 60) -> int:
    """The pid that holds fake GPU 0 (written into its lock file by the claim)."""
    lock = tmp_path / "locks" / "gpu0.lock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().strip():
            return int(lock.read_text())
        time.sleep(0.05)
    raise AssertionError("no GPU was claimed")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.is_file() and state.read_text().split()[2] == "Z")


def test_a_train_job_runs_in_a_forked_child_with_the_callers_directory_environment_and_streams(env, toy):
    caller = subprocess.Popen(
        train_argv("zeroshot", {}, "out"),
        cwd=toy,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = caller.communicate(timeout=300)
    assert caller.returncode == 0, stderr
    assert claimer(toy) != caller.pid  # run by another process ...
    assert "claimed GPU 0 of 0,1" in stderr  # ... with the caller's environment and standard error
    assert json.loads((toy / "out" / "record.json").read_text())["method"] == "zeroshot"  # and directory
    status = subprocess.run(
        [sys.executable, "-m", "blocklora.cli", "preload"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout.splitlines()[0].endswith(": 1")

    failed = subprocess.run(train_argv("nope", {}, "out2"), cwd=toy, env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "unknown method 'nope'" in failed.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "blocklora.cli", "train", "--shots", "x"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert usage.returncode == 2 and "usage: blocklora train" in usage.stderr


def test_a_caller_killed_with_sigkill_takes_its_child_with_it(env, toy):
    caller = subprocess.Popen(
        train_argv("lora", {"iterations": 100_000}, "long"), cwd=toy, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    child = claimer(toy)
    assert child != caller.pid and alive(child)
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_to_the_caller_reach_the_child_and_its_status_comes_back(env, toy, signum, code):
    caller = subprocess.Popen(
        train_argv("lora", {"iterations": 100_000}, f"sig{signum}"), cwd=toy, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = claimer(toy)
    caller.send_signal(signum)
    _, stderr = caller.communicate(timeout=60)
    assert caller.returncode == code, stderr
    assert not alive(child)


def test_the_server_key_follows_the_code_the_interpreter_and_import_time_settings(tmp_path, monkeypatch):
    package = tmp_path / "blocklora"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(preload, "PACKAGE", package)
    key = functools.partial(preload.server_key, "blocklora.cli:main", "blocklora.cli:preload_imports")
    first = key()
    assert key() == first
    (package / "a.py").write_text("x = 22\n")  # an edit
    edited = key()
    assert edited != first
    monkeypatch.setenv("OMP_BLOCKLORA_TEST", "3")  # an OMP_ setting
    assert key() != edited
    monkeypatch.delenv("OMP_BLOCKLORA_TEST")
    monkeypatch.setenv("SOME_JOB_SETTING", "x")  # read at run time: the same server
    assert key() == edited
    assert preload.server_key("other:main", "blocklora.cli:preload_imports") != edited  # another command


def test_preloading_is_on_by_default_off_inside_slurm_and_can_be_forced():
    assert preload.enabled({})
    assert not preload.enabled({"SLURM_JOB_ID": "12"})
    assert preload.enabled({"SLURM_JOB_ID": "12", "BLOCKLORA_PRELOAD": "1"})
    assert not preload.enabled({"BLOCKLORA_PRELOAD": "0"})


def test_only_heavy_commands_go_through_a_server(monkeypatch, capsys):
    from blocklora import cli

    assert cli.command_of(["-v", "train", "--method", "x"]) == "train"
    asked = []
    monkeypatch.setattr(preload, "run", lambda argv, **kwargs: asked.append((argv, kwargs)) or 0)
    monkeypatch.setattr(sys, "argv", ["blocklora", "methods"])
    assert cli.entry() == 0 and asked == []  # a light command runs here
    assert "blocklora" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["blocklora", "-v", "report", "--help"])
    assert cli.entry() == 0
    assert asked == [
        (
            ["-v", "report", "--help"],
            {"target": "blocklora.cli:main", "warm": "blocklora.cli:preload_imports"},
        )
    ]
