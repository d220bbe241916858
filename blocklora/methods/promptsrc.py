"""PromptSRC (Khattak et al., ICCV 2023): prompts in both encoders, kept near zero-shot CLIP, averaged over epochs.

As the official code (muzairkhattak/PromptSRC ``trainers/promptsrc.py``, ``clip/model.py``:
``ResidualAttentionBlock_IVLP``) and its few-shot config ``vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml``
(docs/protocol.md §6): independent prompts of 4 tokens in 9 layers of each encoder: the text's
context from "a photo of a", replaced at the input of text blocks 1-8; the image's appended before
``ln_pre`` and replaced at the input of vision blocks 1-8; all others drawn from N(0, 0.02²).
The loss adds three consistency terms to the cross-entropy: 25 · L1 between the prompted text
features and the mean over 60 templates of frozen CLIP's text features, 10 · L1 between the
prompted and the frozen image features (both normalized), and 1 · KL(frozen ‖ prompted) logits
(summed, divided by the logits' size). Gaussian prompt aggregation: after epoch e the prompts,
weighted by N(e; μ, σ) normalized over the epochs, are added to a running sum, which replaces them
after the last epoch; μ/σ = 30/30, and 45/5 on StanfordCars, Flowers102, FGVCAircraft, DTD and
EuroSAT (the config's two settings). SGD lr 0.0025, batch 4, 50 epochs at every shot count, one
warm-up epoch at 1e-5, cosine per epoch; the aggregated prompts are evaluated.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blocklora.methods.deep import DeepPromptMethod, normal_tokens
from blocklora.methods.registry import register_method

# PromptSRC's IMAGENET_TEMPLATES (trainers/imagenet_templates.py): the text teacher's 60 templates.
TEACHER_TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
]  # fmt: skip


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Gaussian prompt aggregation's weight of each epoch 1 … epochs: N(e; mean, std), normalized."""
    density = [
        math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        for e in range(1, epochs + 1)
    ]
    total = sum(density)
    return [d / total for d in density]


@register_method
class PromptSRC(DeepPromptMethod):
    name = "promptsrc"
    summary = "PromptSRC: 4+4 prompts in 9 layers of both encoders, self-regularized, averaged over epochs"
    defaults: ClassVar[dict[str, Any]] = {
        "n_ctx": 4,
        "n_ctx_vision": 4,
        "ctx_init": "a photo of a",
        "depth_text": 9,
        "depth_vision": 9,
        "text_weight": 25.0,
        "image_weight": 10.0,
        "kl_weight": 1.0,
        "gpa_mean": 30.0,
        "gpa_std": 30.0,
        "lr": 0.0025,
        "batch_size": 4,
        "epochs": 50,
    }
    when: ClassVar[list[dict[str, Any]]] = [
        {
            "dataset": ["stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat"],
            "set": {"gpa_mean": 45.0, "gpa_std": 5.0},
        }
    ]

    def setup(self) -> None:
        n_text, n_vision = int(self.hp["n_ctx"]), int(self.hp["n_ctx_vision"])
        depth_text = self.check_depth(int(self.hp["depth_text"]), "text")
        depth_vision = self.check_depth(int(self.hp["depth_vision"]), "vision")
        self.context = self.build_text_context(self.hp["ctx_init"], n_text)
        self.deep_text = nn.ParameterList(
            [normal_tokens(n_text, self.text_width) for _ in range(depth_text - 1)]
        )
        self.first_vision = normal_tokens(n_vision, self.vision_width)
        self.deep_vision = nn.ParameterList(
            [normal_tokens(n_vision, self.vision_width) for _ in range(depth_vision - 1)]
        )
        self.learner = nn.ModuleDict(
            {"context": self.context, "deep_text": self.deep_text, "deep_vision": self.deep_vision}
        )
        self.learner.register_parameter("first_vision", self.first_vision)
        self.learner.to(self.device)
        self.gpa = {name: torch.zeros_like(p) for name, p in self.learner.named_parameters()}

    @functools.cached_property
    def teacher_text(self) -> torch.Tensor:
        """The mean over the 60 templates of frozen CLIP's (unnormalized) text features, normalized
        (computed when training first needs it: evaluating a trained state does not)."""
        with torch.no_grad():
            features = [
                self.backbone.encode_text(self.task.prompts(t), normalize=False) for t in TEACHER_TEMPLATES
            ]
        return F.normalize(torch.stack(features).mean(0).float(), dim=-1)

    def image_passes(self) -> tuple[int, int]:
        """Each training image twice (prompted, and through the frozen encoder for the teacher)."""
        train, test = super().image_passes()
        return 2 * train, test

    def text_deep(self) -> dict[int, torch.Tensor]:
        return {block: tokens for block, tokens in enumerate(self.deep_text, start=1)}

    def vision_append(self) -> torch.Tensor:
        return self.learner.first_vision

    def vision_deep(self) -> dict[int, torch.Tensor]:
        return {block: tokens for block, tokens in enumerate(self.deep_vision, start=1)}

    def train_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = self.hp["logit_scale"]
        text = self.class_features().float()
        image = self.image_features(images).float()
        logits = scale * image @ text.T
        with torch.no_grad():
            frozen_image = self.backbone.encode_image(images).float()  # the unprompted encoder
            frozen_logits = scale * frozen_image @ self.teacher_text.T
        ce = F.cross_entropy(logits, labels)
        text_term = F.l1_loss(text, self.teacher_text) * self.hp["text_weight"]
        image_term = F.l1_loss(image, frozen_image) * self.hp["image_weight"]
        kl = (
            F.kl_div(
                F.log_softmax(logits, dim=1),
                F.log_softmax(frozen_logits, dim=1),
                reduction="sum",
                log_target=True,
            )
            / logits.numel()
        )
        kl = kl * self.hp["kl_weight"]
        return {
            "loss": ce + text_term + image_term + kl,
            "ce": ce,
            "text": text_term,
            "image": image_term,
            "kl": kl,
        }

    def epoch_end(self, epoch: int, epochs: int) -> None:
        """Add this epoch's weighted prompts to the aggregate; after the last, the prompts become it."""
        weight = gpa_weights(epochs, float(self.hp["gpa_mean"]), float(self.hp["gpa_std"]))[epoch]
        with torch.no_grad():
            for name, param in self.learner.named_parameters():
                self.gpa[name] += weight * param
            if epoch == epochs - 1:
                for name, param in self.learner.named_parameters():
                    param.copy_(self.gpa[name])

    def loop_state(self) -> dict[str, torch.Tensor]:
        return {f"gpa.{name}": total for name, total in self.gpa.items()}

    def load_loop_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.gpa:
            if f"gpa.{name}" in state:
                self.gpa[name] = state[f"gpa.{name}"].to(self.gpa[name].device)
