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
without work. Servers live in ``$BLOCKLORA_PRELOAD_DIR`` (default ``$XDG_RUNTIME_DIR/blocklora-preload``,
else ``/tmp/blocklora-preload-<uid>``), each with a log file; ``blocklora preload`` lists and stops them.

Nobody else gets in, as with ssh-agent and tmux: the folder must belong to this user and let nobody
else in (mode 0700), or it is refused and the command runs in-process; files in it are reached through
a descriptor of the checked folder, with ``O_NOFOLLOW``. The socket has mode 0600, and each end
checks the other's uid (``SO_PEERCRED``): a server serves only its own user, and a caller talks only to
a server of its own. Each server holds a lock on its pid file for as long as it lives, so a pid file
left by a dead server is never taken for a live one. One misbehaving connection costs only itself.

``BLOCKLORA_PRELOAD=0`` turns this off and ``=1`` forces it on; by default it is on, except inside a
Slurm job (one command per allocation gains nothing). If the server cannot start, the command runs
in-process as it always did.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from blocklora.io import PrivateFolder, UnsafeFolder, wait_for_lock

# Settings read when torch and its libraries load, so a server serves only callers that agree on them.
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "TORCH", "PYTORCH", "CUDA_HOME", "LD_")
PACKAGE = Path(__file__).resolve().parent
START_TIMEOUT = 120.0  # seconds a caller waits for a new server to finish its imports
MAX_REQUEST = 16 << 20  # bytes of one request (arguments and environment)
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def enabled(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    setting = environ.get("BLOCKLORA_PRELOAD", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return hasattr(socket, "send_fds")
    return hasattr(socket, "send_fds") and "SLURM_JOB_ID" not in environ


def server_dir() -> Path:
    """$BLOCKLORA_PRELOAD_DIR, else $XDG_RUNTIME_DIR/blocklora-preload (a private folder of this login),
    else /tmp/blocklora-preload-<uid>."""
    named = os.environ.get("BLOCKLORA_PRELOAD_DIR")
    if named:
        return Path(named)
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        with contextlib.suppress(OSError):
            info = os.stat(runtime)
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077:
                return Path(runtime) / "blocklora-preload"
    return Path(f"/tmp/blocklora-preload-{os.getuid()}")


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
            stat_ = path.stat()
            digest.update(f"{path.relative_to(PACKAGE)}:{stat_.st_size}:{stat_.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def resolve(name: str):
    """The function ``module:function`` names."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def peer_credentials(connection: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    return _CREDENTIALS.unpack(
        connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    )


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
        if pid <= 1:  # os.kill(0 or -1) would signal a whole group, or every process of this user
            print(f"blocklora: the preload server answered a bad pid {pid}; failing", file=sys.stderr)
            return 1

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


def _connect(path: str) -> socket.socket | None:
    """A connection to the server at ``path``, if one answers there and runs as this user."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError:
        connection.close()
        return None
    pid, uid, _ = peer_credentials(connection)
    if uid != os.geteuid():
        connection.close()
        raise UnsafeFolder(
            errno.EPERM, f"the preload server at {path} (pid {pid}) runs as uid {uid}, not as you: refused"
        )
    return connection


def _connect_or_start(key: str, target: str, warm: str) -> socket.socket | None:
    with PrivateFolder(server_dir(), variable="BLOCKLORA_PRELOAD_DIR") as folder:
        path = folder.entry(f"{key}.sock")
        connection = _connect(path)
        if connection is not None:
            return connection
        lock = folder.open(f"{key}.lock", os.O_RDWR | os.O_CREAT)  # one caller starts the server
        try:
            try:
                wait_for_lock(lock, folder.path / f"{key}.lock", timeout=START_TIMEOUT)
            except TimeoutError as exc:
                print(f"blocklora: {exc}; running in-process", file=sys.stderr)
                return None
            connection = _connect(path)
            if connection is not None:
                return connection
            folder.unlink(f"{key}.sock")  # left by a server that died
            return _start(folder, key, target, warm)
        finally:
            os.close(lock)


def _start(folder: PrivateFolder, key: str, target: str, warm: str) -> socket.socket | None:
    log = folder.path / f"{key}.log"
    log_fd = folder.open(f"{key}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        server = (
            os.posix_spawn(  # the caller's cwd and environment, so the same sys.path; a session of its own
                sys.executable,
                [
                    sys.executable,
                    "-m",
                    "blocklora.preload",
                    "serve",
                    str(folder.path),
                    key,
                    str(PACKAGE),
                    target,
                    warm,
                ],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                ],
                setsid=True,
            )
        )
    finally:
        os.close(log_fd)
    path = folder.entry(f"{key}.sock")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        connection = _connect(path)
        if connection is not None:
            return connection
        if os.waitpid(server, os.WNOHANG)[0] == server:
            print(f"blocklora: the preload server stopped (see {log}); running in-process", file=sys.stderr)
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
        if length > MAX_REQUEST:
            raise ValueError(f"a request of {length} bytes, more than {MAX_REQUEST}")
        if len(self.data) < 4 + length:
            return None
        if len(self.fds) != 3:
            raise ValueError(f"expected the caller's 3 standard streams, got {len(self.fds)} descriptors")
        request = json.loads(self.data[4 : 4 + length])
        if not isinstance(request, dict) or not {"argv", "cwd", "env", "umask"} <= set(request):
            raise ValueError("a request without argv, cwd, env and umask")
        return request

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class _Server:
    """The files a server owns in its folder: its socket (mode 0600) and its pid file, locked while
    it lives; both removed when it stops, if they are still its own."""

    def __init__(self, folder: PrivateFolder, key: str) -> None:
        self.folder, self.key = folder, key
        self.pid_fd = self._lock_pid_file()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mask = os.umask(0o177)  # the socket is born 0600: only this user may connect
        try:
            self.listener.bind(folder.entry(f"{key}.sock"))
        finally:
            os.umask(mask)
        socket_stat = os.stat(f"{key}.sock", dir_fd=folder.fd, follow_symlinks=False)
        self.identity = (socket_stat.st_dev, socket_stat.st_ino)
        self.listener.listen(64)
        os.ftruncate(self.pid_fd, 0)
        os.pwrite(self.pid_fd, f"{os.getpid()}\n".encode(), 0)

    def _lock_pid_file(self) -> int:
        """The pid file, locked (a listing may remove a stale one meanwhile: then lock the new one)."""
        name = f"{self.key}.pid"
        for _ in range(10):
            fd = self.folder.open(name, os.O_RDWR | os.O_CREAT)
            try:
                wait_for_lock(fd, self.folder.path / name, timeout=5)
            except TimeoutError:
                os.close(fd)
                sys.exit(f"a server for {self.key} is already running (its pid file is locked)")
            with contextlib.suppress(FileNotFoundError):
                if os.stat(name, dir_fd=self.folder.fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    return fd
            os.close(fd)
        sys.exit(f"could not lock {self.folder.path / name}")

    def files(self) -> list:
        """What a forked child must close: the listener, the pid file, the folder."""
        return [self.listener, self.pid_fd, self.folder.fd]

    def stop_listening(self) -> None:
        """Remove the socket if it is still this server's (a newer server may have replaced it)."""
        if self.listener.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            there = os.stat(f"{self.key}.sock", dir_fd=self.folder.fd, follow_symlinks=False)
            if (there.st_dev, there.st_ino) == self.identity:
                self.folder.unlink(f"{self.key}.sock")
        self.listener.close()

    def close(self) -> None:
        self.stop_listening()
        self.folder.unlink(f"{self.key}.pid")  # while still locked: nobody takes it for a live server
        os.close(self.pid_fd)


def serve(folder_path: Path, key: str, package: Path, target: str, warm: str) -> None:
    """Run ``warm()``, then fork a child per request running ``target(argv)`` until idle; SIGTERM stops
    taking requests."""
    folder = PrivateFolder(folder_path, create=False, variable="BLOCKLORA_PRELOAD_DIR")
    resolve(warm)()
    run_command = resolve(target)
    import blocklora

    if Path(blocklora.__file__).resolve().parent != package:
        sys.exit(f"this interpreter imports blocklora from {blocklora.__file__}, not from {package}")
    server = _Server(folder, key)
    wake_read, wake_write = os.pipe()  # SIGCHLD and SIGTERM wake the loop through it
    for fd in (wake_read, wake_write):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_write)
    stopping: list[int] = []
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    selector = selectors.DefaultSelector()
    selector.register(server.listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # pid -> its caller's connection
    own_files = [*server.files(), wake_read, wake_write]
    idle_since = time.monotonic()
    try:
        while children or (not stopping and time.monotonic() - idle_since < idle_seconds()):
            if stopping and server.listener.fileno() >= 0:  # no new work; running commands finish
                selector.unregister(server.listener)
                server.stop_listening()
            timeout = (
                5.0 if children else max(0.01, min(5.0, idle_seconds() - (time.monotonic() - idle_since)))
            )
            for event, _ in selector.select(timeout=timeout):
                try:
                    _on_event(event, selector, server, children, own_files, run_command, wake_read)
                except Exception as exc:  # one connection's trouble is no reason to stop serving the others
                    print(f"dropped a connection: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                    if event.fileobj is not server.listener and event.fileobj != wake_read:
                        _drop(event, selector, children)
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
        server.close()


def _on_event(event, selector, server: _Server, children, own_files, run_command, wake_read) -> None:
    if event.fileobj is server.listener:
        try:
            connection, _ = server.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        pid, uid, _ = peer_credentials(connection)
        if uid != os.geteuid():
            print(f"refused a connection from uid {uid} (pid {pid})", file=sys.stderr, flush=True)
            connection.close()
            return
        connection.setblocking(False)
        selector.register(connection, selectors.EVENT_READ, _Request())
    elif event.fileobj == wake_read:
        with contextlib.suppress(BlockingIOError):
            os.read(wake_read, 4096)
    elif isinstance(event.data, _Request):
        _on_request(event, selector, children, own_files, run_command)
    else:  # a caller sends nothing after its request: readable means it went away
        with contextlib.suppress(ProcessLookupError):
            os.kill(event.data, signal.SIGKILL)
        selector.unregister(event.fileobj)


def _drop(event, selector, children) -> None:
    """Forget a connection that failed (its child, if any, is reaped as usual)."""
    with contextlib.suppress(KeyError, ValueError, OSError):
        selector.unregister(event.fileobj)
    if isinstance(event.data, _Request):
        event.data.close()
    if isinstance(event.fileobj, socket.socket) and event.fileobj not in children.values():
        event.fileobj.close()


def _on_request(event, selector, children: dict[int, socket.socket], own_files, run_command) -> None:
    connection, request = event.fileobj, event.data
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
        _become_command(complete, request.fds, connection, selector, children, own_files, run_command)
    request.close()
    children[pid] = connection
    try:
        connection.setblocking(True)
        connection.sendall(f"pid {pid}\n".encode())
    except OSError:  # the caller is already gone: so goes its command (reaped with the others)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return
    selector.register(connection, selectors.EVENT_READ, pid)


def _become_command(
    request: dict, fds: list[int], connection, selector, children, own_files, run_command
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
        for item in own_files:  # the listener, the pid file (and its lock), the folder, the wake-up pipe
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
    """A fresh process's random state: nothing a child draws is shared with its siblings. (A generator
    the server never imported seeds itself from the OS when the child imports it.)"""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


# ------------------------------------------------------------------ `blocklora preload`


def servers() -> list[dict]:
    """The running servers: key, pid, socket and log file. A pid file whose lock nobody holds is left
    by a dead server: it is removed, never trusted (its pid may belong to another process by now)."""
    folder_path = server_dir()
    if not folder_path.is_dir():
        return []
    found = []
    with PrivateFolder(folder_path, create=False, variable="BLOCKLORA_PRELOAD_DIR") as folder:
        for name in folder.names(".pid"):
            key = name.removesuffix(".pid")
            pid = _live_server(folder, name)
            if pid is None:
                continue
            found.append(
                {
                    "key": key,
                    "pid": pid,
                    "socket": str(folder.path / f"{key}.sock"),
                    "log": str(folder.path / f"{key}.log"),
                }
            )
    return found


def _live_server(folder: PrivateFolder, name: str) -> int | None:
    """The pid in pid file ``name`` if a live server holds its lock, else None (a stale file is removed)."""
    try:
        fd = folder.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: its server lives
            try:
                return int(os.pread(fd, 32, 0).decode().strip())
            except ValueError:
                return None
        folder.unlink(name)  # nobody holds it: its server is gone
        return None
    finally:
        os.close(fd)


def stop_servers() -> int:
    """Stop every running server (children already running finish); returns how many.

    Each is signalled through a pidfd taken while its pid file is still locked, so the signal can
    only reach that server, never a process that inherited its pid."""
    stopped = 0
    for server in servers():
        try:
            pidfd = os.pidfd_open(server["pid"])
        except ProcessLookupError:
            continue
        try:
            with PrivateFolder(server_dir(), create=False, variable="BLOCKLORA_PRELOAD_DIR") as folder:
                if _live_server(folder, f"{server['key']}.pid") != server["pid"]:
                    continue
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            stopped += 1
        except ProcessLookupError:
            continue
        finally:
            os.close(pidfd)
    return stopped


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        sys.exit(
            "usage: python -m blocklora.preload serve FOLDER KEY PACKAGE_DIR MODULE:COMMAND MODULE:WARM_UP"
        )
