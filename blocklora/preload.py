"""Jobs that start in milliseconds: a process that has imported torch once forks one child per command.

Before a training job does anything it spends about 4 s importing torch, torchvision (which pulls in
torch._dynamo) and open_clip, and a suite runs hundreds of jobs. So the command line
(:func:`blocklora.cli.entry`) asks a *preload server* that has made those imports once to fork a child
for its heavy commands (``train``, ``transfer``, ``profile``, ``report``, ``pretrain-demo``, ``plan``).
The server knows nothing of the command line: its caller names the function that makes the imports
and the function the child runs (``module:function``), and a server serves one such pair. The child takes the command's arguments, working
directory, environment, umask and standard input, output and error (passed over a Unix socket), runs
the command exactly as the command line would, and its exit status becomes the command's. The caller
forwards SIGINT, SIGTERM and SIGHUP to the child; a child whose caller disappears (``kill -9``) is
killed at once. Children are fresh processes as far as the run is concerned: they re-seed every
random generator from the OS, and the server never touches CUDA or starts a thread pool.

A server belongs to one interpreter, import path, set of settings that matter at import time and
version of the package's files (sizes and modification times), so editing the code or installing a
package starts a new one; a server exits after ``BLOCKLORA_PRELOAD_IDLE`` seconds (default 300)
without work. Servers live in ``$BLOCKLORA_PRELOAD_DIR`` (default ``/tmp/blocklora-preload-<uid>``),
each with a log file; ``blocklora preload`` lists and stops them.

``BLOCKLORA_PRELOAD=0`` turns this off and ``=1`` forces it on; by default it is on, except inside a
Slurm job (one command per allocation gains nothing). If the server cannot start, the command runs
in-process as it always did.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Settings read when torch and its libraries load, so a server serves only callers that agree on them.
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "TORCH", "PYTORCH", "CUDA_HOME", "LD_")
PACKAGE = Path(__file__).resolve().parent
START_TIMEOUT = 120.0  # seconds a caller waits for a new server to finish its imports


def enabled(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    setting = environ.get("BLOCKLORA_PRELOAD", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return hasattr(socket, "send_fds")
    return hasattr(socket, "send_fds") and "SLURM_JOB_ID" not in environ


def server_dir() -> Path:
    return Path(os.environ.get("BLOCKLORA_PRELOAD_DIR", f"/tmp/blocklora-preload-{os.getuid()}"))


def idle_seconds() -> float:
    return float(os.environ.get("BLOCKLORA_PRELOAD_IDLE", "300"))


def server_key(target: str, warm: str) -> str:
    """What a server depends on: what it runs, interpreter, import path, import-time settings, the package."""
    digest = hashlib.sha256()
    digest.update(f"{target}\n{warm}\n{sys.executable}\n{sys.version}\n{json.dumps(sys.path)}\n".encode())
    for name in sorted(os.environ):
        if name.startswith(IMPORT_TIME_ENV):
            digest.update(f"{name}={os.environ[name]}\n".encode())
    digest.update(f"{PACKAGE}\n".encode())
    for entry in sys.path:  # an install or removal changes its folder's mtime
        with contextlib.suppress(OSError):
            digest.update(f"{entry}:{os.stat(entry or '.').st_mtime_ns}\n".encode())
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".json", ".txt") and "__pycache__" not in path.parts:
            stat = path.stat()
            digest.update(f"{path.relative_to(PACKAGE)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def resolve(name: str):
    """The function ``module:function`` names."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


# ------------------------------------------------------------------ the caller's side


def run(argv: Sequence[str], *, target: str, warm: str) -> int | None:
    """``target(argv)`` in a child of a server that ran ``warm()``; its exit status, or None when the
    command should run in-process instead (preloading off, or no server could start).

    ``target`` and ``warm`` are ``module:function`` names: the server imports them, not this module.
    """
    if not enabled():
        return None
    try:
        connection = _connect_or_start(server_key(target, warm), target, warm)
    except OSError as exc:
        print(f"blocklora: preload server unavailable ({exc}); running in-process", file=sys.stderr)
        return None
    if connection is None:
        return None
    with connection:
        request = json.dumps(
            {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask()}
        ).encode()
        socket.send_fds(connection, [struct.pack("!I", len(request)) + request], [0, 1, 2])
        reader = connection.makefile("r")
        started = reader.readline()
        if not started.startswith("pid "):  # the server went away before forking: run here instead
            return None
        pid = int(started.split()[1])

        def forward(signum, frame):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, forward)
        line = reader.readline()
    if not line.startswith("exit "):  # the server died under the child: say so, fail the job
        print("blocklora: the preload server went away while the command ran", file=sys.stderr)
        return 1
    return int(line.split()[1])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _connect(path: Path) -> socket.socket | None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError:
        connection.close()
        return None
    return connection


def _connect_or_start(key: str, target: str, warm: str) -> socket.socket | None:
    folder = server_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{key}.sock"
    connection = _connect(path)
    if connection is not None:
        return connection
    with open(folder / f"{key}.lock", "w") as lock:  # one caller starts the server, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        connection = _connect(path)
        if connection is not None:
            return connection
        path.unlink(missing_ok=True)  # left by a server that died
        log = folder / f"{key}.log"
        server = (
            os.posix_spawn(  # the caller's cwd and environment, so the same sys.path; a session of its own
                sys.executable,
                [sys.executable, "-m", "blocklora.preload", "serve", str(path), str(PACKAGE), target, warm],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
                setsid=True,
            )
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            connection = _connect(path)
            if connection is not None:
                return connection
            if os.waitpid(server, os.WNOHANG)[0] == server:
                print(
                    f"blocklora: the preload server stopped (see {log}); running in-process", file=sys.stderr
                )
                return None
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)
        return None


