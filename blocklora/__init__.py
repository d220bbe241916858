"""Block-LoRA and LoRA for CLIP few-shot classification: the public API.

Names are imported on first use, so that light commands (``blocklora fewshot``) and helpers
such as :mod:`blocklora.gpus` start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LowRankAdapter": "blocklora.adapters",
    "LoRALinear": "blocklora.adapters",
    "BlockLoRALinear": "blocklora.adapters",
    "Backbone": "blocklora.clip",
    "load_backbone": "blocklora.clip",
    "apply_adapters": "blocklora.inject",
    "merge_adapters": "blocklora.inject",
    "unmerge_adapters": "blocklora.inject",
    "count_trainable": "blocklora.inject",
    "save_adapters": "blocklora.inject",
    "load_adapters": "blocklora.inject",
}

if TYPE_CHECKING:
    from blocklora.adapters import BlockLoRALinear, LoRALinear, LowRankAdapter
    from blocklora.clip import Backbone, load_backbone
    from blocklora.inject import (
        apply_adapters,
        count_trainable,
        load_adapters,
        merge_adapters,
        save_adapters,
        unmerge_adapters,
    )


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("blocklora")
        except PackageNotFoundError:
            return "unknown (not installed: pip install -e .)"
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'blocklora' has no attribute {name!r}")


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
