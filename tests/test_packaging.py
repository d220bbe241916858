"""The package installs as declared: every import is a dependency, the lock satisfies pyproject.toml,
the conda environment carries the same pins, and the APIs the code calls exist in what is installed."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "envs" / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name.lower().replace("_", "-")] = pinned
    return pins


def imported_modules() -> set[str]:
    """Top-level modules the package imports (anywhere in its files)."""
    modules = set()
    for path in (REPO / "blocklora").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "blocklora"}


def test_every_imported_module_is_a_declared_dependency():
    declared = {Requirement(r).name.lower().replace("_", "-") for r in PYPROJECT["project"]["dependencies"]}
    distributions = packages_distributions()
    undeclared = {
        module: distributions.get(module)
        for module in imported_modules()
        if not {d.lower().replace("_", "-") for d in distributions.get(module, [])} & declared
    }
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"


def test_the_lock_pins_every_dependency_within_its_declared_bounds():
    pins = lock()
    requirements = [
        *PYPROJECT["project"]["dependencies"],
        *PYPROJECT["project"]["optional-dependencies"]["test"],
    ]
    for text in requirements:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in envs/requirements.lock: run python envs/lock.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])


def test_the_conda_environment_carries_the_locks_pins():
    env = yaml.safe_load((REPO / "envs" / "blocklora.yaml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    from_env = {p.split("==")[0].lower().replace("_", "-"): p.split("==")[1] for p in pip}
    assert from_env == lock(), (
        "envs/blocklora.yaml and envs/requirements.lock differ: run python envs/lock.py"
    )
    assert (REPO / "envs" / "blocklora.post-deploy.sh").read_text().count("pip install --no-deps -e") == 1


def test_the_installed_gdown_takes_what_the_google_drive_download_passes():
    import gdown
    from gdown import exceptions

    parameters = inspect.signature(gdown.download).parameters
    assert {"id", "output", "quiet", "resume", "retries", "timeout"} <= set(parameters)
    assert issubclass(exceptions.DownloadError, Exception) and issubclass(
        exceptions.FileURLRetrievalError, Exception
    )


def test_version_and_licence():
    result = subprocess.run(
        [sys.executable, "-m", "blocklora.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == f"blocklora {version('blocklora')}"
    assert PYPROJECT["project"]["license"] == "MIT" and (REPO / "LICENSE").read_text().startswith(
        "MIT License"
    )
