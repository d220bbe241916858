"""The preload server: heavy commands run in a forked child that behaves as the command line would."""

import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blocklora import preload
from tests.conftest import folder_others_reach, write_toy_dataset

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


# ------------------------------------------------------------------ other users, planted files, rude callers

OTHER = 12345  # a uid (and gid) nobody uses: another user of the machine
PYTHON = "/usr/bin/python3"  # an interpreter another user can run (the venv's may sit in /root)
VICTIM = (
    "import sys\n"
    "from blocklora import preload\n"
    "code = preload.run(sys.argv[1:], target='tests.preload_targets:run', warm='tests.preload_targets:warm')\n"
    "print('in-process' if code is None else f'served {code}', flush=True)\n"
    "sys.exit(code or 0)\n"
)


def needs_another_user() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.access(PYTHON, os.X_OK):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as another user (uid 12345)")


def as_other(script: str, *args: str, gid: int = OTHER) -> subprocess.Popen:
    """``python3 -c script args`` as uid OTHER."""
    return subprocess.Popen(
        ["setpriv", f"--reuid={OTHER}", f"--regid={gid}", "--clear-groups", PYTHON, "-c", script, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip


@pytest.fixture
def shared():
    """A folder like /tmp (world-writable, sticky) that another uid can reach, unlike tmp_path."""
    with folder_others_reach(0o1777) as folder:
        yield folder


def light(environ: dict, folder: Path, idle: float = 10) -> dict:
    return {**environ, "BLOCKLORA_PRELOAD_DIR": str(folder), "BLOCKLORA_PRELOAD_IDLE": str(idle)}


def stop(environ: dict) -> None:
    """Stop the servers of ``environ``'s folder (made private again first, if a test opened it up)."""
    folder = Path(environ["BLOCKLORA_PRELOAD_DIR"])
    if folder.is_dir() and folder.stat().st_uid == os.geteuid():
        folder.chmod(0o700)
    subprocess.run([sys.executable, "-m", "blocklora.cli", "preload", "--stop"], env=environ, check=False)


def victim(environ: dict, *argv: str, umask: int | None = None, **kwargs) -> subprocess.Popen:
    """A caller of a light server (tests/preload_targets.py), run as this test's user."""
    return subprocess.Popen(
        [sys.executable, "-c", VICTIM, *argv], env=environ, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=None if umask is None else (lambda: os.umask(umask)), **kwargs,
    )  # fmt: skip


SQUATTER = r"""
import json, os, socket, struct, sys, time
folder, loot = sys.argv[1], sys.argv[2]
os.mkdir(folder)
os.chmod(folder, 0o777)
print("ready", flush=True)
listeners = {}
deadline = time.time() + 60
while time.time() < deadline:  # a socket for every key a caller locks, before the real server binds it
    for name in os.listdir(folder):
        path = os.path.join(folder, name[:-5] + ".sock")
        if name.endswith(".lock") and not os.path.exists(path):
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(path)
            os.chmod(path, 0o777)
            listener.listen()
            listener.settimeout(0.005)
            listeners[path] = listener
    for listener in listeners.values():
        try:
            connection, _ = listener.accept()
        except OSError:
            continue
        connection.settimeout(10)
        data, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
            data += connection.recv(1 << 20)
        request = json.loads(data[4 : 4 + struct.unpack("!I", data[:4])[0]])
        with open(loot, "w") as f:
            json.dump(request["env"], f)
        connection.sendall(b"pid 999999\nexit 42\n")  # a status, and a pid the caller would signal
        sys.exit(0)
    time.sleep(0.005)
"""


def test_a_server_folder_squatted_by_another_user_is_refused_and_gets_nothing(env, shared):
    needs_another_user()
    folder = shared / "servers"
    squatter = as_other(SQUATTER, str(folder), str(shared / "loot.json"))
    try:
        assert squatter.stdout.readline().strip() == "ready", squatter.stderr.read()
        caller = subprocess.run(
            [sys.executable, "-m", "blocklora.cli", "plan", "--help"],
            env={**env, "BLOCKLORA_PRELOAD_DIR": str(folder), "API_TOKEN": "secret-1234"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        squatter.kill()
        squatter.wait()
    assert not (shared / "loot.json").exists(), "the caller sent its environment to another user"
    assert caller.returncode == 0 and "usage: blocklora plan" in caller.stdout  # it ran in-process
    assert f"refusing the folder {folder}: it belongs to uid {OTHER}" in caller.stderr
    assert "BLOCKLORA_PRELOAD_DIR" in caller.stderr  # ... and says how to choose another


PLANT_PID = r"""
import os, sys
folder, pid = sys.argv[1], sys.argv[2]
os.mkdir(folder)
os.chmod(folder, 0o777)
with open(os.path.join(folder, "x.pid"), "w") as f:
    f.write(pid + "\n")
"""


def test_preload_stop_signals_nothing_through_a_squatted_folder(env, shared):
    needs_another_user()
    folder = shared / "servers"
    bystander = subprocess.Popen(["sleep", "60"])  # one of the victim's own processes
    try:
        planter = as_other(PLANT_PID, str(folder), str(bystander.pid))
        assert planter.wait(timeout=30) == 0, planter.stderr.read()
        stop = subprocess.run(
            [sys.executable, "-m", "blocklora.cli", "preload", "--stop"],
            env={**env, "BLOCKLORA_PRELOAD_DIR": str(folder)}, capture_output=True, text=True,
        )  # fmt: skip
        time.sleep(0.2)
        assert bystander.poll() is None, "preload --stop killed a process named by another user"
        assert stop.returncode == 1 and f"refusing the folder {folder}" in stop.stderr
    finally:
        bystander.kill()
        bystander.wait()


def test_a_pid_file_left_by_a_dead_server_is_not_trusted(env, tmp_path):
    """Its pid now belongs to some other process: `preload --stop` must not signal that one."""
    folder = tmp_path / "servers"
    folder.mkdir(mode=0o700)
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        (folder / "0123456789abcdef0123.pid").write_text(f"{unrelated.pid}\n")
        stop = subprocess.run(
            [sys.executable, "-m", "blocklora.cli", "preload", "--stop"],
            env={**env, "BLOCKLORA_PRELOAD_DIR": str(folder)}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        time.sleep(0.2)
        assert unrelated.poll() is None and "stopped 0" in stop.stdout
        assert not (folder / "0123456789abcdef0123.pid").exists()  # cleared away
    finally:
        unrelated.kill()
        unrelated.wait()


INTRUDER = r"""
import glob, json, os, socket, struct, sys, time
folder, target = sys.argv[1], sys.argv[2]
deadline = time.time() + 1
while time.time() < deadline:
    found = glob.glob(os.path.join(folder, "*.sock")) if os.path.isdir(folder) else []
    if found or len(sys.argv) > 3:
        break
    time.sleep(0.05)
else:
    sys.exit("no socket to connect to")
path = sys.argv[3] if len(sys.argv) > 3 else found[0]
connection = socket.socket(socket.AF_UNIX)
try:
    connection.connect(path)
except OSError as exc:
    sys.exit(f"cannot connect: {exc}")
request = json.dumps({"argv": ["touch", target], "cwd": "/", "env": {"PATH": "/intruder/bin"}, "umask": 18}).encode()
socket.send_fds(connection, [struct.pack("!I", len(request)) + request], [0, 1, 2])
connection.settimeout(10)
print(connection.makefile().read().replace("\n", " "), flush=True)
"""


def test_a_group_shared_server_folder_lets_no_group_member_run_commands_as_its_owner(env, shared):
    needs_another_user()
    group = shared / "group"
    group.mkdir()
    os.chown(group, os.geteuid(), OTHER)  # the owner shares the folder with OTHER's group on purpose
    group.chmod(0o770)
    caller = victim(light(env, group), "exit", "0", umask=0o002)
    out, err = caller.communicate(timeout=120)
    assert caller.returncode == 0, err
    intruder = as_other(INTRUDER, str(group), str(shared / "owned"))
    intruder.communicate(timeout=60)
    assert not (shared / "owned").exists(), "a group member ran a command as the server's owner"
    assert out.strip() == "in-process" and f"refusing the folder {group}: it has mode 0770" in err


def test_the_server_serves_only_its_own_user_even_if_its_socket_is_left_open(env, shared):
    """SO_PEERCRED: a socket whose mode was opened up by mistake still lets in only the owner."""
    needs_another_user()
    folder = shared / "private"
    environ = light(env, folder, idle=30)
    try:
        caller = victim(environ, "exit", "0")
        out, err = caller.communicate(timeout=120)
        assert out.strip() == "served 0", err
        socket_path = next(folder.glob("*.sock"))
        folder.chmod(0o711)  # both mistakes at once: the folder can be crossed, the socket written
        socket_path.chmod(0o777)
        intruder = as_other(INTRUDER, str(folder), str(shared / "owned"), str(socket_path))
        answer, _ = intruder.communicate(timeout=60)
    finally:
        stop(environ)
    assert not (shared / "owned").exists(), f"the server ran a command for uid {OTHER}: {answer}"
    assert "pid" not in answer
    assert f"refused a connection from uid {OTHER}" in next(folder.glob("*.log")).read_text()


RUDE = r"""
import glob, json, os, socket, struct, sys
connection = socket.socket(socket.AF_UNIX)
connection.connect(glob.glob(os.path.join(sys.argv[1], "*.sock"))[0])
request = json.dumps({"argv": ["exit", "0"], "cwd": "/", "env": {}, "umask": 18}).encode()
socket.send_fds(connection, [struct.pack("!I", len(request)) + request], [0, 1, 2])
connection.close()  # gone before the server answers
"""


def test_a_caller_that_leaves_right_after_its_request_costs_nobody_else_their_job(env, tmp_path):
    folder = tmp_path / "servers"  # the env fixture's: stopped at the end
    first = victim(light(env, folder), "sleep", "2", str(tmp_path / "child.pid"))
    deadline = time.monotonic() + 60
    while not (tmp_path / "child.pid").is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(3):
        subprocess.run([sys.executable, "-c", RUDE, str(folder)], check=False, timeout=30)
    time.sleep(0.3)
    assert alive(child), "the server died, and took the first caller's command with it"
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0 and out.strip() == "served 0", err


def test_the_socket_is_private_and_a_server_leaves_no_socket_or_pid_file_behind(env, tmp_path):
    folder = tmp_path / "servers"
    caller = victim(light(env, folder, idle=0.5), "exit", "3", umask=0)  # a permissive umask
    out, err = caller.communicate(timeout=120)
    assert caller.returncode == 3 and out.strip() == "served 3", err
    socket_path = next(folder.glob("*.sock"))
    pid = int(next(folder.glob("*.pid")).read_text())
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600  # not 0777, whatever the caller's umask
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    assert sorted(p.suffix for p in folder.iterdir()) == [".lock", ".log"]


def test_the_default_folder_is_the_login_s_private_runtime_folder_else_one_per_uid_in_tmp(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("BLOCKLORA_PRELOAD_DIR", raising=False)
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert preload.server_dir() == runtime / "blocklora-preload"
    runtime.chmod(0o755)  # not private (an inherited setting after su, say): not used
    assert preload.server_dir() == Path(f"/tmp/blocklora-preload-{os.getuid()}")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert preload.server_dir() == Path(f"/tmp/blocklora-preload-{os.getuid()}")
