"""ProGrad (Zhu et al., ICCV 2023): CoOp updated only along gradients that agree with zero-shot CLIP.

As the official code (BeierZhu/Prompt-align ``ProGrad.public/trainers/prograd.py`` and
``Dassl.ProGrad.pytorch/dassl/engine/trainer.py::prograd_backward_and_update``; docs/protocol.md
§6): 16 context vectors, the last ones initialized from ProGrad's template for the dataset (its
words before the class name), the others at zero. Each step takes the gradient g_ce of the
cross-entropy and g_kl of the distillation loss Σ −softmax(z_zs/T) log softmax(z/T) T² against
zero-shot CLIP's logits z_zs (ProGrad's templates); where they conflict (g_ce · g_kl < 0) the
update is g_ce − λ (g_ce · ĝ_kl) ĝ_kl, else g_ce. λ = 1, T = 1; λ = 0.8 at 8 and 16 shots on
Flowers102, DTD and EuroSAT (the README). SGD lr 0.002, batch 32, CoOp's epochs (50 at 1 shot, 100
at 2 and 4, 200 at 8 and 16, ImageNet 50), one warm-up epoch at 1e-5, cosine per epoch.

ProGrad published RN50 configs only; this is that recipe on ViT-B/16. The teacher's image
features are the student's own (the image encoder is frozen in both; the official teacher is an
fp32 copy of the fp16 student's).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blocklora.methods.prompting import COOP_EPOCHS, PromptLearner, template_for
from blocklora.methods.registry import register_method

# ProGrad's CUSTOM_TEMPLATES (trainers/prograd.py), by this project's dataset names.
PROGRAD_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a type of food, a photo of {}.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
FROM_TEMPLATE = "template"  # ctx_init: the words of the dataset's template before its class name
ENDING = " {}."
GENERIC = "a photo of a {}."


def project_gradient(ce: torch.Tensor, kl: torch.Tensor, weight: float) -> torch.Tensor:
    """g_ce − weight · (g_ce · ĝ_kl) ĝ_kl where g_ce and g_kl conflict (negative dot product), else g_ce."""
    kl_unit = kl / torch.linalg.norm(kl)
    along = torch.dot(ce.flatten(), kl_unit.flatten())
    return torch.where(along < 0, ce - weight * along * kl_unit, ce)


@register_method
class ProGrad(PromptLearner):
    name = "prograd"
    summary = "ProGrad: CoOp (16 tokens) stepping only along gradients that agree with zero-shot CLIP"
    defaults: ClassVar[dict[str, Any]] = {
        **PromptLearner.defaults,
        "n_ctx": 16,
        "ctx_init": FROM_TEMPLATE,
        "lambda": 1.0,
        "temperature": 1.0,
        "epochs": 200,
        "templates": PROGRAD_TEMPLATES,
    }
    when: ClassVar[list[dict[str, Any]]] = [
        *COOP_EPOCHS,
        {"dataset": ["oxford_flowers", "dtd", "eurosat"], "shots": [8, 16], "set": {"lambda": 0.8}},
    ]

    def template(self) -> str:
        """ProGrad's template for the dataset; elsewhere the dataset's if it ends with its class name
        and a full stop (the context takes the words before it), else "a photo of a {}."."""
        fallback = self.task.template if self.task.template.endswith(ENDING) else GENERIC
        return template_for(self.hp["templates"], self.task, fallback)

    def context_words(self) -> str | None:
        if self.hp["ctx_init"] == FROM_TEMPLATE:
            return self.template()[: -len(ENDING)].replace("_", " ")
        return super().context_words()

    def setup(self) -> None:
        super().setup()
        self.teacher_text = self.text_features(self.template()).float()

    def train_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        image = self.image_features(images)
        text = self.class_features()
        logits = (self.hp["logit_scale"] * image @ text.to(image.dtype).T).float()
        with torch.no_grad():
            teacher = self.hp["logit_scale"] * image.float() @ self.teacher_text.T
        t = float(self.hp["temperature"])
        kl = (-F.softmax(teacher / t, dim=-1) * F.log_softmax(logits / t, dim=-1) * t * t).sum(1).mean()
        return {"loss": F.cross_entropy(logits, labels), "kl": kl}

    def backward(
        self, losses: dict[str, torch.Tensor], scaler: torch.amp.GradScaler, params: list[nn.Parameter]
    ) -> None:
        kl = torch.autograd.grad(scaler.scale(losses["kl"]), params, retain_graph=True)
        ce = torch.autograd.grad(scaler.scale(losses["loss"]), params)
        for param, ce_grad, kl_grad in zip(params, ce, kl, strict=True):
            param.grad = project_gradient(ce_grad, kl_grad, float(self.hp["lambda"]))
