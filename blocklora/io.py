"""Files that never pass half-written for complete: atomic writes of JSON and tensor files.

Light to import: torch and safetensors load only when tensors are written or read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("blocklora")


class UnsafeFolder(OSError):
    """A folder that another user owns or may enter, where only ours will do: refused, as ssh-agent and tmux do."""


class PrivateFolder:
    """A folder that belongs to this user and that nobody else may enter, held open (runtime files:
    the preload server's socket, the GPU locks).

    Made with mode 0700 if missing; refused (:class:`UnsafeFolder`, naming it and the fix) if it is a
    symlink, belongs to another user, or its mode lets others in. Files in it are reached through
    the descriptor (``/proc/self/fd/N/name``), so the folder cannot be swapped after the check.
    ``variable`` names the setting that chooses another folder, for the error message.
    """

    def __init__(self, path: str | Path, *, variable: str, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.path, 0o700)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeFolder(
                    exc.errno,
                    f"{self.path} is not a folder but a symlink or a file: remove it, or set "
                    f"${variable} to a folder of your own",
                ) from None
            raise
        info = os.fstat(self.fd)
        problem = None
        if info.st_uid != os.geteuid():
            problem = (
                f"belongs to uid {info.st_uid}, not to you (uid {os.geteuid()}): another user may have made "
                "it to intercept your commands. Remove it"
            )
        elif info.st_mode & 0o077:
            problem = (
                f"has mode {stat.S_IMODE(info.st_mode):04o}, which lets other users in. Run chmod 700 on it"
            )
        if problem:
            os.close(self.fd)
            raise UnsafeFolder(
                errno.EPERM,
                f"refusing the folder {self.path}: it {problem}, or set ${variable} to a private folder of your own",
            )
        self._proc = Path(f"/proc/self/fd/{self.fd}")
        self._via_proc = self._proc.is_dir()

    def __enter__(self) -> PrivateFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def entry(self, name: str) -> str:
        """A path to ``name`` in this very folder (through its descriptor where /proc allows)."""
        return str((self._proc if self._via_proc else self.path) / name)

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)

    def names(self, suffix: str) -> list[str]:
        return sorted(name for name in os.listdir(self.fd) if name.endswith(suffix))

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are shared like any other
        tmp_path = Path(tmp)
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:  # a full disk, a read-only folder: say which file, keep the previous one
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise OSError(
            exc.errno,
            f"could not write {path} ({exc.strerror or exc}); the previous file, if any, is untouched: "
            "free space or fix the folder, then rerun",
        ) from exc
    except BaseException:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise


def open_lock_file(path: str | Path) -> int:
    """A descriptor on the lock file ``path``, created if missing, never through a symlink and never
    truncating anything (a shared folder may hold a link planted to make us clobber a file).

    Another user's lock file in a shared folder is opened read-only: ``flock`` works on that too.
    """
    path = Path(path)
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a FIFO planted here cannot hang us
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(
                exc.errno, f"{path} is a symlink; refusing to use it as a lock file: remove it and rerun"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(
            errno.EINVAL, f"{path} is not a regular file; refusing to use it as a lock file: remove it"
        )
    return fd


def lock_holders(fd: int) -> list[int]:
    """Pids holding a lock on the file open as ``fd`` (Linux /proc/locks; empty elsewhere)."""
    info = os.fstat(fd)
    inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    return sorted({int(f[4]) for f in (line.split() for line in lines) if len(f) > 5 and f[5] == inode})


def wait_for_lock(fd: int, path: str | Path, *, shared: bool = False, timeout: float | None = None) -> None:
    """``flock`` the file open as ``fd``; says once who holds it if it must wait; TimeoutError (naming
    the holders and the lock file's owner) after ``timeout`` seconds."""
    kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    holders = lock_holders(fd)
    log.info("waiting for %s (held by pid %s)", path, ", ".join(map(str, holders)) or "unknown")
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                owner = os.fstat(fd).st_uid
                raise TimeoutError(
                    f"{path} is still locked after {timeout:.0f} s (by pid "
                    f"{', '.join(map(str, lock_holders(fd))) or 'unknown'}; the file belongs to uid {owner}): "
                    "if that process is stuck, stop it; if the file belongs to someone else, use a folder "
                    "of your own"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


@contextlib.contextmanager
def exclusive(path: str | Path, *, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` while the block runs: one process at a time builds
    ``path`` (others wait, then find it built). The lock dies with the process that holds it.

    The lock file is opened without following a symlink or truncating it; ``timeout`` (seconds)
    bounds the wait (TimeoutError naming who holds it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = open_lock_file(lock)
    try:
        wait_for_lock(fd, lock, timeout=timeout)
        yield
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write JSON atomically (temporary file, fsync, rename); ``indent=None`` for compact files."""
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write a safetensors file atomically; ``metadata`` values are stored as JSON strings."""
    from safetensors.torch import save_file

    meta = {k: json.dumps(v) for k, v in metadata.items()}
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=meta)


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by :func:`write_tensors`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); delete it and rerun") from exc
    return tensors, meta
