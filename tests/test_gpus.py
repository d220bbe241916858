import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blocklora import gpus
from blocklora.gpus import claim_gpu, default_lock_dir, visible_gpus

CLAIM = """
import os, sys, time
from blocklora.gpus import claim_gpu
gpu = claim_gpu(sys.argv[1], poll_seconds=0.1, timeout=30)
print(gpu, os.environ["CUDA_VISIBLE_DEVICES"], time.monotonic(), flush=True)
time.sleep(float(sys.argv[2]))
"""


def _spawn(lock_dir, hold, gpus="3"):
    env = {**os.environ, "BLOCKLORA_NUM_GPUS": gpus}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen(
        [sys.executable, "-c", CLAIM, str(lock_dir), str(hold)], env=env, stdout=subprocess.PIPE, text=True
    )


def test_train_transfer_and_profile_commands_claim_a_gpu_before_cuda_starts(tmp_path, monkeypatch):
    """Under fake device counts, each GPU command locks one GPU and sets CUDA_VISIBLE_DEVICES to it."""
    from blocklora import cli

    monkeypatch.setenv("BLOCKLORA_NUM_GPUS", "2")
    monkeypatch.setenv("BLOCKLORA_GPU_LOCKS", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen = []

    def stop(*args, **kwargs):  # the command reached its work with the GPU claimed
        seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        raise RuntimeError("stop here")

    import blocklora.experiment
    import blocklora.profiling

    monkeypatch.setattr(blocklora.experiment, "run_experiment", stop)
    monkeypatch.setattr(blocklora.experiment, "run_transfer", stop)
    monkeypatch.setattr(blocklora.profiling, "profile_method", stop)
    common = ["--method", "zeroshot", "--backbone", "x", "--record", "r.json"]
    commands = [
        ["train", *common, "--dataset", "d", "--fewshot", "f", "--image-root", "i", "--state", "s"],
        ["transfer", *common, "--source", "a", "--source-fewshot", "f", "--state", "s", "--dataset", "d",
         "--split", "p", "--image-root", "i"],
        ["profile", "--method", "lora", "--backbone", "x", "--classes", "2", "--out", "o.json"],
    ]  # fmt: skip
    from blocklora import gpus

    for argv in commands:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        assert cli.main(argv) == 1
        assert (tmp_path / "gpu0.lock").read_text().strip() == str(os.getpid())  # locked by this job
        for handle in gpus._held:  # the job ends: its lock goes with it
            handle.close()
        gpus._held.clear()
    assert seen == ["0", "0", "0"]
    monkeypatch.setenv("BLOCKLORA_NUM_GPUS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cli.main(commands[0]) == 1  # one GPU: nothing to claim, nothing to narrow
    assert seen[-1] is None


def test_concurrent_jobs_each_get_their_own_gpu(tmp_path):
    jobs = [_spawn(tmp_path, 2.0) for _ in range(3)]
    outputs = [job.communicate(timeout=60)[0].split() for job in jobs]
    assert all(job.returncode == 0 for job in jobs)
    claimed = sorted(out[0] for out in outputs)
    assert claimed == ["0", "1", "2"]
    assert all(out[0] == out[1] for out in outputs)  # CUDA_VISIBLE_DEVICES is the claimed GPU


def test_a_job_waits_for_a_gpu_to_free_and_a_killed_job_frees_its_gpu(tmp_path):
    holders = [_spawn(tmp_path, 30.0, gpus="2") for _ in range(2)]
    time.sleep(1.5)
    waiter = _spawn(tmp_path, 0.0, gpus="2")
    time.sleep(1.0)
    assert waiter.poll() is None  # both GPUs busy: it waits
    holders[0].kill()
    out = waiter.communicate(timeout=30)[0].split()
    assert waiter.returncode == 0 and out[0] in {"0", "1"}
    holders[1].kill()
    for h in holders:
        h.wait()


def test_visible_devices_are_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert visible_gpus() == ["4", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    assert claim_gpu(tmp_path) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert claim_gpu(tmp_path) == "3"


def _hold_every_gpu(lock_dir, gpus):
    lock_dir.mkdir(parents=True, exist_ok=True)
    handles = [open(lock_dir / f"gpu{g}.lock", "w") for g in range(gpus)]  # noqa: SIM115
    for h in handles:
        fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handles


def test_no_gpu_freeing_within_the_timeout_is_an_error_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKLORA_NUM_GPUS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    handles = _hold_every_gpu(tmp_path, 2)  # another job holds each GPU
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no free GPU among \['0', '1'\].*--resources gpu=2"):
            claim_gpu(tmp_path, poll_seconds=0.05, timeout=0.3)
        assert 0.3 < time.monotonic() - started < 10
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    finally:
        for h in handles:
            h.close()


def test_the_lock_folder_is_made_with_its_parents_and_options_are_keywords(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKLORA_NUM_GPUS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(TypeError):
        claim_gpu(tmp_path, 0.1)  # poll_seconds and timeout are keyword-only
    try:
        assert claim_gpu(tmp_path / "a" / "b", timeout=5) == "0"
        assert (tmp_path / "a" / "b" / "gpu0.lock").read_text().strip() == str(os.getpid())
    finally:
        for handle in gpus._held:
            handle.close()
        gpus._held.clear()


def test_the_default_lock_folder_is_per_user_or_the_named_one(monkeypatch):
    monkeypatch.delenv("BLOCKLORA_GPU_LOCKS", raising=False)
    monkeypatch.setenv("USER", "alice")  # a name anyone can set: the folder is named by uid
    assert default_lock_dir() == Path(f"/tmp/blocklora-gpu-locks-{os.getuid()}")
    monkeypatch.setenv("BLOCKLORA_GPU_LOCKS", "/scratch/locks")
    assert default_lock_dir() == Path("/scratch/locks")


NVIDIA_SMI = """#!/bin/sh
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)"
echo "  MIG 3g.40gb Device 0: (UUID: MIG-bbbb)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc)"
exit {status}
"""


@pytest.mark.parametrize(("status", "expected"), [(0, ["0", "1"]), (9, []), (None, [])])
def test_without_settings_the_gpus_are_those_nvidia_smi_lists(tmp_path, monkeypatch, status, expected):
    """Listed GPUs count (not their MIG slices); a failing or missing nvidia-smi means none."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("BLOCKLORA_NUM_GPUS", raising=False)
    if status is not None:
        script = tmp_path / "nvidia-smi"
        script.write_text(NVIDIA_SMI.format(status=status))
        script.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpus() == expected


# ------------------------------------------------------------------ other users

OTHER = 12345  # a uid (and gid) nobody uses: another user of the machine
SQUAT = r"""
import fcntl, os, sys, time
folder, victim = sys.argv[1], sys.argv[2]
os.mkdir(folder)
os.chmod(folder, 0o777)
os.symlink(victim, os.path.join(folder, "gpu0.lock"))  # the victim's job would write its pid there
held = []
for gpu in (1, 2):  # and every other GPU held for good
    f = open(os.path.join(folder, f"gpu{gpu}.lock"), "w")
    os.chmod(f.name, 0o666)
    fcntl.flock(f, fcntl.LOCK_EX)
    held.append(f)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def squatted(tmp_path):
    """A lock folder another user (uid 12345) made first, in a shared /tmp-like folder: a symlink
    to one of the victim's files where gpu0's lock goes, and locks held on gpu1 and gpu2."""
    import shutil

    from tests.conftest import folder_others_reach

    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as another user (uid 12345)")
    victim_file = tmp_path / "thesis.tex"
    victim_file.write_text("three years of work")
    with folder_others_reach(0o1777) as shared:
        squatter = subprocess.Popen(
            ["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups", "/usr/bin/python3", "-c", SQUAT,
             str(shared / "locks"), str(victim_file)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert squatter.stdout.readline().strip() == "ready"
            yield shared / "locks", victim_file
        finally:
            squatter.kill()
            squatter.wait()


def _job(lock_dir, gpus="3", timeout=30, **env):
    """What a train job does first: claim a GPU (as cli.py does, with the default wait)."""
    environ = {**os.environ, "BLOCKLORA_NUM_GPUS": gpus, "BLOCKLORA_GPU_LOCKS": str(lock_dir)}
    environ.pop("CUDA_VISIBLE_DEVICES", None)
    script = "from blocklora.gpus import claim_gpu, default_lock_dir; print(claim_gpu(default_lock_dir(), poll_seconds=0.1))"
    return subprocess.run(
        [sys.executable, "-c", script],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_lock_folder_squatted_by_another_user_is_refused_and_no_file_is_overwritten(squatted):
    folder, victim_file = squatted
    job = _job(folder)
    assert victim_file.read_text() == "three years of work", "the job wrote its pid through a planted link"
    assert job.returncode != 0
    assert f"refusing the folder {folder}: it belongs to uid {OTHER}" in job.stderr
    assert "BLOCKLORA_GPU_LOCKS" in job.stderr


def test_locks_held_by_another_user_do_not_make_a_job_wait_forever(squatted):
    folder, _ = squatted
    try:
        job = _job(folder, timeout=10, CUDA_VISIBLE_DEVICES="1,2")  # the two GPUs the squatter holds
    except subprocess.TimeoutExpired:
        pytest.fail("the job waited for locks another user holds")
    assert job.returncode != 0 and "refusing the folder" in job.stderr


def test_a_job_waits_for_a_gpu_only_as_long_as_it_is_told_and_names_who_holds_them(tmp_path):
    holders = [_spawn(tmp_path, 30.0, gpus="2") for _ in range(2)]  # two stuck jobs hold both GPUs
    try:
        for holder in holders:
            holder.stdout.readline()
        try:
            job = _job(tmp_path, gpus="2", BLOCKLORA_GPU_WAIT="0.5")
        except subprocess.TimeoutExpired:
            pytest.fail("the job waited past BLOCKLORA_GPU_WAIT")
        assert job.returncode != 0
        assert "no free GPU among ['0', '1'] after 0 s" in job.stderr
        for holder in holders:
            assert f"pid {holder.pid}" in job.stderr
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
