"""Regenerate the lock: the exact versions pip resolves today for blocklora and its tests.

    python envs/lock.py

Writes envs/requirements.lock (what CI installs: pip install -r envs/requirements.lock -e ".[test]")
and the same pins into envs/blocklora.yaml (the conda environment of `snakemake --sdm conda`, whose
post-deploy script then installs blocklora itself). tests/test_packaging.py checks that the two agree
and that the pins satisfy pyproject.toml.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ENVS = Path(__file__).resolve().parent
REPO = ENVS.parent
LOCK_HEADER = """\
# Exact versions of every package blocklora and its tests install; CI runs
#   pip install -r envs/requirements.lock -e ".[test]"
# and envs/blocklora.yaml holds the same pins. Regenerate both with `python envs/lock.py`.
"""
ENV_HEADER = """\
# The conda environment of every rule under `snakemake --sdm conda`: Python and the exact versions of
# envs/requirements.lock (written by `python envs/lock.py`; a test keeps the two equal). The
# post-deploy script then installs blocklora itself, so that run records carry its version.
channels:
  - conda-forge
  - nodefaults
dependencies:
  - python=3.11
  - pip
  - pip:
"""


def resolve() -> list[str]:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
             "--report", str(report), "-e", ".[test]"],
            cwd=REPO,
            check=True,
        )  # fmt: skip
        installs = json.loads(report.read_text())["install"]
    pins = {f"{item['metadata']['name']}=={item['metadata']['version']}" for item in installs}
    return sorted((pin for pin in pins if not pin.lower().startswith("blocklora==")), key=str.lower)


def main() -> None:
    pins = resolve()
    (ENVS / "requirements.lock").write_text(LOCK_HEADER + "".join(f"{pin}\n" for pin in pins))
    (ENVS / "blocklora.yaml").write_text(ENV_HEADER + "".join(f"      - {pin}\n" for pin in pins))
    print(f"{len(pins)} pins written to envs/requirements.lock and envs/blocklora.yaml")


if __name__ == "__main__":
    main()
