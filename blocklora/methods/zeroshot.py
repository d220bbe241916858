"""Zero-shot CLIP: class prompts from the dataset's template, no training."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from blocklora.methods.base import EVAL_DEFAULTS, Method
from blocklora.methods.registry import register_method


@register_method
class ZeroShot(Method):
    name = "zeroshot"
    class_agnostic = True
    summary = "zero-shot CLIP with the dataset's prompt template (docs/protocol.md §5)"
    base_defaults = EVAL_DEFAULTS
    needs_fewshot = False
    defaults: ClassVar[dict[str, Any]] = {"template": None}
    hparam_types: ClassVar[dict[str, str]] = {"template": "str|null"}

    def iterations(self) -> int:
        return 0

    def fit(self, run) -> dict[str, Any]:
        return {}

    def prepare_eval(self) -> None:
        self.classifier = self.text_features()

    @torch.no_grad()
    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone.encode_image(images)
        return self.hp["logit_scale"] * features @ self.classifier.to(features.dtype).T
