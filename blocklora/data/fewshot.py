"""Few-shot subsets exactly as Dassl's ``generate_fewshot_dataset`` draws them under CoOp (PROTOCOL.md §3.2).

``random.seed(seed)`` (numpy and torch too) before anything draws; the train entries grouped by label in
order of first appearance; ``random.sample(items, shots)`` per label (all items when fewer, never a
repeat); then the same over val with ``min(shots, 4)``; test is kept whole. Seed s reproduces the
subsets CoOp-protocol papers used.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from blocklora.data.splits import SPLIT_KEYS, Split, read_split, validate_split
from blocklora.io import write_json

VAL_SHOTS_CAP = 4


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and (when installed) torch, as Dassl's set_random_seed does."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; sampling does not need it
        return
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _by_label(entries: list[list[Any]]) -> dict[int, list[list[Any]]]:
    groups: dict[int, list[list[Any]]] = {}
    for entry in entries:
        groups.setdefault(entry[1], []).append(entry)
    return groups


def _sample(entries: list[list[Any]], shots: int) -> list[list[Any]]:
    out: list[list[Any]] = []
    for items in _by_label(entries).values():
        out.extend(random.sample(items, shots) if len(items) >= shots else items)
    return out


def _check_shots(shots: Any) -> int:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0:
        raise ValueError(f"shots must be a positive integer, got shots={shots!r}")
    return shots


def sample_fewshot(split: dict, shots: int, seed: int) -> dict:
    """The K-shot subset of ``split`` for ``seed``: train K per class, val min(K, 4), test complete."""
    _check_shots(shots)
    validate_split(split)
    seed_everything(seed)
    return {
        "train": _sample(split["train"], shots),
        "val": _sample(split["val"], min(shots, VAL_SHOTS_CAP)),
        "test": list(split["test"]),
    }


def write_fewshot(split_path: str | Path, shots: int, seed: int, out_path: str | Path) -> Path:
    """Read a split file, sample it (``sample_fewshot``) and write the subset atomically to ``out_path``."""
    _check_shots(shots)
    split: Split = read_split(split_path)
    subset = sample_fewshot(split, shots, seed)
    return write_json(out_path, {k: subset[k] for k in SPLIT_KEYS}, indent=None)
