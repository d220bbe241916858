"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context shifted per image by a small meta-network.

As the official code (KaiyangZhou/CoOp ``trainers/cocoop.py``) and its ViT-B/16 config
``vit_b16_c4_ep10_batch1_ctxv1.yaml`` (docs/protocol.md §6): 4 context vectors initialized from
"a photo of a"; a meta-net Linear(d → d/16) → ReLU → Linear(d/16 → text width) on the normalized
image feature gives a bias π(x) added to every context vector, so each image has its own prompts
for every class and logits 100 · f̂(x) · t̂_c(x). SGD lr 0.002, batch 1, 10 epochs, one warm-up
epoch at 1e-5, cosine per epoch; the last epoch is evaluated. CoCoOp published no all-class
few-shot recipe; this one (its base-to-new config at every shot count) is CLIP-LoRA's choice.

Each image encodes all C class prompts through the text encoder, in training and at test time:
the most expensive method of the comparison (ImageNet: 1000 prompts per image). Evaluation runs
the per-image prompts in chunks of at most ``text_batch`` prompts.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from blocklora.clip import encode_text_embeddings
from blocklora.methods.prompting import PromptLearner
from blocklora.methods.registry import register_method
from blocklora.runtime import Precision


class MetaNet(nn.Module):
    """Linear(d → d/reduction) → ReLU → Linear(d/reduction → width): one bias per image."""

    def __init__(self, dim: int, width: int, reduction: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim // reduction)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(dim // reduction, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(features)))


@register_method
class CoCoOp(PromptLearner):
    name = "cocoop"
    summary = "CoCoOp: CoOp's 4 context vectors shifted per image by a meta-net (d → d/16 → width)"
    defaults: ClassVar[dict[str, Any]] = {
        **PromptLearner.defaults,
        "n_ctx": 4,
        "ctx_init": "a photo of a",
        "meta_reduction": 16,
        "batch_size": 1,
        "epochs": 10,
        "text_batch": 4096,
    }

    def text_passes(self) -> tuple[int, int]:
        """Every class prompt of every training image at every step, and of every test image."""
        classes = self.task.num_classes
        return self.iterations() * int(self.hp["batch_size"]) * classes, len(self.task.test) * classes

    def setup(self) -> None:
        super().setup()
        dim = int(self.model.visual.output_dim)
        width = self.context.ctx.shape[-1]
        self.meta_net = MetaNet(dim, width, int(self.hp["meta_reduction"])).to(self.device)
        self.learner = nn.ModuleDict({"context": self.context, "meta_net": self.meta_net})

    def modules_to_train(self) -> nn.Module:
        return self.learner

    def extra_modules(self) -> list[nn.Module]:
        return [self.learner]

    def conditioned_features(self, image: torch.Tensor, classes: list[int] | None = None) -> torch.Tensor:
        """Normalized text features of every class prompt (or ``classes``') for each image: (images, classes, dim)."""
        prompts = self.context(shift=self.meta_net(image))  # (images, classes, length, width)
        tokens = self.tokens
        if classes is not None:
            prompts, tokens = prompts[:, classes], tokens[classes]
        text = encode_text_embeddings(self.model, prompts.flatten(0, 1), tokens.repeat(image.shape[0], 1))
        return text.view(image.shape[0], prompts.shape[1], -1)

    def logits_for(self, image: torch.Tensor, classes: list[int] | None = None) -> torch.Tensor:
        """100 · f̂ · t̂_c(f̂) for normalized image features ``image``: (images, classes); with ``classes``,
        the others' logits are −inf."""
        text = self.conditioned_features(image, classes)
        logits = self.hp["logit_scale"] * torch.einsum("bd,bcd->bc", image, text.to(image.dtype))
        if classes is None:
            return logits
        full = logits.new_full((image.shape[0], self.context.classes), float("-inf"))
        full[:, classes] = logits
        return full

    def train_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_for(self.image_features(images))

    def eval_classes(self, subset: list[int] | None) -> None:
        """Encode only ``subset``'s prompts at test time (ImageNet-A/-R: 200 of 1000 per image)."""
        self.subset = subset

    def prepare_eval(self) -> None:
        self.learner.eval()
        self.precision = Precision.resolve(self.hp["precision"], self.device)

    @torch.no_grad()
    def eval_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        classes = getattr(self, "subset", None)
        chunk = max(1, int(self.hp["text_batch"]) // len(classes or range(self.context.classes)))
        logits = []
        with self.precision.autocast(self.device):
            for start in range(0, features.shape[0], chunk):
                logits.append(self.logits_for(features[start : start + chunk].float(), classes).float())
        return torch.cat(logits)

    def state(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.context.ctx, **{f"meta_net.{k}": v for k, v in self.meta_net.named_parameters()}}
