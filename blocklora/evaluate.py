"""Top-1 accuracy on the full test split, with the method ready for inference (merged weights)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from blocklora.data.loading import image_loader, test_transform
from blocklora.train import RunContext


@torch.no_grad()
def evaluate(method, entries: Sequence[Sequence], image_root: str | Path, run: RunContext) -> dict:
    """Accuracy (0..1) of ``method.eval_logits`` over ``entries``; calls ``prepare_eval`` first."""
    started = time.perf_counter()
    hp, backbone, device = method.hp, method.backbone, run.device
    backbone.model.eval()
    method.prepare_eval()
    loader = image_loader(
        entries,
        image_root,
        test_transform(backbone.image_size, backbone.mean, backbone.std),
        batch_size=hp["eval_batch_size"],
        num_workers=hp["num_workers"],
        device=device,
    )
    precision = run.precision(hp)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for images, labels in tqdm(loader, desc=f"test {method.task.dataset}", disable=not run.progress):
        images = images.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = method.eval_logits(images)
        correct += (logits.argmax(dim=-1).cpu() == labels).sum().to(device)
    total = len(entries)
    return {
        "accuracy": correct.item() / total if total else float("nan"),
        "test_size": total,
        "eval_seconds": time.perf_counter() - started,
    }
