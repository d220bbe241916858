"""Shared fixtures: a tiny open_clip config and a toy image dataset, built offline."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

TINY = "test-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@contextlib.contextmanager
def folder_others_reach(mode: int) -> Iterator[Path]:
    """A fresh folder under /tmp that another uid can reach, unlike tmp_path, with ``mode`` (0o1777:
    world-writable and sticky, like /tmp; 0o777: a results folder others may write to); removed after."""
    folder = Path(tempfile.mkdtemp(prefix="blocklora-test-", dir="/tmp"))
    folder.chmod(mode)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


TOY_COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(autouse=True, scope="module")
def _method_registry_restored():
    """Each test module leaves the method registry as it found it.

    Loading a benchmark script registers its own methods (train_step.py's ``reference``); without
    this, what a later module sees in the registry would depend on the order the modules ran in.
    """
    from blocklora.methods import REGISTRY, method_names

    method_names()  # the package's own methods discovered before the snapshot
    saved = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(saved)


@pytest.fixture(autouse=True, scope="session")
def _checksum_folder(tmp_path_factory) -> Path:
    """A session-wide $BLOCKLORA_CHECKSUMS too, for fixtures of a wider scope than a test."""
    import os

    folder = tmp_path_factory.mktemp("checksums")
    saved = os.environ.get("BLOCKLORA_CHECKSUMS")
    os.environ["BLOCKLORA_CHECKSUMS"] = str(folder / "session.json")
    yield folder
    if saved is None:
        os.environ.pop("BLOCKLORA_CHECKSUMS", None)
    else:
        os.environ["BLOCKLORA_CHECKSUMS"] = saved


@pytest.fixture(autouse=True)
def _checksums_recorded_on_first_use_stay_out_of_the_package(_checksum_folder, monkeypatch, request):
    """Downloads of files without a published checksum record theirs in $BLOCKLORA_CHECKSUMS: a
    throwaway file per test here, never the package's checksums.json (subprocesses inherit it)."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.nodeid)[-120:]
    monkeypatch.setenv("BLOCKLORA_CHECKSUMS", str(_checksum_folder / f"{name}.json"))


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> str:
    """Register a 2-layer, 64-wide CLIP under the name ``test-tiny``."""
    folder = tmp_path_factory.mktemp("model_configs")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    return TINY


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config, tmp_path_factory) -> Path:
    """A fixed random init of test-tiny saved as a local checkpoint file."""
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_config)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def write_toy_dataset(root: Path, per_class: int = 12, test_per_class: int = 8, seed: int = 0) -> dict:
    """Noisy solid-colour squares, one class per colour, in the CoOp split format."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, (name, rgb) in enumerate(TOY_COLORS.items()):
        for split, count in (("train", per_class), ("val", 2), ("test", test_per_class)):
            for i in range(count):
                noise = rng.normal(0, 25, size=(40, 48, 3))
                pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
                rel = f"{name}/{split}_{i}.png"
                (root / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / rel)
                splits[split].append([rel, label, name])
    return splits


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(image root, few-shot file) of a 4-class colour task: train 12, val 2, test 8 per class."""
    root = tmp_path_factory.mktemp("toy")
    splits = write_toy_dataset(root / "images")
    fewshot = root / "fewshot.json"
    fewshot.write_text(json.dumps(splits))
    return root / "images", fewshot
