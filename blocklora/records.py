"""The run record: one JSON object per run, the only interface between training and reporting."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pandas as pd

REQUIRED = ("method", "dataset", "shots", "seed", "backbone", "accuracy")
# Bump when a change alters what a run computes (protocol, data pipeline, metric): the report
# refuses to mix records of different versions unless told to. docs/protocol.md describes the current one.
# 2: ImageNet's few-shot val drawn from train; q, k, v with their own dropout masks on the fused path;
#    zero-shot runs carry no shots and no seed.
# 3: CoOp trains with Dassl's loop (epochs that drop their last partial batch, cosine per epoch).
PROTOCOL_VERSION = 3
PACKAGES = ("blocklora", "torch", "torchvision", "open_clip_torch", "numpy", "snakemake")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of the working tree (``-dirty`` when it has changes), or None outside git."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """A stable sha256 of a JSON-able configuration (keys sorted)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read run record {path} ({exc}); delete it and rerun that job") from exc
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(
            f"run record {path} lacks {missing}; it was not written by this version: rerun that job"
        )
    return record


def find_records(root: str | Path) -> list[Path]:
    return sorted(Path(root).rglob("record.json"))


def load_records(paths: Iterable[str | Path] | str | Path) -> pd.DataFrame:
    """Flatten records (files, or every record.json under a folder) into one row each."""
    if isinstance(paths, str | Path) and Path(paths).is_dir():
        paths = find_records(paths)
    elif isinstance(paths, str | Path):
        paths = [paths]
    rows = []
    for path in paths:
        record = read_record(path)
        row = {k: v for k, v in record.items() if not isinstance(v, dict)}
        for group in ("hparams", "versions"):
            for key, value in (record.get(group) or {}).items():
                row[f"{group}.{key}"] = json.dumps(value) if isinstance(value, list | dict) else value
        row["path"] = str(path)
        rows.append(row)
    import pandas as pd

    return pd.DataFrame(rows)
