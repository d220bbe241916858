"""Methods whose learned tokens sit inside both encoders (MaPLe, PromptSRC, PLOT++): their common part.

They put prompts into the image encoder (:mod:`blocklora.prompts`), so unlike CoOp's family the
image features of an image change with training: every training step runs both encoders (their
weights frozen, their activations kept for the backward), and test images go through the prompted
image encoder too. The text prompt is ``[SOS] ctx_1 … ctx_n <rest of the words> classname.``, the
context starting from the first n tokens of words such as "a photo of a"
(:func:`~blocklora.methods.prompting.context_from_words`). Training follows Dassl's loop, as their
official code does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from blocklora import prompts
from blocklora.methods.base import DASSL_DEFAULTS, DasslTrained, Method
from blocklora.methods.prompting import PromptContext, context_from_words


def normal_tokens(count: int, width: int, std: float = 0.02) -> nn.Parameter:
    """(count, width) prompt tokens drawn from N(0, std²), as the official codes draw theirs."""
    return nn.Parameter(torch.empty(count, width).normal_(std=std))


class DeepPromptMethod(DasslTrained, Method):
    """Prompts in both encoders, trained with Dassl's loop; a subclass builds them in :meth:`setup`
    (calling :meth:`build_text_context` first) and says where they go (:meth:`text_deep`,
    :meth:`vision_append`, :meth:`vision_deep`)."""

    class_agnostic = True
    base_defaults: ClassVar[dict[str, Any]] = DASSL_DEFAULTS

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def vision_width(self) -> int:
        return int(self.model.visual.conv1.out_channels)

    def check_depth(self, depth: int, tower: str) -> int:
        """``depth`` prompted layers (the input and blocks 1 … depth−1) must fit the tower's blocks."""
        blocks = len((self.model.visual if tower == "vision" else self.model).transformer.resblocks)
        if not 1 <= depth <= blocks:
            raise ValueError(
                f"{self.name}: prompt depth {depth} of the {tower} encoder must be between 1 and its "
                f"{blocks} blocks; lower it for this backbone"
            )
        return depth

    def build_text_context(self, words: str, n_ctx: int) -> PromptContext:
        """The prompts ``<words> classname.`` with their first ``n_ctx`` tokens learnable."""
        self.tokens = self.backbone.tokenize(
            [f"{words} {name.replace('_', ' ')}." for name in self.task.classnames]
        )
        with torch.no_grad():
            embeddings = self.model.token_embedding(self.tokens)
        return PromptContext(context_from_words(self.backbone, words, n_ctx), embeddings)

    def prompt_template(self) -> str:
        return f"{self.hp['ctx_init']} {{}}."

    def modules_to_train(self) -> nn.Module:
        return self.learner

    def extra_modules(self) -> list[nn.Module]:
        return [self.learner]

    # where the prompts go
    def text_deep(self) -> dict[int, torch.Tensor]:
        return {}

    def vision_append(self) -> torch.Tensor | None:
        return None

    def vision_deep(self) -> dict[int, torch.Tensor]:
        return {}

    def class_features(self) -> torch.Tensor:
        """Normalized text features of every class prompt, prompted inside the text encoder."""
        return prompts.encode_text(self.model, self.context(), self.tokens, deep=self.text_deep())

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized features of ``images`` through the prompted image encoder."""
        return prompts.encode_image(self.model, images, append=self.vision_append(), deep=self.vision_deep())

    def train_logits(self, images: torch.Tensor) -> torch.Tensor:
        image = self.image_features(images)
        return self.hp["logit_scale"] * image @ self.class_features().to(image.dtype).T

    def prepare_eval(self) -> None:
        self.learner.eval()
        with torch.no_grad():
            self.classifier = self.class_features()

    @torch.no_grad()
    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        image = self.image_features(images)
        return self.hp["logit_scale"] * image @ self.classifier.to(image.dtype).T

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.learner.named_parameters())
