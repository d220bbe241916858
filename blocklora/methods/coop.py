"""CoOp (Zhou et al., IJCV 2022): learnable prompt context shared by all classes, frozen CLIP.

As the reference ViT-B/16 configs (docs/protocol.md §6): 16 context vectors of the text width, drawn
from N(0, 0.02²), class token at the end ("X X … X classname."); SGD lr 0.002, momentum 0.9,
weight decay 5e-4, batch 32; cosine schedule after 1 warm-up epoch at a constant 1e-5; 50 epochs
at 1 shot, 100 at 2 and 4, 200 at 8 and 16, 50 on ImageNet at every shot count; the model after
the last epoch is evaluated. Training images get CoOp's RandomResizedCrop(scale 0.08-1) + flip.

Epochs become iterations of the generic loop (its steps, not Dassl's epochs, drive everything):
``iterations = epochs × ceil(n_train / batch_size)``, warm-up = ``warmup_epochs`` such epochs.
Differences from Dassl, all ours: the last partial batch of an epoch is kept (Dassl drops it
once the set holds a full batch, so e.g. 592 OxfordPets images make 19 steps per epoch here,
18 there); the learning rate follows the cosine per iteration, not per epoch, and reaches
``eta_min`` = 0 at the last step; the logit scale is fixed at 100 (OpenAI CLIP's learned value).
Shot counts outside the table take the epochs of the largest listed count below them.
The image encoder is frozen, so test images are scored from cached features.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from blocklora.clip import encode_text_embeddings
from blocklora.methods.base import TRAIN_DEFAULTS
from blocklora.methods.frozen import FeatureMethod
from blocklora.methods.registry import register_method


class PromptContext(nn.Module):
    """Learnable context vectors spliced between each prompt's start token and its class tokens."""

    def __init__(self, n_ctx: int, width: int, embeddings: torch.Tensor, std: float) -> None:
        super().__init__()
        self.ctx = nn.Parameter(torch.empty(n_ctx, width).normal_(std=std).to(embeddings.device))
        self.register_buffer("prefix", embeddings[:, :1].detach().clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx :].detach().clone(), persistent=False)

    def forward(self) -> torch.Tensor:
        """Token embeddings of every class prompt, (classes, length, width)."""
        ctx = self.ctx.to(self.prefix.dtype).unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)


@register_method
class CoOp(FeatureMethod):
    name = "coop"
    class_agnostic = True
    summary = "CoOp: 16 shared learnable context vectors, class token at the end (SGD, 50-200 epochs)"
    base_defaults: ClassVar[dict[str, Any]] = {
        k: v for k, v in TRAIN_DEFAULTS.items() if k != "iterations_per_shot"
    }
    defaults: ClassVar[dict[str, Any]] = {
        "n_ctx": 16,
        "ctx_std": 0.02,
        "optimizer": "sgd",
        "lr": 0.002,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "eta_min": 0.0,
        "batch_size": 32,
        "warmup_epochs": 1,
        "warmup_iterations": None,
        "warmup_lr": 1e-5,
        "epochs": None,
        "epochs_by_shots": {"1": 50, "2": 100, "4": 100, "8": 200, "16": 200},
        "epochs_by_dataset": {"imagenet": 50},
        "crop_scale": [0.08, 1.0],
    }
    hparam_types: ClassVar[dict[str, str]] = {"warmup_iterations": "int|null", "epochs": "int|null"}

    def epochs(self) -> int:
        """The epoch budget: ``epochs`` if set, else by dataset, else by shots."""
        if self.hp["epochs"] is not None:
            return int(self.hp["epochs"])
        if self.task.dataset in self.hp["epochs_by_dataset"]:
            return int(self.hp["epochs_by_dataset"][self.task.dataset])
        table = {int(shots): int(epochs) for shots, epochs in self.hp["epochs_by_shots"].items()}
        below = [shots for shots in table if shots <= self.task.shots]
        return table[max(below) if below else min(table)]

    def iterations_per_epoch(self) -> int:
        return math.ceil(len(self.task.train) / self.hp["batch_size"])

    def iterations(self) -> int:
        if self.hp.get("iterations") is not None:
            return int(self.hp["iterations"])
        return self.epochs() * self.iterations_per_epoch()

    def warmup_iterations(self) -> int:
        if self.hp["warmup_iterations"] is not None:
            return int(self.hp["warmup_iterations"])
        return int(self.hp["warmup_epochs"]) * self.iterations_per_epoch()

    def prompt_template(self) -> str:
        """The prompt whose ``X`` placeholders the learned context vectors replace."""
        return " ".join(["X"] * int(self.hp["n_ctx"])) + " {}."

    def setup(self) -> None:
        n_ctx = int(self.hp["n_ctx"])
        self.tokens = self.backbone.tokenize(self.task.prompts(self.prompt_template()))
        with torch.no_grad():
            embeddings = self.model.token_embedding(self.tokens)
        self.context = PromptContext(n_ctx, embeddings.shape[-1], embeddings, float(self.hp["ctx_std"]))
        # the loop reads the warm-up length from hp: give it the epoch-based value
        self.hp = {**self.hp, "warmup_iterations": self.warmup_iterations()}

    def modules_to_train(self) -> nn.Module:
        return self.context

    def extra_modules(self) -> list[nn.Module]:
        return [self.context]

    def class_features(self) -> torch.Tensor:
        return encode_text_embeddings(self.model, self.context(), self.tokens)

    def train_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            image = self.backbone.encode_image(images)
        text = self.class_features()
        return self.hp["logit_scale"] * image @ text.to(image.dtype).T

    def fit(self, run) -> dict[str, Any]:
        stats = super().fit(run)
        epochs = self.epochs() if self.hp.get("iterations") is None else None
        return {**stats, "epochs": epochs, "warmup_iterations": self.hp["warmup_iterations"]}

    def prepare_eval(self) -> None:
        with torch.no_grad():
            self.classifier = self.class_features().float()

    def eval_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.hp["logit_scale"] * features.float() @ self.classifier.T

    def state(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.context.ctx}
