"""One GPU per job on a multi-GPU node: Snakemake limits how many GPU jobs run, never which GPU.

Each train or profile job claims a free GPU with an exclusive lock file (``flock``) in a shared
folder and exports ``CUDA_VISIBLE_DEVICES`` to that one GPU before CUDA starts. Run Snakemake
with ``--resources gpu=N`` (N = GPUs on the node): at most N jobs run, so one GPU is always free
for the next. The lock dies with the process, so a killed job frees its GPU.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger("blocklora")

_held: list = []  # open lock files of this process, kept alive until it exits


def default_lock_dir() -> Path:
    """$BLOCKLORA_GPU_LOCKS, else a per-user folder under /tmp (GPUs are per node, so is /tmp)."""
    user = os.environ.get("USER") or str(os.getuid())
    return Path(os.environ.get("BLOCKLORA_GPU_LOCKS", f"/tmp/blocklora-gpu-locks-{user}"))


def visible_gpus() -> list[str]:
    """GPU ids this process may use: $CUDA_VISIBLE_DEVICES, else $BLOCKLORA_NUM_GPUS, else nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    fake = os.environ.get("BLOCKLORA_NUM_GPUS")
    if fake is not None:
        return [str(i) for i in range(int(fake))]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", out, re.M)  # its own indices; MIG lines below a GPU are not GPUs


def claim_gpu(lock_dir: str | Path, *, poll_seconds: float = 2.0, timeout: float | None = None) -> str | None:
    """Lock one free GPU, set ``CUDA_VISIBLE_DEVICES`` to it and return its id (None: no GPU).

    With a single visible GPU nothing is locked: it is simply used.
    """
    gpus = visible_gpus()
    if len(gpus) <= 1:
        return gpus[0] if gpus else None
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    while True:
        for gpu in gpus:
            handle = open(lock_dir / f"gpu{gpu}.lock", "w")  # noqa: SIM115 (held until exit)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _held.append(handle)
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            log.info("claimed GPU %s of %s (lock %s)", gpu, ",".join(gpus), handle.name)
            return gpu
        if timeout is not None and time.monotonic() - started > timeout:
            raise TimeoutError(
                f"no free GPU among {gpus} after {timeout:.0f} s; run snakemake with --resources gpu={len(gpus)}"
            )
        time.sleep(poll_seconds)
