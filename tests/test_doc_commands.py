"""Every command README.md and BENCHMARKS.md show runs as written.

The commands are read from the documents' code blocks. Snakemake commands are dry-run (``-n``) in a
temporary directory, so that the DAG they ask for is built and checked; ``--unlock`` and ``--lint``
run as they are. ``blocklora plan`` runs; other ``blocklora`` commands and the benchmark scripts are
parsed by their own argument parsers, which is where a wrong or missing option fails. Installation
commands and the test command itself are recognised and left alone; the local Slurm's script is
checked for its commands (tests/workflow/test_slurm.py runs it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blocklora.cli import build_parser
from blocklora.cli import main as blocklora_main

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "BENCHMARKS.md")
LEFT_ALONE = {"pip", "venv", "pytest", "ruff", "activate"}  # installs, the test command, linters


def code_lines(text: str) -> list[str]:
    """Lines of indented code blocks and of shell (or unlabelled) fenced blocks, continuations joined."""
    lines: list[str] = []
    fence: str | None = None
    indented = previous_blank = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else (line.strip()[3:] or "sh")
        elif fence is not None:
            if fence in ("sh", "bash", "shell"):
                lines.append(line)
        else:
            indented = line.startswith("    ") and (indented or previous_blank)
            if indented:
                lines.append(line)
        previous_blank = not line.strip()
    joined, pending = [], ""
    for line in lines:
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        joined.append(pending)
        pending = ""
    return joined


def commands(document: str) -> list[list[str]]:
    """The shell commands of a document, each as argv (comments, env prefixes and ``&&`` chains undone)."""
    found = []
    for line in code_lines((REPO / document).read_text()):
        for part in re.split(r"\s&&\s", line):
            try:
                argv = shlex.split(part, comments=True)
            except ValueError:
                continue
            while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):
                argv = argv[1:]
            if argv and kind(argv) is not None:
                found.append(argv)
    return found


def kind(argv: list[str]) -> str | None:
    if argv[0].endswith("/"):  # a folder of a file tree
        return None
    program = Path(argv[0]).name
    if program in ("snakemake", "blocklora", "gpu_check.sh", "local_cluster.sh"):
        return program
    if program in (".", "pip") or (len(argv) > 2 and argv[1] == "-m" and argv[2] in LEFT_ALONE):
        return "left alone"
    if program == "ruff":
        return "left alone"
    if program.startswith("python") and len(argv) > 1 and argv[1].endswith(".py"):
        return "script"
    return None


ALL = [(doc, argv) for doc in DOCUMENTS for argv in commands(doc)]


def test_the_documents_show_commands_of_every_kind():
    kinds = {kind(argv) for _, argv in ALL}
    assert {"snakemake", "blocklora", "script", "gpu_check.sh", "local_cluster.sh", "left alone"} <= kinds
    assert sum(kind(argv) == "snakemake" for _, argv in ALL) >= 10


def _id(item: tuple[str, list[str]]) -> str:
    return f"{item[0]}: {shlex.join(item[1])[:90]}"


SNAKEMAKE = [i for i in ALL if kind(i[1]) == "snakemake"]


def _dry_run(argv: list[str], directory: Path) -> subprocess.CompletedProcess:
    """Run one documented snakemake command as a dry run (or as written for --unlock / --lint)."""
    args = argv[1:]
    if "--sdm" in args:  # conda is not installed everywhere; the DAG is the same without it
        at = args.index("--sdm")
        args = args[:at] + args[at + 2 :]
    if "--report" in args:  # a report of runs that do not exist here: check the DAG it reports on
        at = args.index("--report")
        args = args[:at] + args[at + 2 :]
    if not {"--unlock", "--lint", "-n"} & set(args):
        args = ["-n", *args]
    if "-n" in args and "--quiet" not in args:  # the DAG is built all the same; no job is printed
        args = [*args, "--quiet"]
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(directory),
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may use
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@pytest.fixture(scope="module")
def dry_runs(request, tmp_path_factory):
    """The selected commands' runs, started together, as many at a time as this process has CPUs.

    Each is one single-threaded snakemake process building its DAG, so they overlap well; each test
    below then waits for its own command's result.
    """
    selected = [
        item.callspec.params["item"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_snakemake_commands_build_their_dag"
    ]
    with ThreadPoolExecutor(max_workers=_cpus()) as pool:
        yield {_id(item): pool.submit(_dry_run, item[1], tmp_path_factory.mktemp("dag")) for item in selected}


@pytest.mark.parametrize("item", SNAKEMAKE, ids=_id)
def test_snakemake_commands_build_their_dag(item, dry_runs):
    result = dry_runs[_id(item)].result()
    assert result.returncode == 0, f"{shlex.join(item[1])}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"


@pytest.mark.parametrize("item", [i for i in ALL if kind(i[1]) == "blocklora"], ids=_id)
def test_blocklora_commands_parse_and_plan_runs(item, monkeypatch):
    args = item[1][1:]
    build_parser().parse_args(args)  # exits 2 on a wrong or missing option
    if args[0] == "plan":
        monkeypatch.chdir(REPO)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert blocklora_main(args) == 0
        assert "device-hours" in out.getvalue()


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("item", [i for i in ALL if kind(i[1]) == "script"], ids=_id)
def test_scripts_accept_their_arguments(item):
    script = REPO / item[1][1]
    assert script.is_file(), script
    _load(script).parse_args(item[1][2:])


@pytest.mark.parametrize("item", [i for i in ALL if kind(i[1]) == "gpu_check.sh"], ids=_id)
def test_the_gpu_script_is_executable_shell(item):
    script = REPO / item[1][0]
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert set(item[1][1:]) <= {"--fetch-wheels", "--cpu"}


@pytest.mark.parametrize("item", [i for i in ALL if kind(i[1]) == "local_cluster.sh"], ids=_id)
def test_the_local_slurm_script_is_executable_shell_and_knows_its_commands(item):
    """It starts Slurm as root, so it is not run here: tests/workflow/test_slurm.py runs it (-m slurm)."""
    script = REPO / item[1][0]
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert len(item[1]) == 2 and item[1][1] in {"start", "stop", "status"}
    usage = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert f"{item[1][1]} " in usage.stderr
