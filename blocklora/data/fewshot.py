"""Few-shot subsets exactly as Dassl's ``generate_fewshot_dataset`` draws them under CoOp (docs/protocol.md §4).

``random.seed(seed)`` before anything draws; the train entries grouped by label in order of first
appearance; ``random.sample(items, shots)`` per label (all items when fewer, never a repeat); then the
same over val with ``min(shots, 4)``; test is kept whole. Seed s reproduces the subsets CoOp-protocol
papers used for the datasets with a split file. The draws come from a ``random.Random(seed)`` of our
own, which gives the same numbers as the seeded global generator and leaves the caller's random
state alone.

Validation images never come from the test split. A split without a val of its own (ImageNet, whose
only labelled held-out images are its test set), or whose val shares images with its test split (as
CoOp's ImageNet does), gets its val drawn the same way from the train images left after the train
draw: disjoint from the training images and from test, and deterministic for the seed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from blocklora.data.splits import SPLIT_KEYS, Split, read_split, validate_split
from blocklora.io import write_json

VAL_SHOTS_CAP = 4


def _by_label(entries: list[list[Any]]) -> dict[int, list[list[Any]]]:
    groups: dict[int, list[list[Any]]] = {}
    for entry in entries:
        groups.setdefault(entry[1], []).append(entry)
    return groups


def _sample(entries: list[list[Any]], shots: int, rng: random.Random) -> list[list[Any]]:
    out: list[list[Any]] = []
    for items in _by_label(entries).values():
        out.extend(rng.sample(items, shots) if len(items) >= shots else items)
    return out


def _check_shots(shots: Any) -> int:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0:
        raise ValueError(f"shots must be a positive integer, got shots={shots!r}")
    return shots


def val_is_test(split: dict) -> bool:
    """True when the split's val is empty or shares images with its test split (it cannot select models)."""
    test = {e[0] for e in split["test"]}
    return not split["val"] or any(e[0] in test for e in split["val"])


def sample_fewshot(split: dict, shots: int, seed: int) -> dict:
    """The K-shot subset of ``split`` for ``seed``: train K per class, val min(K, 4), test complete."""
    _check_shots(shots)
    validate_split(split)
    rng = random.Random(seed)  # the draws of Dassl's random.seed(seed) + random.sample, privately
    train = _sample(split["train"], shots, rng)
    if val_is_test(split):
        taken = {e[0] for e in train}
        val_pool = [e for e in split["train"] if e[0] not in taken]
    else:
        val_pool = split["val"]
    return {
        "train": train,
        "val": _sample(val_pool, min(shots, VAL_SHOTS_CAP), rng),
        "test": list(split["test"]),
    }


def write_fewshot(split_path: str | Path, shots: int, seed: int, out_path: str | Path) -> Path:
    """Read a split file, sample it (``sample_fewshot``) and write the subset atomically to ``out_path``."""
    _check_shots(shots)
    split: Split = read_split(split_path)
    subset = sample_fewshot(split, shots, seed)
    return write_json(out_path, {k: subset[k] for k in SPLIT_KEYS}, indent=None)
