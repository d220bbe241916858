"""Top-1 accuracy on the full test split, with the method ready for inference (merged weights).

Test images come from the evaluation image cache (:mod:`blocklora.data.eval_images`): decoded once
per dataset at evaluation resolution, then read by every run of that dataset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from blocklora.data.eval_images import eval_images
from blocklora.features import image_features
from blocklora.runtime import RunContext


@torch.no_grad()
def evaluate(
    method,
    entries: Sequence[Sequence],
    image_root: str | Path,
    run: RunContext,
    *,
    label_subset: Sequence[int] | None = None,
) -> dict:
    """Accuracy (0..1) of ``method.eval_logits`` over ``entries``; calls ``prepare_eval`` first.

    With ``label_subset`` (ImageNet-A/-R: the 200 classes they contain), only those classes'
    logits compete for the prediction.
    """
    started = time.perf_counter()
    hp, backbone, device = method.hp, method.backbone, run.device
    backbone.model.eval()
    method.eval_classes(None if label_subset is None else list(label_subset))
    method.prepare_eval()
    if getattr(method, "eval_on_features", False):
        correct = _correct_on_features(method, entries, image_root, run, label_subset)
        return _result(correct, len(entries), started)
    images = eval_images(
        entries, image_root, backbone.image_size, cache_dir=run.cache_dir, threads=run.threads
    )
    batches = images.batches(hp["eval_batch_size"], device, backbone.mean, backbone.std)
    precision = run.precision(hp)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for batch, labels in tqdm(batches, desc=f"test {method.task.dataset}", disable=not run.progress):
        with precision.autocast(device):
            logits = method.eval_logits(batch)
        correct += (predict(logits, label_subset) == labels).sum()
    return _result(int(correct.item()), len(entries), started)


def predict(logits: torch.Tensor, label_subset: Sequence[int] | None = None) -> torch.Tensor:
    """Arg-max labels, restricted to ``label_subset`` when given."""
    if label_subset is None:
        return logits.argmax(dim=-1)
    subset = torch.as_tensor(list(label_subset), device=logits.device)
    return subset[logits[:, subset].argmax(dim=-1)]


def _correct_on_features(
    method,
    entries: Sequence[Sequence],
    image_root: str | Path,
    run: RunContext,
    label_subset: Sequence[int] | None = None,
) -> int:
    """Correct predictions of ``method.eval_logits_from_features`` on cached frozen test features."""
    hp = method.hp
    features = image_features(
        method.backbone,
        entries,
        image_root,
        augment=False,
        run=run,
        batch_size=hp["eval_batch_size"],
        precision=run.precision(hp),
        test_split=True,
    )[0]
    labels = torch.tensor([int(e[1]) for e in entries], device=features.device)
    correct = torch.zeros((), dtype=torch.long, device=features.device)
    for start in range(0, len(entries), hp["eval_batch_size"]):
        logits = method.eval_logits_from_features(features[start : start + hp["eval_batch_size"]])
        correct += (predict(logits, label_subset) == labels[start : start + hp["eval_batch_size"]]).sum()
    return int(correct.item())


def _result(correct: int, total: int, started: float) -> dict:
    return {
        "accuracy": correct / total if total else float("nan"),
        "test_size": total,
        "eval_seconds": time.perf_counter() - started,
    }
