"""Frozen image features, encoded once and cached: what the feature-based baselines train and test on.

Methods whose image encoder stays frozen (CoOp, CLIP-Adapter, Tip-Adapter, linear probe) need each
image's features only once per view. :func:`image_features` encodes a list of entries and, when
the run has a ``cache_dir``, stores the result there (safetensors, written atomically) under a
sha256 of everything that determines it: backbone name and a fingerprint of the image tower's
weights, image size and normalization, the transform (test view, or augmented view with its crop
scale, pass index and seed), the autocast precision, the image root and the entries' paths. Test
features depend on none of shots or seed, so every run and every feature method on a dataset
shares them.

The cache holds the raw encoder outputs (float32); callers get them L2-normalized unless they ask
otherwise (Tip-Adapter averages raw augmented features before normalizing, as its reference does).

Augmented views follow Tip-Adapter: RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip on
PIL images (:func:`blocklora.data.loading.train_transform`). The random draws of one view are
seeded by (seed, pass, image path), so a view does not depend on the batch size, the number of
loader workers or the order of the entries, and the run's global random state is left untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from blocklora.clip import Backbone
from blocklora.data.eval_images import eval_images
from blocklora.data.loading import ImageList, read_image, train_transform
from blocklora.io import exclusive, read_tensors, write_tensors
from blocklora.runtime import Precision, RunContext

log = logging.getLogger("blocklora")

FEATURE_FORMAT = "blocklora-features/1"
AUGMENT_SCALE = (0.5, 1.0)


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap sha256 of the image tower: names, shapes and a strided sample of every tensor."""
    visual = getattr(model, "visual", model)
    digest = hashlib.sha256()
    for name, tensor in [*visual.named_parameters(), *visual.named_buffers()]:
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def feature_key(
    backbone: Backbone,
    entries: Sequence[Sequence],
    image_root: str | Path,
    *,
    augment: bool,
    view: int,
    seed: int,
    crop_scale: Sequence[float],
    precision: str,
    weights: str | None = None,
) -> dict[str, Any]:
    """Everything one cached feature tensor depends on (its sha256 names the file)."""
    paths = hashlib.sha256("\n".join(str(e[0]) for e in entries).encode()).hexdigest()
    key: dict[str, Any] = {
        "format": FEATURE_FORMAT,
        "backbone": backbone.name,
        "weights": weights or weights_fingerprint(backbone.model),
        "image_size": backbone.image_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "transform": "test",
        "precision": precision,
        "image_root": str(Path(image_root).resolve()),
        "entries": paths,
        "count": len(entries),
    }
    if augment:
        key.update(transform="augment", crop_scale=[float(s) for s in crop_scale], view=view, seed=seed)
    return key


