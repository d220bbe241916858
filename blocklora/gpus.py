"""One GPU per job on a multi-GPU node: Snakemake limits how many GPU jobs run, never which GPU.

Each train or profile job claims a free GPU with an exclusive lock file (``flock``) in a folder of
its user's and exports ``CUDA_VISIBLE_DEVICES`` to that one GPU before CUDA starts. Run Snakemake
with ``--resources gpu=N`` (N = GPUs on the node): at most N jobs run, so one GPU is always free
for the next. The lock dies with the process, so a killed job frees its GPU.

The folder (``$BLOCKLORA_GPU_LOCKS``, else ``/tmp/blocklora-gpu-locks-<uid>``) must belong to the
user and let nobody else in, or it is refused: another user could otherwise create it first, plant
links that make a job overwrite a file, or hold every lock. Lock files are opened with
``O_NOFOLLOW``, never truncated before they are locked, and a claim gives up after
``$BLOCKLORA_GPU_WAIT`` seconds (default an hour), naming who holds the GPUs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

from blocklora.io import PrivateFolder, lock_holders

log = logging.getLogger("blocklora")

_held: list = []  # open lock files of this process, kept alive until it exits
DEFAULT_WAIT = 3600.0  # seconds a job waits for a GPU before it fails, naming who holds them
_FROM_ENV = object()


def default_lock_dir() -> Path:
    """$BLOCKLORA_GPU_LOCKS, else a per-user folder under /tmp (GPUs are per node, so is /tmp)."""
    return Path(os.environ.get("BLOCKLORA_GPU_LOCKS") or f"/tmp/blocklora-gpu-locks-{os.getuid()}")


def default_wait() -> float | None:
    """$BLOCKLORA_GPU_WAIT seconds ("inf": no limit), else DEFAULT_WAIT."""
    setting = os.environ.get("BLOCKLORA_GPU_WAIT", "").strip()
    if not setting:
        return DEFAULT_WAIT
    try:
        seconds = float(setting)
    except ValueError:
        raise ValueError(f"BLOCKLORA_GPU_WAIT={setting!r} is not a number of seconds (or inf)") from None
    return None if seconds == float("inf") else seconds


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


def claim_gpu(
    lock_dir: str | Path, *, poll_seconds: float = 2.0, timeout: float | object | None = _FROM_ENV
) -> str | None:
    """Lock one free GPU, set ``CUDA_VISIBLE_DEVICES`` to it and return its id (None: no GPU).

    With a single visible GPU nothing is locked: it is simply used. ``lock_dir`` must be a private
    folder of this user (:class:`blocklora.io.PrivateFolder`, made if missing). ``timeout``: seconds
    to wait for a free GPU (None: forever; default :func:`default_wait`).
    """
    gpus = visible_gpus()
    if len(gpus) <= 1:
        return gpus[0] if gpus else None
    if timeout is _FROM_ENV:
        timeout = default_wait()
    with PrivateFolder(lock_dir, variable="BLOCKLORA_GPU_LOCKS") as folder:
        started = time.monotonic()
        while True:
            for gpu in gpus:
                handle = _try_lock(folder, f"gpu{gpu}.lock")
                if handle is None:
                    continue
                _held.append(handle)
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
                log.info(
                    "claimed GPU %s of %s (lock %s)", gpu, ",".join(gpus), folder.path / f"gpu{gpu}.lock"
                )
                return gpu
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"no free GPU among {gpus} after {timeout:.0f} s ({_holders(folder, gpus)}); run "
                    f"snakemake with --resources gpu={len(gpus)}, stop what holds them, or set "
                    "BLOCKLORA_GPU_WAIT to wait longer"
                )
            time.sleep(poll_seconds)


def _try_lock(folder: PrivateFolder, name: str):
    """The lock file ``name``, locked and holding this pid; None if another process holds it."""
    fd = folder.open(name, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{folder.path / name} is not a regular file: remove it")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)  # only now that it is ours
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return os.fdopen(fd, "r+")  # held until the process exits


def _holders(folder: PrivateFolder, gpus: list[str]) -> str:
    """Who holds each GPU's lock, for the error message."""
    parts = []
    for gpu in gpus:
        try:
            fd = folder.open(f"gpu{gpu}.lock", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            pids = ", ".join(map(str, lock_holders(fd))) or "unknown"
        finally:
            os.close(fd)
        parts.append(f"GPU {gpu}: pid {pids}")
    return "; ".join(parts)
