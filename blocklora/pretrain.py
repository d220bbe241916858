"""Contrastive pre-training of the tiny demo CLIP on the synthetic corpus, on CPU, in a few minutes.

Plain CLIP: symmetric InfoNCE between image and caption embeddings with a learnable logit scale
(clamped at 100), AdamW, linear warm-up then cosine decay. Deterministic for a seed and thread count.
The checkpoint is a state_dict that ``blocklora.clip.load_backbone(name, path)`` loads.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from blocklora.clip import encode_text, register_configs
from blocklora.data import synthetic
from blocklora.io import atomic_path, write_json

log = logging.getLogger(__name__)

DEFAULT_STEPS = 1200


def image_tensor(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N×H×W×3 images to a normalized float N×3×H×W tensor."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 3) -> torch.Tensor:
    """Random shift (reflect-padded crop) and horizontal flip, per image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy : dy + h, dx : dx + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def clip_loss(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of a CLIP on a batch of matching (image, caption) pairs."""
    img = model.encode_image(images, normalize=True)
    txt = encode_text(model, tokens, normalize=True)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    target = torch.arange(len(images))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Cut padded token ids to the longest sequence (end token included)."""
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


@torch.no_grad()
def zero_shot_accuracy(
    model: nn.Module,
    tokenizer: Any,
    split_json: str | Path,
    template: str,
    *,
    image_dir: str = "images",
    part: str = "test",
    batch_size: int = 256,
) -> float:
    """Top-1 zero-shot accuracy of ``model`` on a prepared dataset's split, prompting with ``template``."""
    split_json = Path(split_json)
    entries = json.loads(split_json.read_text())[part]
    classnames = {label: name for _, label, name in entries}
    prompts = [template.format(classnames[i].replace("_", " ")) for i in range(len(classnames))]
    was_training = model.training
    model.eval()
    txt = encode_text(model, trim_tokens(tokenizer(prompts)), normalize=True)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    correct = 0
    for start in range(0, len(entries), batch_size):
        chunk = entries[start : start + batch_size]
        arrays = np.stack(
            [np.asarray(Image.open(split_json.parent / image_dir / p).convert("RGB")) for p, _, _ in chunk]
        )
        img = model.encode_image(image_tensor(arrays, mean, std), normalize=True)
        labels = torch.tensor([label for _, label, _ in chunk])
        correct += int(((img @ txt.T).argmax(dim=-1) == labels).sum())
    model.train(was_training)
    return correct / len(entries)


def evaluate_synthetic(model: nn.Module, tokenizer: Any, data_root: str | Path | None) -> dict[str, float]:
    """Zero-shot test accuracy on every synthetic dataset prepared under ``data_root``."""
    if data_root is None:
        return {}
    results = {}
    for name, spec in synthetic.DATASETS.items():
        split = Path(data_root) / name / "split.json"
        if split.is_file():
            results[name] = zero_shot_accuracy(
                model, tokenizer, split, spec.template, image_dir=spec.image_dir
            )
    return results


def pretrain(
    config_name: str,
    corpus_dir: str | Path,
    out_checkpoint: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    seconds: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 50,
    data_root: str | Path | None = None,
    stats_path: str | Path | None = None,
    log_every: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Pre-train ``config_name`` from scratch on the corpus; save its state_dict; return (and save) stats.

    ``steps`` fixes the schedule; ``seconds``, when given, stops early once that much time has passed
    (the run is then no longer reproducible, and the stats say ``stopped_early``). Zero-shot accuracy
    is measured on every synthetic dataset already prepared under ``data_root``.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _pretrain(
            config_name,
            corpus_dir,
            out_checkpoint,
            steps=steps,
            seconds=seconds,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            data_root=data_root,
            stats_path=stats_path,
            log_every=log_every,
            progress=progress,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(
    config_name: str,
    corpus_dir: str | Path,
    out_checkpoint: str | Path,
    *,
    steps: int,
    seconds: float | None,
    seed: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    data_root: str | Path | None,
    stats_path: str | Path | None,
    log_every: int,
    progress: bool,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    register_configs()
    model = open_clip.create_model(config_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config_name)
    model.train()

    images_u8, captions = synthetic.load_corpus(corpus_dir)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    images = image_tensor(images_u8, mean, std)
    tokens = tokenizer(captions)
    n = len(captions)
    if n < batch_size:
        batch_size = n

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * 0.5 * (1 + math.cos(math.pi * progress_))

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    losses: list[float] = []
    start = time.perf_counter()
    stopped_early = False
    bar = tqdm(range(steps), desc=f"pretrain {config_name}", disable=not progress, mininterval=2)
    for step in bar:
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = clip_loss(model, augment(images[index], generator), trim_tokens(tokens[index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0:
            recent = float(np.mean(losses[-log_every:]))
            bar.set_postfix(loss=f"{recent:.3f}")
            log.info("step %d/%d loss %.4f (%.0f s)", step + 1, steps, recent, time.perf_counter() - start)
        if seconds is not None and time.perf_counter() - start > seconds:
            stopped_early = step + 1 < steps
            break
    train_seconds = time.perf_counter() - start
    model.eval()

    with atomic_path(out_checkpoint) as tmp:
        torch.save(model.state_dict(), tmp)

    tail = losses[-min(len(losses), log_every) :]
    stats = {
        "config": config_name,
        "checkpoint": str(out_checkpoint),
        "steps": len(losses),
        "planned_steps": steps,
        "stopped_early": stopped_early,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "corpus_size": n,
        "initial_loss": losses[0],
        "final_loss": float(np.mean(tail)),
        "seconds": round(train_seconds, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "zero_shot": evaluate_synthetic(model, tokenizer, data_root),
    }
    if stats_path is not None:
        write_json(stats_path, stats)
    return stats