# ------------------------------------------------------------------ the server's side


class _Request:
    """A request arriving on a connection: length-prefixed JSON, the caller's three streams alongside."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.fds: list[int] = []

    def feed(self, connection: socket.socket) -> dict | None:
        """Read what is there; the request once complete. EOFError: the caller went away."""
        data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
        self.fds += fds
        if not data:
            raise EOFError
        self.data += data
        if len(self.data) < 4:
            return None
        (length,) = struct.unpack("!I", self.data[:4])
        if len(self.data) < 4 + length:
            return None
        if len(self.fds) != 3:
            raise ValueError(f"expected the caller's 3 standard streams, got {len(self.fds)} descriptors")
        return json.loads(self.data[4 : 4 + length])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def serve(path: Path, package: Path, target: str, warm: str) -> None:
    """Run ``warm()``, then fork a child per request running ``target(argv)`` until idle; SIGTERM stops
    taking requests."""
    resolve(warm)()
    run_command = resolve(target)
    import blocklora

    if Path(blocklora.__file__).resolve().parent != package:
        sys.exit(f"this interpreter imports blocklora from {blocklora.__file__}, not from {package}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    path.with_suffix(".pid").write_text(f"{os.getpid()}\n")
    wake_read, wake_write = os.pipe()  # SIGCHLD and SIGTERM wake the loop through it
    for fd in (wake_read, wake_write):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_write)
    stopping: list[int] = []
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # pid -> its caller's connection
    idle_since = time.monotonic()
    try:
        while children or (not stopping and time.monotonic() - idle_since < idle_seconds()):
            if stopping and listener.fileno() >= 0:  # no new work; running commands finish
                selector.unregister(listener)
                _remove_own(path, listener)
                listener.close()
            for key, _ in selector.select(timeout=5.0):
                if key.fileobj is listener:
                    connection, _ = listener.accept()
                    connection.setblocking(False)
                    selector.register(connection, selectors.EVENT_READ, _Request())
                elif key.fileobj == wake_read:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_read, 4096)
                elif isinstance(key.data, _Request):
                    _on_request(key, selector, children, (listener, wake_read, wake_write), run_command)
                else:  # a caller sends nothing after its request: readable means it went away
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(key.data, signal.SIGKILL)
                    selector.unregister(key.fileobj)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                connection = children.pop(pid, None)
                if connection is None:
                    continue
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(connection)
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):
                    connection.setblocking(True)
                    connection.sendall(f"exit {code if code >= 0 else 128 - code}\n".encode())
                connection.close()
                idle_since = time.monotonic()
    finally:
        if listener.fileno() >= 0:
            _remove_own(path, listener)
            listener.close()


def _remove_own(path: Path, listener: socket.socket) -> None:
    """Remove the socket and pid files if they are still this server's (a newer one may own them)."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(listener.fileno()).st_ino:
            path.unlink()
            path.with_suffix(".pid").unlink(missing_ok=True)


def _on_request(key, selector, children: dict[int, socket.socket], server_files, run_command) -> None:
    connection, request = key.fileobj, key.data
    try:
        complete = request.feed(connection)
    except BlockingIOError:
        return
    except (OSError, EOFError, ValueError) as exc:
        if not isinstance(exc, EOFError):
            print(f"refused a request: {exc}", file=sys.stderr, flush=True)
        selector.unregister(connection)
        request.close()
        connection.close()
        return
    if complete is None:
        return
    selector.unregister(connection)
    pid = os.fork()
    if pid == 0:
        _become_command(complete, request.fds, connection, selector, children, server_files, run_command)
    request.close()
    connection.setblocking(True)
    connection.sendall(f"pid {pid}\n".encode())
    children[pid] = connection
    selector.register(connection, selectors.EVENT_READ, pid)


def _become_command(
    request: dict, fds: list[int], connection, selector, children, server_files, run_command
) -> None:
    """In the forked child: take the caller's streams, directory and environment, run, exit."""
    code = 1
    try:
        _die_with_parent()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for key in list(selector.get_map().values()):  # other callers' half-received requests
            if isinstance(key.data, _Request):
                key.data.close()
                key.fileobj.close()
        selector.close()
        for item in server_files:
            item.close() if isinstance(item, socket.socket) else os.close(item)
        for other in children.values():
            other.close()
        connection.close()
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.umask(request["umask"])
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _reseed()
        sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as a fresh interpreter would decide
        sys.argv = ["blocklora", *request["argv"]]
        code = run_command(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:
    """Linux: the kernel kills this child if the server dies, so no command outlives its caller."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _reseed() -> None:
    """A fresh process's random state: nothing a child draws is shared with its siblings."""
    import random

    import numpy as np
    import torch

    random.seed()
    np.random.seed()
    torch.seed()


# ------------------------------------------------------------------ `blocklora preload`


def servers() -> list[dict]:
    """The running servers: key, pid, socket and log file."""
    found = []
    for pid_file in sorted(server_dir().glob("*.pid")) if server_dir().is_dir() else []:
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        socket_path = pid_file.with_suffix(".sock")
        found.append(
            {
                "key": pid_file.stem,
                "pid": pid,
                "socket": str(socket_path),
                "log": str(pid_file.with_suffix(".log")),
            }
        )
    return found


def stop_servers() -> int:
    """Stop every running server (children already running finish); returns how many."""
    stopped = 0
    for server in servers():
        with contextlib.suppress(ProcessLookupError):
            os.kill(server["pid"], signal.SIGTERM)
            stopped += 1
    return stopped


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        sys.exit("usage: python -m blocklora.preload serve SOCKET PACKAGE_DIR MODULE:COMMAND MODULE:WARM_UP")
