"""What users meet, at the level they meet it: a killed snakemake, a full disk, corrupted files, two
jobs wanting the same cache. Through real snakemake runs or the real command line."""

from __future__ import annotations

import copy
import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from blocklora import io as io_module
from blocklora.cli import main as cli_main
from tests.workflow.test_workflow import CONFIG, REPO, snakemake

ENV = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def one_run_config(iterations: int) -> dict:
    """A suite of one LoRA run on the smoke suite's data that checkpoints every 10 iterations."""
    config = copy.deepcopy(CONFIG)
    config["suite"] = "faults"
    config["suites"]["faults"] = {
        **copy.deepcopy(CONFIG["suites"]["smoke"]),
        "methods": ["lora"],
        "shots": [2],
        "seeds": [1],
        "hparams": {"lora": {"iterations": iterations, "checkpoint_every": 10, "batch_size": 8}},
    }
    return config


def record_of(workdir: Path) -> dict:
    [path] = (workdir / "results" / "runs").rglob("record.json")
    return json.loads(path.read_text())


def test_a_killed_snakemake_resumes_its_run_from_the_checkpoint_with_the_same_record(tmp_path):
    """kill -9 of snakemake and its job mid-training; then `snakemake --unlock` and the same command."""
    config = one_run_config(iterations=120)  # killed at its first checkpoint (10), 110 iterations early
    reference = tmp_path / "uninterrupted"
    reference.mkdir()
    assert snakemake(reference, "--cores", "2", "-R", "train", config=config, env=ENV).returncode == 0
    expected = record_of(reference)

    workdir = tmp_path / "killed"
    workdir.mkdir()
    (workdir / "config.test.yaml").write_text(json.dumps(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(workdir / "config.test.yaml"), "--cores", "2"]  # fmt: skip
    job = subprocess.Popen(
        command, cwd=workdir, env={**os.environ, **ENV}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((workdir / "results" / "runs").rglob("record.checkpoint.pt")):
        assert job.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)  # snakemake, its shell and the job, at once
    job.wait()
    assert not list((workdir / "results" / "runs").rglob("record.json"))

    again = subprocess.run(command, cwd=workdir, env={**os.environ, **ENV}, capture_output=True, text=True)
    assert again.returncode != 0 and "--unlock" in again.stdout + again.stderr  # the lock says what to do
    assert subprocess.run([*command, "--unlock"], cwd=workdir, capture_output=True).returncode == 0
    resumed = subprocess.run(command, cwd=workdir, env={**os.environ, **ENV}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = record_of(workdir)
    assert record["train_stats"]["resumed_from"] > 0
    for key in ("accuracy", "config_hash", "inputs_hash", "iterations"):
        assert record[key] == expected[key], key
    assert record["train_stats"]["loss_last"] == expected["train_stats"]["loss_last"]


def test_a_corrupted_checkpoint_or_cache_is_named_and_rebuilt(
    toy_dataset, tiny_config, tiny_checkpoint, tmp_path, caplog
):
    images, fewshot = toy_dataset
    record, state = tmp_path / "lora" / "record.json", tmp_path / "lora" / "state.safetensors"
    record.parent.mkdir()
    checkpoint = record.with_name("record.checkpoint.pt")
    checkpoint.write_bytes(b"not a checkpoint")
    argv = ["train", "--method", "lora", "--dataset", "toy", "--template", "{}", "--fewshot", str(fewshot),
            "--image-root", str(images), "--shots", "2", "--seed", "1", "--backbone", tiny_config,
            "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--no-progress", "--threads", "1",
            "--hparams", '{"iterations": 4, "checkpoint_every": 2}', "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli_main([*argv, "--record", str(record), "--state", str(state)]) == 0
    assert f"ignoring unreadable checkpoint {checkpoint}" in caplog.text
    assert json.loads(record.read_text())["train_stats"]["resumed_from"] == 0

    probe = ["train", "--method", "linear_probe", "--dataset", "toy", "--template", "{}", "--fewshot", str(fewshot),
             "--image-root", str(images), "--shots", "2", "--seed", "1", "--backbone", tiny_config,
             "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--no-progress", "--threads", "1",
             "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli_main([*probe, "--record", str(tmp_path / "p1.json"), "--state", str(tmp_path / "p1.st")]) == 0
    for cached in (tmp_path / "cache").glob("*.safetensors"):
        cached.write_bytes(cached.read_bytes()[:100])  # cut short, as by a full disk
    for pixels in (tmp_path / "cache" / "eval_images").glob("*.npy"):
        pixels.write_bytes(pixels.read_bytes()[:100])
    caplog.clear()
    assert cli_main([*probe, "--record", str(tmp_path / "p2.json"), "--state", str(tmp_path / "p2.st")]) == 0
    assert (
        "is unreadable" in caplog.text and "encoding again" in caplog.text and "decoding again" in caplog.text
    )
    first, second = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in (1, 2))
    assert first["accuracy"] == second["accuracy"]


def test_a_full_disk_while_writing_a_record_or_a_report_names_it_and_keeps_the_previous_file(
    toy_dataset, tiny_config, tiny_checkpoint, tmp_path, monkeypatch, caplog
):
    images, fewshot = toy_dataset
    record, state = tmp_path / "record.json", tmp_path / "state.safetensors"
    argv = ["train", "--method", "zeroshot", "--dataset", "toy", "--template", "{}", "--fewshot", str(fewshot),
            "--image-root", str(images), "--backbone", tiny_config, "--pretrained", str(tiny_checkpoint),
            "--device", "cpu", "--no-progress", "--record", str(record), "--state", str(state)]  # fmt: skip
    assert cli_main(argv) == 0
    previous = record.read_text()
    report_argv = ["report", "--records", str(record), "--out-dir", str(tmp_path / "report")]
    assert cli_main(report_argv) == 0
    previous_report = (tmp_path / "report" / "report.md").read_text()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_module.os, "fsync", full)
    caplog.clear()
    assert cli_main(argv) == 1
    assert f"could not write {record}" in caplog.text and "No space left on device" in caplog.text
    assert record.read_text() == previous
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    caplog.clear()
    assert cli_main(report_argv) == 1
    assert "could not write" in caplog.text and "No space left on device" in caplog.text
    assert (tmp_path / "report" / "report.md").read_text() == previous_report


def _encode_slowly(cache: str, images: str, entries: list, tiny: str, checkpoint: str, out: str) -> None:
    """In a separate process: build the test features of ``entries``, encoding slowly."""
    import open_clip

    from blocklora import features
    from blocklora.clip import load_backbone
    from blocklora.runtime import RunContext
    from tests.conftest import TINY_CONFIG

    folder = Path(out).parent / "configs"
    folder.mkdir(exist_ok=True)
    (folder / f"{tiny}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    original = features._encode

    def slow(*args, **kwargs):
        Path(out).with_suffix(".encoded").write_text("1")
        time.sleep(1.0)
        return original(*args, **kwargs)

    features._encode = slow
    backbone = load_backbone(tiny, checkpoint)
    run = RunContext(device=torch.device("cpu"), seed=1, progress=False, cache_dir=Path(cache), threads=1)
    result = features.image_features(backbone, entries, images, augment=False, run=run, test_split=True)
    torch.save(result, out)


def test_two_jobs_wanting_the_same_features_encode_them_once(
    toy_dataset, tiny_config, tiny_checkpoint, tmp_path
):
    images, fewshot = toy_dataset
    entries = json.loads(fewshot.read_text())["test"]
    context = multiprocessing.get_context("spawn")
    jobs = [
        context.Process(
            target=_encode_slowly,
            args=(str(tmp_path / "cache"), str(images), entries, tiny_config, str(tiny_checkpoint), str(tmp_path / f"{i}.pt")),
        )
        for i in range(2)
    ]  # fmt: skip
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    assert len(list(tmp_path.glob("*.encoded"))) == 1  # the other waited, then read the cache
    torch.testing.assert_close(torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt"))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
