"""Contrastive pre-training of the demo CLIP: it learns, it is seeded, its checkpoint is whole or absent."""

from __future__ import annotations

import json

import pytest
import torch

from blocklora import pretrain as pretrain_module
from blocklora.clip import load_backbone
from blocklora.data import synthetic
from blocklora.pretrain import pretrain


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    synthetic.write_corpus(folder, n_images=64, seed=0)
    return folder


def test_pretraining_lowers_the_loss_and_writes_a_loadable_checkpoint(corpus, tmp_path):
    synthetic.write_dataset("demo_combos", tmp_path / "data", seed=0)
    checkpoint, stats_path = tmp_path / "demo-tiny.pt", tmp_path / "stats.json"
    stats = pretrain(
        "demo-tiny",
        corpus,
        checkpoint,
        steps=20,
        seed=0,
        threads=1,
        batch_size=16,
        warmup_steps=3,
        log_every=5,
        data_root=tmp_path / "data",
        stats_path=stats_path,
        progress=False,
    )
    assert stats["steps"] == 20
    assert stats["final_loss"] < stats["initial_loss"] - 0.3
    assert json.loads(stats_path.read_text())["final_loss"] == stats["final_loss"]
    assert set(stats["zero_shot"]) == {"demo_combos"}
    assert 0.0 <= stats["zero_shot"]["demo_combos"] <= 1.0

    backbone = load_backbone("demo-tiny", str(checkpoint))
    saved = torch.load(checkpoint, map_location="cpu")
    for name, tensor in backbone.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert backbone.image_size == synthetic.IMAGE_SIZE
    assert backbone.tokenizer.context_length == 32


def test_pretraining_is_deterministic_for_a_seed(corpus, tmp_path):
    kwargs = dict(steps=2, threads=1, batch_size=8, warmup_steps=1, progress=False)
    pretrain("demo-tiny", corpus, tmp_path / "a.pt", seed=5, **kwargs)
    pretrain("demo-tiny", corpus, tmp_path / "b.pt", seed=5, **kwargs)
    pretrain("demo-tiny", corpus, tmp_path / "c.pt", seed=6, **kwargs)
    a, b, c = (torch.load(tmp_path / f"{x}.pt") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_failed_save_leaves_no_checkpoint(corpus, tmp_path, monkeypatch):
    def broken_save(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pretrain_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain("demo-tiny", corpus, tmp_path / "ck.pt", steps=1, batch_size=8, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_corpus_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_corpus"):
        pretrain("demo-tiny", tmp_path, tmp_path / "ck.pt", steps=1, progress=False)
