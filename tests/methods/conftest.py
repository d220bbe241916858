"""Fixtures for the baseline methods: one run of a method on the toy colour task."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from blocklora.clip import load_backbone
from blocklora.data.splits import read_split
from blocklora.experiment import run_experiment
from blocklora.methods import FewShotTask, get_method, resolve_hparams
from blocklora.runtime import RunContext

FAST = {"eval_batch_size": 64}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and spares busy CI machines from thread thrash."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _subset(fewshot: Path, shots: int, out: Path) -> Path:
    splits = json.loads(fewshot.read_text())
    kept: dict[int, int] = {}
    train = []
    for entry in splits["train"]:
        if kept.get(entry[1], 0) < shots:
            kept[entry[1]] = kept.get(entry[1], 0) + 1
            train.append(entry)
    out.write_text(json.dumps({**splits, "train": train}))
    return out


@pytest.fixture
def run_method(tiny_config, tiny_checkpoint, toy_dataset, tmp_path) -> Callable[..., dict]:
    """Run ``method`` end to end on the toy task (12 shots unless a few-shot file is given)."""
    images, fewshot = toy_dataset

    def run(method: str, hparams: dict | None = None, *, shots: int = 12, seed: int = 1, **kwargs) -> dict:
        folder = kwargs.pop("folder", tmp_path)
        return run_experiment(
            method=method,
            dataset=kwargs.pop("dataset", "toy"),
            fewshot=kwargs.pop("fewshot", fewshot),
            image_root=images,
            shots=shots,
            seed=seed,
            backbone=tiny_config,
            pretrained=str(tiny_checkpoint),
            hparams={**FAST, **(hparams or {})},
            record=folder / f"{method}.json",
            state=folder / f"{method}.safetensors",
            device="cpu",
            template="a photo of a {}.",
            progress=False,
            **kwargs,
        )

    return run


@pytest.fixture
def make_method(tiny_config, tiny_checkpoint, toy_dataset) -> Callable[..., tuple]:
    """(method instance after setup, run context) on the toy task, for unit tests."""
    images, fewshot = toy_dataset

    def make(
        name: str,
        hparams: dict | None = None,
        *,
        shots: int = 12,
        seed: int = 1,
        cache_dir=None,
        dataset: str = "toy",
    ):
        import torch

        cls = get_method(name)
        splits = read_split(fewshot)
        names = sorted({(int(e[1]), e[2]) for e in splits["train"]})
        task = FewShotTask(
            dataset=dataset,
            classnames=[n for _, n in names],
            template="a photo of a {}.",
            train=splits["train"],
            val=splits["val"],
            test=splits["test"],
            image_root=images,
            shots=shots,
            seed=seed,
        )
        torch.manual_seed(seed)
        backbone = load_backbone(tiny_config, str(tiny_checkpoint))
        backbone.model.requires_grad_(False)
        hp = resolve_hparams(cls, {**FAST, **(hparams or {})}, dataset=dataset, shots=shots)
        method = cls(backbone, task, hp)
        method.setup()
        run = RunContext(device=torch.device("cpu"), seed=seed, progress=False, cache_dir=cache_dir)
        return method, run

    return make


def _assert_state_round_trip(make_method, name: str, hparams: dict, tmp_path: Path) -> None:
    import torch

    from blocklora.features import image_features

    trained, run = make_method(name, hparams)
    trained.fit(run)
    trained.save(tmp_path / f"{name}.safetensors")
    fresh, _ = make_method(name, hparams, seed=7)
    fresh.load(tmp_path / f"{name}.safetensors")
    features = image_features(
        trained.backbone, trained.task.test, trained.task.image_root, augment=False, run=run
    )[0]
    with torch.no_grad():
        trained.prepare_eval()
        fresh.prepare_eval()
        expected = trained.eval_logits_from_features(features)
        torch.testing.assert_close(fresh.eval_logits_from_features(features), expected)


@pytest.fixture
def subset() -> Callable[[Path, int, Path], Path]:
    """subset(fewshot, shots, out): a few-shot file keeping the first ``shots`` training images per class."""
    return _subset


@pytest.fixture
def assert_round_trip(make_method, tmp_path) -> Callable[[str, dict], None]:
    """assert_round_trip(name, hparams): fit, save, load into a fresh instance, same test logits."""
    return lambda name, hparams: _assert_state_round_trip(make_method, name, hparams, tmp_path)
