"""LoRA and Block-LoRA on the attention of both CLIP encoders (CLIP-LoRA's protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from blocklora.inject import adapted_attentions, apply_adapters, load_adapters, merge_adapters, save_adapters
from blocklora.methods.base import Method
from blocklora.methods.registry import register_method

ADAPTER_KEYS = ("rank", "alpha", "dropout", "scaling", "targets", "encoders", "layers", "fuse", "init")


@register_method
class LoRA(Method):
    name = "lora"
    class_agnostic = True
    summary = "LoRA on q, k, v of both encoders, r=2, alpha=1, s=alpha/sqrt(r) (CLIP-LoRA)"
    defaults: ClassVar[dict[str, Any]] = {
        "rank": 2,
        "alpha": 1.0,
        "scaling": "sqrt",
        "dropout": 0.25,
        "targets": ["q", "k", "v"],
        "encoders": ["vision", "text"],
        "layers": "all",
        "fuse": True,
        "init": "kaiming",
        "template": "a photo of a {}.",
    }
    hparam_types: ClassVar[dict[str, str]] = {"layers": "str|list"}
    adapter_kind = "lora"

    def adapter_kwargs(self) -> dict[str, Any]:
        return {k: self.hp[k] for k in ADAPTER_KEYS}

    def setup(self) -> None:
        apply_adapters(self.model, self.adapter_kind, **self.adapter_kwargs())
        self.tokens = self.backbone.tokenize(self.task.prompts(self.prompt_template()))

    def modules_to_train(self) -> nn.Module:
        return self.model

    def train_logits(self, images: torch.Tensor) -> torch.Tensor:
        text = self.backbone.encode_text(self.tokens)
        image = self.backbone.encode_image(images)
        return self.hp["logit_scale"] * image @ text.to(image.dtype).T

    def prepare_eval(self) -> None:
        merge_adapters(self.model)
        self.classifier = self.text_features()

    @torch.no_grad()
    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone.encode_image(images)
        return self.hp["logit_scale"] * features @ self.classifier.to(features.dtype).T

    def save(self, path: str | Path, **metadata: Any) -> None:
        save_adapters(self.model, path, method=self.name, hparams=self.hp, **metadata)

    def load(self, path: str | Path) -> dict[str, Any]:
        return load_adapters(self.model, path)

    def adapter_count(self) -> int:
        return sum(1 for _, _, attn in adapted_attentions(self.model) for _ in attn.adapters)


@register_method
class BlockLoRA(LoRA):
    name = "blocklora"
    summary = "Block-LoRA: the input's blocks share one down-projection (n=8 blocks, r=2)"
    defaults: ClassVar[dict[str, Any]] = {**LoRA.defaults, "blocks": 8}
    adapter_kind = "blocklora"

    def adapter_kwargs(self) -> dict[str, Any]:
        return {**super().adapter_kwargs(), "blocks": self.hp["blocks"]}
