"""Methods on frozen image features: their base class and their training loop.

A :class:`FeatureMethod` keeps the image encoder frozen, so it trains on features encoded once
(:func:`blocklora.features.image_features`, cached per run) in its own :meth:`~Method.fit`, and it
is tested on the cached test-view features. :func:`train_on_features` is the loop such methods
share: epochs of shuffled batches of features, the optimizer and cosine schedule of the generic loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from blocklora.features import AUGMENT_SCALE, image_features
from blocklora.methods.base import EVAL_DEFAULTS, Method
from blocklora.runtime import RunContext
from blocklora.train import cosine_lr, make_optimizer


class FeatureMethod(Method):
    """A method on frozen image features: it trains in its own :meth:`fit` and evaluates on cached
    test features (:attr:`eval_on_features`)."""

    base_defaults: ClassVar[dict[str, Any]] = EVAL_DEFAULTS
    eval_on_features: ClassVar[bool] = True

    def iterations(self) -> int:
        return 0

    @property
    def feature_dim(self) -> int:
        return int(self.model.visual.output_dim)

    def features(
        self,
        entries: Sequence[Sequence],
        run: RunContext,
        *,
        augment: bool = False,
        passes: int = 1,
        first_pass: int = 0,
        normalize: bool = True,
    ) -> torch.Tensor:
        """This run's features of ``entries`` (see :func:`image_features`), cached in ``run.cache_dir``."""
        return image_features(
            self.backbone,
            entries,
            self.task.image_root,
            augment=augment,
            passes=passes,
            first_pass=first_pass,
            seed=run.seed,
            run=run,
            crop_scale=self.hp.get("crop_scale", AUGMENT_SCALE),
            normalize=normalize,
            batch_size=self.hp["eval_batch_size"],
            precision=run.precision(self.hp),
        )

    def labels(self, entries: Sequence[Sequence]) -> torch.Tensor:
        return torch.tensor([int(e[1]) for e in entries], dtype=torch.long, device=self.device)

    def eval_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.backbone.encode_image(images, normalize=False).float(), dim=-1)
        return self.eval_logits_from_features(features)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean()) if len(labels) else float("nan")


def train_on_features(
    params: list[nn.Parameter],
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    views: torch.Tensor,
    labels: torch.Tensor,
    hp: dict[str, Any],
    run: RunContext,
    *,
    epochs: int,
    desc: str,
    on_epoch_end: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Minimize cross-entropy of ``logits_fn(features)`` over ``epochs`` epochs of shuffled batches.

    ``views`` is (P, N, D): epoch ``e`` sees view ``e mod P`` of every image. The optimizer,
    learning rate and cosine schedule (stepped per iteration) come from ``hp`` as in the generic
    loop; the last batch of an epoch is kept whole.
    """
    started = time.perf_counter()
    count = views.shape[1]
    steps_per_epoch = math.ceil(count / hp["batch_size"])
    total = epochs * steps_per_epoch
    optimizer = make_optimizer(params, hp)
    schedule = {
        "total": total,
        "base": hp["lr"],
        "eta_min": hp["eta_min"],
        "warmup": hp.get("warmup_iterations", 0),
        "warmup_lr": hp.get("warmup_lr", 0.0),
    }
    generator = torch.Generator().manual_seed(run.seed)
    losses = []
    step = 0
    for epoch in tqdm(range(epochs), desc=desc, disable=not run.progress):
        features = views[epoch % views.shape[0]]
        order = torch.randperm(count, generator=generator).to(views.device)
        epoch_loss = torch.zeros((), device=views.device)
        for start in range(0, count, hp["batch_size"]):
            index = order[start : start + hp["batch_size"]]
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, **schedule)
            loss = F.cross_entropy(logits_fn(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach() * len(index)
            step += 1
        losses.append(float(epoch_loss) / count)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(
                f"{desc}: loss became {losses[-1]} in epoch {epoch + 1}; lower lr (now {hp['lr']})"
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return {
        "iterations": total,
        "epochs": epochs,
        "train_seconds": time.perf_counter() - started,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
