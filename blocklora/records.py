"""The run record: one JSON object per run, the only interface between training and reporting.

Its fields are published as a JSON Schema, ``workflow/schemas/record.schema.json``: every record is
checked against it when it is read for a report (:func:`read_record`), and :func:`write_record`
checks what it writes. :func:`write_record` (``blocklora record`` on the command line) is how code
outside the library's training loop, a baseline run by a rule of its own, writes a record.

Light to import (no torch): ``blocklora record`` answers at once from any shell.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import torch

# In the repository beside the workflow's other schemas (the package runs from its checkout:
# `pip install -e .`, or the workflow's PYTHONPATH).
SCHEMA_FILE = "workflow/schemas/record.schema.json"
RECORD_SCHEMA = Path(__file__).resolve().parents[1] / SCHEMA_FILE
# Bump when a change alters what a run computes (protocol, data pipeline, metric): the report
# refuses to mix records of different versions unless told to. docs/protocol.md describes the current one.
# 2: ImageNet's few-shot val drawn from train; q, k, v with their own dropout masks on the fused path;
#    zero-shot runs carry no shots and no seed.
# 3: CoOp trains with Dassl's loop (epochs that drop their last partial batch, cosine per epoch).
PROTOCOL_VERSION = 3
PACKAGES = ("blocklora", "torch", "torchvision", "open_clip_torch", "numpy", "snakemake")


def package_versions() -> dict[str, str | None]:
    """Python's and the installed packages' versions, and CUDA's where torch is loaded."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    torch = sys.modules.get(
        "torch"
    )  # not imported for it: a record written from a shell has no CUDA of its own
    versions["cuda"] = torch.version.cuda if torch is not None else None
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
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RecordError(ValueError):
    """A run record that does not follow the schema, named with its file and the offending field."""


@functools.cache
def _validator() -> Any:
    import jsonschema

    try:
        schema = json.loads(RECORD_SCHEMA.read_text())
    except OSError as exc:
        raise FileNotFoundError(
            f"the record schema {RECORD_SCHEMA} is missing ({exc.strerror}); blocklora reads it from its "
            "checkout: install it with `pip install -e .` from the repository"
        ) from None
    return jsonschema.Draft202012Validator(schema)


def _problem(error: Any) -> str:
    """One schema violation as ``field 'accuracy': 1.7 is greater than the maximum of 1``."""
    path = ".".join(map(str, error.absolute_path))
    if error.validator == "required":
        name = error.message.split("'")[1] if error.message.count("'") >= 2 else error.message
        return f"field '{f'{path}.' if path else ''}{name}': missing"
    if not path:
        return error.message
    return f"field '{path}': {error.message}"


def record_problems(record: Any) -> list[str]:
    """What makes ``record`` break the record schema, one line per violation (none: it is valid)."""
    errors = sorted(
        _validator().iter_errors(record), key=lambda e: (list(map(str, e.absolute_path)), e.message)
    )
    problems = [_problem(error) for error in errors]
    if isinstance(record, dict):  # JSON Schema lets NaN pass every bound
        problems += [
            f"field '{key}': {value} is not a finite number"
            for key, value in record.items()
            if isinstance(value, float) and not math.isfinite(value)
        ]
    return problems


def check_record(record: Any, source: str | Path) -> None:
    """Raise :class:`RecordError` naming ``source`` and the first offending field if ``record`` breaks
    the schema (``workflow/schemas/record.schema.json``)."""
    problems = record_problems(record)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RecordError(
            f"{source}: {problems[0]}{more}; a run record follows {SCHEMA_FILE}: fix what wrote it and "
            "rerun that job"
        )


def read_record(path: str | Path) -> dict[str, Any]:
    """A run record, checked against the schema (:class:`RecordError` names the file and the field)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read run record {path} ({exc}); delete it and rerun that job") from exc
    check_record(record, path)
    return record


def write_record(
    path: str | Path,
    *,
    method: str,
    dataset: str,
    shots: int | None,
    seed: int | None,
    backbone: str,
    pretrained: str | None,
    accuracy: float,
    test_size: int,
    num_classes: int,
    device: str,
    trainable_params: int = 0,
    total_params: int | None = None,
    iterations: int | None = None,
    train_seconds: float = 0.0,
    eval_seconds: float | None = None,
    peak_memory_mib: float | None = None,
    hparams: Mapping[str, Any] | None = None,
    stats: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str | Path] | None = None,
    code_version: str | None = None,
    rule: str | None = None,
    command: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write the record of a run made outside blocklora's training loop, atomically; returns it.

    What the caller knows (accuracy as a fraction of the ``test_size`` test images, parameters,
    seconds, device, free-form ``hparams`` and ``stats``) plus what is filled in here: the protocol
    version, the sha256 of each named input file (``inputs={"fewshot": path, ...}``; a checkpoint
    file given as ``pretrained`` is added), the command line (``command``, default: this process's),
    the package versions, this pipeline's git commit, the time, and the hashes of the configuration.
    ``code_version`` is the external code's (a git commit, a release; None where unknown) and ``rule``
    the workflow rule that ran it. The record is checked against the schema before it is written: a
    :class:`RecordError` names the field.
    """
    from blocklora.io import write_json

    weights = None if pretrained in (None, "", "none", "random") else str(pretrained)
    files = {name: Path(file) for name, file in (inputs or {}).items()}
    if weights is not None and Path(weights).is_file():
        files.setdefault("pretrained", Path(weights))
    for name, file in files.items():
        if not file.is_file():
            raise FileNotFoundError(f"input {name!r} of the record {path}: no file {file}")
    hashes = {name: file_sha256(file) for name, file in files.items()}
    if command is None:
        command = [Path(sys.executable).name, *sys.argv]
    if not isinstance(command, str):
        command = shlex.join(str(part) for part in command)
    hp = dict(hparams or {})
    resolved = {"method": method, "dataset": dataset, "shots": shots, "seed": seed, "backbone": backbone,
                "pretrained": weights, "hparams": hp, "rule": rule, "code_version": code_version}  # fmt: skip
    record = {
        "method": method,
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "backbone": backbone,
        "pretrained": weights,
        "accuracy": accuracy,
        "num_classes": num_classes,
        "test_size": test_size,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "iterations": iterations,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "peak_memory_mib": peak_memory_mib,
        "device": device,
        "train_stats": dict(stats or {}),
        "hparams": hp,
        "external": True,
        "rule": rule,
        "code_version": code_version,
        "command": command,
        "protocol_version": PROTOCOL_VERSION,
        "config_hash": config_hash(resolved),
        "inputs": hashes,
        "inputs_hash": config_hash(hashes),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "created": now(),
    }
    record = json.loads(json.dumps(record, default=str))  # as it reads back (tuples become lists)
    problems = record_problems(record)
    if problems:
        if isinstance(accuracy, int | float) and 1 < accuracy <= 100:
            problems.append(f"give accuracy as a fraction ({accuracy / 100:g} for {accuracy:g} %)")
        raise RecordError(f"not writing the record {path}: {'; '.join(problems)}")
    write_json(path, record)
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
