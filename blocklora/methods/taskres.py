"""TaskRes (Yu et al., CVPR 2023): a learned residual on zero-shot CLIP's class features.

As the official code (geekyutao/TaskRes ``trainers/taskres.py``, ``train_regular.sh``,
``configs/trainers/TaskRes/adam_lr2e-3_B256_ep{100,200}.yaml``; docs/protocol.md §6): the
classifier is t'_c = t_c + α · x_c with t_c the mean of frozen, unnormalized text features over
TaskRes's templates (its own template per dataset; on ImageNet seven selected templates plus
"a photo of a {}.") and x the (classes × dim) residual, starting at zero; logits 100 · f̂ · t̂'ᵀ.
α = 0.5 (1.0 on Flowers102). Adam (weight decay 5e-4 as an L2 term, Dassl's), lr 2e-3 (ImageNet
2e-4), batch 256, 100 epochs at 1, 2 and 4 shots and 200 at 8 and 16, one warm-up epoch at 1e-5,
cosine per epoch; the last epoch is evaluated. The released configs name RN50; this is their
recipe on ViT-B/16. The residual is tied to the training classes, so TaskRes does not transfer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blocklora.methods.base import DASSL_DEFAULTS, DasslTrained
from blocklora.methods.frozen import FeatureMethod
from blocklora.methods.prompting import template_for
from blocklora.methods.registry import register_method

IMAGENET_TEMPLATES_SELECT = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]
# TaskRes's CUSTOM_TEMPLATES (trainers/taskres.py), by this project's dataset names; ImageNet adds
# IMAGENET_TEMPLATES_SELECT before its own.
TASKRES_TEMPLATES: dict[str, Any] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": [*IMAGENET_TEMPLATES_SELECT, "a photo of a {}."],
}


class TaskResidual(nn.Module):
    """t + α · x: the frozen base class features plus a scaled learned residual (zeros at start)."""

    def __init__(self, base: torch.Tensor, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.register_buffer("base", base.detach().clone(), persistent=False)
        self.residual = nn.Parameter(torch.zeros_like(self.base))

    def forward(self) -> torch.Tensor:
        return self.base + self.alpha * self.residual


@register_method
class TaskRes(DasslTrained, FeatureMethod):
    name = "taskres"
    summary = "TaskRes: a learned residual (classes × dim, α=0.5) on zero-shot CLIP's class features"
    base_defaults: ClassVar[dict[str, Any]] = DASSL_DEFAULTS
    defaults: ClassVar[dict[str, Any]] = {
        "alpha": 0.5,
        "optimizer": "adam",
        "lr": 2e-3,
        "batch_size": 256,
        "epochs": 200,
        "templates": TASKRES_TEMPLATES,
    }
    when: ClassVar[list[dict[str, Any]]] = [
        {"shots": [1, 2, 4], "set": {"epochs": 100}},
        {"dataset": ["imagenet"], "set": {"lr": 2e-4}},
        {"dataset": ["oxford_flowers"], "set": {"alpha": 1.0}},
    ]

    def templates(self) -> list[str]:
        chosen = template_for(self.hp["templates"], self.task)
        return [chosen] if isinstance(chosen, str) else list(chosen)

    def prompt_template(self) -> str:
        """The dataset's own template of TaskRes (on ImageNet, the last of those it averages)."""
        return self.templates()[-1]

    @torch.no_grad()
    def base_features(self) -> torch.Tensor:
        """The mean over templates of the frozen, unnormalized text features: (classes, dim)."""
        features = [
            self.backbone.encode_text(self.task.prompts(t), normalize=False) for t in self.templates()
        ]
        return torch.stack(features).mean(0).float()

    def text_passes(self) -> tuple[int, int]:
        """Its templates' prompts once, before training; no text encoder after that."""
        return self.task.num_classes * len(self.templates()), 0

    def setup(self) -> None:
        self.learner = TaskResidual(self.base_features(), float(self.hp["alpha"]))

    def modules_to_train(self) -> nn.Module:
        return self.learner

    def extra_modules(self) -> list[nn.Module]:
        return [self.learner]

    def classifier_features(self) -> torch.Tensor:
        return F.normalize(self.learner(), dim=-1)

    def train_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            image = self.backbone.encode_image(images)
        return self.hp["logit_scale"] * image @ self.classifier_features().to(image.dtype).T

    def prepare_eval(self) -> None:
        with torch.no_grad():
            self.classifier = self.classifier_features().float()

    def eval_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.hp["logit_scale"] * features.float() @ self.classifier.T

    def state(self) -> dict[str, torch.Tensor]:
        return {"residual": self.learner.residual}
