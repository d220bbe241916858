"""Block-LoRA and LoRA for CLIP few-shot classification: the public API."""

from blocklora.adapters import BlockLoRALinear, LoRALinear, LowRankAdapter
from blocklora.clip import Backbone, load_backbone
from blocklora.inject import apply_adapters, merge_adapters, unmerge_adapters
from blocklora.io import load_adapters, save_adapters


def count_trainable(model) -> int:
    """Number of parameters with ``requires_grad``, each tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "Backbone",
    "BlockLoRALinear",
    "LoRALinear",
    "LowRankAdapter",
    "apply_adapters",
    "count_trainable",
    "load_adapters",
    "load_backbone",
    "merge_adapters",
    "save_adapters",
    "unmerge_adapters",
]
