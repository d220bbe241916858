"""Backbones: an open_clip CLIP by name and pretrained tag, a local checkpoint, or a shipped config.

A backbone is a JSON config (open_clip's own, or one in ``blocklora/model_configs``) built by one
factory, ``open_clip.create_model``. Text is encoded with the prompt tokens cut to the longest
prompt: exact for CLIP's causal text encoder, since positions after the end token never reach it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import open_clip
import torch
from torch import nn

from blocklora import prompts

CONFIG_DIR = Path(__file__).with_name("model_configs")
NO_WEIGHTS = (None, "", "none", "random")


@cache
def register_configs() -> None:
    """Make the configs shipped with blocklora (e.g. ``demo-tiny``) known to open_clip."""
    if CONFIG_DIR.is_dir():
        open_clip.add_model_config(CONFIG_DIR)


def default_cache_dir() -> Path:
    """Where downloaded weights go: $BLOCKLORA_CACHE, else ~/.cache/blocklora."""
    return Path(os.environ.get("BLOCKLORA_CACHE", Path.home() / ".cache" / "blocklora"))


@dataclass
class Backbone:
    """An open_clip CLIP with its tokenizer and image statistics."""

    model: nn.Module
    tokenizer: object
    name: str
    pretrained: str | None
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids cut to the longest prompt (end token included) when the text tower allows it."""
        tokens = self.tokenizer(prompts)
        if supports_truncation(self.model):
            length = int(tokens.argmax(dim=-1).max()) + 1
            tokens = tokens[:, :length]
        return tokens.to(self.device)

    def encode_text(self, prompts: list[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        tokens = self.tokenize(prompts) if isinstance(prompts, list) else prompts.to(self.device)
        return encode_text(self.model, tokens, normalize=normalize)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)


def supports_truncation(model: nn.Module) -> bool:
    """True for open_clip's CLIP with a causal text tower pooled at the end token."""
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "text_pool_type", "argmax") == "argmax"
        and getattr(model, "attn_mask", None) is not None
    )


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` for tokens of any length up to the context length."""
    if not supports_truncation(model) or tokens.shape[1] == model.positional_embedding.shape[0]:
        return model.encode_text(tokens, normalize=normalize)
    return encode_text_embeddings(model, model.token_embedding(tokens), tokens, normalize=normalize)


def encode_text_embeddings(
    model: nn.Module, embeddings: torch.Tensor, tokens: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """The text tower from token embeddings on (for prompt learning), pooled at the end token."""
    return prompts.encode_text(model, embeddings, tokens, normalize=normalize)


def load_backbone(
    name: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> Backbone:
    """Build ``name`` and load ``pretrained``: an open_clip tag, a checkpoint file, or none."""
    register_configs()
    known = open_clip.list_models()
    if name not in known:
        raise ValueError(
            f"unknown backbone {name!r}: use an open_clip model name (e.g. ViT-B-16) or one of "
            f"blocklora's configs in {CONFIG_DIR} ({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))})"
        )
    weights = None if pretrained in NO_WEIGHTS else str(pretrained)
    kwargs: dict = {}
    if weights is not None and not Path(weights).is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if weights not in tags:
            looks_like_path = os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))
            raise FileNotFoundError(
                f"pretrained {weights!r} for {name} is neither a checkpoint file"
                + (" (no such file)" if looks_like_path else "")
                + f" nor an open_clip tag; tags for {name}: {tags or 'none'}"
            )
        kwargs["force_quick_gelu"] = bool(
            open_clip.get_pretrained_cfg(name, weights).get("quick_gelu", False)
        )
        kwargs["cache_dir"] = str(cache_dir or default_cache_dir())
    model = open_clip.create_model(name, pretrained=weights, device=device, **kwargs)
    model.eval()
    model.blocklora_backbone = {"name": name, "pretrained": None if weights is None else Path(weights).name}
    tokenizer = open_clip.get_tokenizer(name)
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else int(size)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        name=name,
        pretrained=weights,
        image_size=size,
        mean=tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
    )
