import os
import subprocess
import sys
import time

from blocklora.gpus import claim_gpu, visible_gpus

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
