"""CLIP-Adapter (Gao et al., IJCV 2024): a bottleneck MLP on the frozen image feature, residual ratio 0.2.

The adapter is Linear(dim → dim/4) → ReLU → Linear(dim/4 → dim) → ReLU, no biases (the released
code's module; dim = 512 for ViT-B/16), blended as f' = 0.2·adapter(f) + 0.8·f; logits are
100 · norm(f') · Wᵀ with W the normalized text features of the dataset's template (docs/protocol.md §5).
The released code applies the adapter to the unnormalized feature; an MLP without biases and with
ReLUs is positively homogeneous, so after the final normalization feeding it the normalized
feature (what the cache holds) gives identical logits.

Training settings are ours (the paper's ViT-B/16 optimizer settings were never published):
AdamW (lr 1e-3, weight decay 1e-2), cosine to 1e-6 stepped per iteration, batch 32, 200 epochs
over the few-shot training features; epoch e uses augmented view e mod 10 of every image
(10 cached views of Tip-Adapter's RandomResizedCrop(scale 0.5-1) + flip, shared with Tip-Adapter's
cache). The model after the last epoch is evaluated; the validation accuracy is only recorded.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blocklora.methods.frozen import FeatureMethod, accuracy, train_on_features
from blocklora.methods.registry import register_method


class Adapter(nn.Module):
    """dim → dim/reduction → dim, ReLU after each layer, no biases."""

    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@register_method
class CLIPAdapter(FeatureMethod):
    name = "clip_adapter"
    class_agnostic = True
    summary = "CLIP-Adapter: residual bottleneck MLP (dim/4, ratio 0.2) on frozen image features"
    defaults: ClassVar[dict[str, Any]] = {
        "template": None,
        "reduction": 4,
        "ratio": 0.2,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 1e-2,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "momentum": 0.9,
        "eta_min": 1e-6,
        "batch_size": 32,
        "epochs": 200,
        "augment_passes": 10,
        "crop_scale": [0.5, 1.0],
    }
    hparam_types: ClassVar[dict[str, str]] = {"template": "str|null"}

    def setup(self) -> None:
        self.adapter = Adapter(self.feature_dim, int(self.hp["reduction"])).to(self.device)

    def extra_modules(self) -> list[nn.Module]:
        return [self.adapter]

    def modules_to_train(self) -> nn.Module:
        return self.adapter

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        ratio = self.hp["ratio"]
        adapted = F.normalize(ratio * self.adapter(features) + (1 - ratio) * features, dim=-1)
        return self.hp["logit_scale"] * adapted @ self.classifier.T

    def fit(self, run) -> dict[str, Any]:
        self.classifier = self.text_features().float()
        views = self.features(self.task.train, run, augment=True, passes=int(self.hp["augment_passes"]))
        self.adapter.train()
        stats = train_on_features(
            list(self.adapter.parameters()),
            self.logits,
            views,
            self.labels(self.task.train),
            self.hp,
            run,
            epochs=int(self.hp["epochs"]),
            desc=f"{self.name} {self.task.dataset} {self.task.shots}-shot",
        )
        self.adapter.eval()
        if self.task.val:
            with torch.no_grad():
                val = self.logits(self.features(self.task.val, run)[0])
            stats["val_accuracy"] = accuracy(val, self.labels(self.task.val))
        return stats

    def prepare_eval(self) -> None:
        self.adapter.eval()
        self.classifier = self.text_features().float()

    def eval_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features.float())

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.adapter.named_parameters())