def view_seed(seed: int, view: int, path: str) -> int:
    """The seed of one augmented view of one image."""
    digest = hashlib.sha256(f"{seed}:{view}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class AugmentedViews(ImageList):
    """Entries through the random train transform, each image's draws seeded by (seed, view, path)."""

    def __init__(self, entries: Sequence[Sequence], root: str | Path, transform, *, seed: int, view: int):
        super().__init__(entries, root, transform)
        self.seed, self.view = seed, view

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.entries[index]
        image = read_image(self.root / path)
        torch.default_generator.manual_seed(view_seed(self.seed, self.view, path))
        return self.transform(image), label


@torch.no_grad()
def _encode(
    backbone: Backbone,
    batches: Iterable[torch.Tensor],
    run: RunContext,
    precision: Precision,
    desc: str,
) -> torch.Tensor:
    model = backbone.model
    was_training = model.training
    model.eval()
    chunks = []
    try:
        # the workers-free loader seeds the global CPU generator per image: restore it afterwards
        with torch.random.fork_rng(devices=[]):
            for images in tqdm(batches, desc=desc, disable=not run.progress):
                images = images.to(run.device, non_blocking=True)
                with precision.autocast(run.device):
                    features = backbone.encode_image(images, normalize=False)
                chunks.append(features.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def _augmented_batches(
    backbone: Backbone,
    entries: Sequence[Sequence],
    image_root: str | Path,
    run: RunContext,
    *,
    seed: int,
    view: int,
    crop_scale: Sequence[float],
    batch_size: int,
) -> Iterator[torch.Tensor]:
    transform = train_transform(backbone.image_size, backbone.mean, backbone.std, crop_scale)
    loader = DataLoader(
        AugmentedViews(entries, image_root, transform, seed=seed, view=view),
        batch_size=batch_size,
        shuffle=False,
        num_workers=run.loader_workers,
        pin_memory=run.device.type == "cuda",
    )
    for images, _ in loader:  # iterated inside _encode's fork_rng: the loader's seed draw is undone
        yield images


def _cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"{digest}.safetensors"


def _read_cached(path: Path, key: dict[str, Any]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        tensors, meta = read_tensors(path)
    except ValueError as exc:
        log.warning("feature cache %s is unreadable (%s); encoding again", path, exc)
        return None
    features = tensors.get("features")
    if meta.get("key") != key or features is None or features.shape[0] != key["count"]:
        log.warning("feature cache %s does not match its key; encoding again", path)
        return None
    return features


def image_features(
    backbone: Backbone,
    entries: Sequence[Sequence],
    image_root: str | Path,
    *,
    augment: bool,
    passes: int = 1,
    seed: int = 0,
    run: RunContext,
    first_pass: int = 0,
    crop_scale: Sequence[float] = AUGMENT_SCALE,
    normalize: bool = True,
    batch_size: int = 128,
    precision: Precision | None = None,
    test_split: bool = False,
) -> torch.Tensor:
    """Features of ``entries``, shape (passes, N, D), on ``run.device``, float32.

    ``augment=False``: the test view (Resize + CenterCrop), one pass; ``seed`` is ignored. With
    ``test_split`` the pixels come from the shared evaluation image cache (built on first use).
    ``augment=True``: views ``first_pass .. first_pass + passes - 1`` of the random train
    transform, view ``v`` of an image identical in every call with the same ``seed``.
    Each view is read from ``run.cache_dir`` when there, else encoded (and stored there).
    """
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    if not augment and (passes != 1 or first_pass != 0):
        raise ValueError("the unaugmented test view is deterministic: ask for one pass (passes=1)")
    precision = precision or Precision(None, False)
    cache_dir = Path(run.cache_dir) if run.cache_dir else None
    weights = weights_fingerprint(backbone.model) if cache_dir else "uncached"
    views = []
    for view in range(first_pass, first_pass + passes):
        key = feature_key(
            backbone,
            entries,
            image_root,
            augment=augment,
            view=view,
            seed=seed,
            crop_scale=crop_scale,
            precision=precision.name,
            weights=weights,
        )
        path = _cache_path(cache_dir, key) if cache_dir else None
        with exclusive(path) if path else contextlib.nullcontext():
            features = _read_cached(path, key) if path else None
            if features is None:
                started = time.perf_counter()
                if augment:
                    batches = _augmented_batches(
                        backbone,
                        entries,
                        image_root,
                        run,
                        seed=seed,
                        view=view,
                        crop_scale=crop_scale,
                        batch_size=batch_size,
                    )
                else:
                    pixels = eval_images(
                        entries,
                        image_root,
                        backbone.image_size,
                        cache_dir=run.cache_dir if test_split else None,
                        threads=run.threads,
                    )
                    batches = (
                        images
                        for images, _ in pixels.batches(batch_size, run.device, backbone.mean, backbone.std)
                    )
                desc = f"features {'view ' + str(view) if augment else 'test view'} ({len(entries)} images)"
                features = _encode(backbone, batches, run, precision, desc)
                log.debug("encoded %d images in %.1f s", len(entries), time.perf_counter() - started)
                if path is not None:
                    write_tensors(path, {"features": features}, {"key": key})
        views.append(features)
    stacked = torch.stack(views).to(run.device)
    return F.normalize(stacked, dim=-1) if normalize else stacked
