"""Prompt surgery: learned tokens inside open_clip's two transformers, beside the adapter surgery.

Deep-prompt methods put tokens into the encoders rather than only into the text's input (MaPLe,
PromptSRC, PLOT++). Two operations cover them, on either tower:

- **append** (vision): tokens added after the patch and class embeddings (with their positional
  embeddings and patch dropout) and before ``ln_pre``, so the sequence grows from 1 + P to
  1 + P + n. Prompts of shape (V, n, width) make V prompted views of every image, the batch of B
  becoming V·B sequences, view-major (PLOT++'s M views); (n, width) is one view.
- **deep** (either tower): at the input of chosen blocks, the n prompt positions are *replaced* by
  the tokens given for that block (the hidden states the previous block produced there are
  dropped). Vision: the last n positions, which ``append`` put there. Text: the n positions after
  the start token, where the learned context sits in the input embeddings.

The text keeps its length, so the causal mask stays valid, and it is pooled at the end token by
the token ids as before; the class token stays at position 0 of the image, and the appended
positions are dropped before pooling (what 'tok' pooling gives anyway). The towers are run block
by block here, as ``open_clip.transformer.Transformer.forward`` does (gradient checkpointing aside),
so whatever the blocks hold (LoRA adapters included) takes part. With nothing appended and no
deep prompts, both functions compute exactly what open_clip's own encoders compute.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

DeepPrompts = Mapping[int, torch.Tensor]  # block index -> (n, width) tokens replacing the prompt positions


def _views(prompts: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """Appended prompts as (views, n, width), or None when there are none."""
    if prompts is None or prompts.numel() == 0:
        return None
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0)
    if prompts.dim() != 3 or prompts.shape[-1] != width:
        raise ValueError(
            f"appended prompts must be (n, {width}) or (views, n, {width}), got {tuple(prompts.shape)}"
        )
    return prompts


def run_blocks(transformer: nn.Module, x: torch.Tensor, *, deep: DeepPrompts | None, positions: slice,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``transformer``'s blocks on x (N, L, width), the prompt ``positions`` replaced by ``deep[i]`` at
    the input of block i."""
    deep = dict(deep or {})
    blocks = transformer.resblocks
    unknown = sorted(set(deep) - set(range(len(blocks))))
    if unknown:
        raise ValueError(
            f"deep prompts for blocks {unknown}, but the transformer has {len(blocks)} (0-{len(blocks) - 1})"
        )
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for index, block in enumerate(blocks):
        if index in deep:
            x = _replace(x, deep[index], positions, batch_first)
        x = block(x, attn_mask=attn_mask)
    return x if batch_first else x.transpose(0, 1)


def _replace(x: torch.Tensor, tokens: torch.Tensor, positions: slice, batch_first: bool) -> torch.Tensor:
    sequence = x.shape[1] if batch_first else x.shape[0]
    start, stop, _ = positions.indices(sequence)
    if tokens.shape[0] != stop - start:
        raise ValueError(f"{tokens.shape[0]} deep prompt tokens for {stop - start} prompt positions")
    batch = x.shape[0] if batch_first else x.shape[1]
    tokens = tokens.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
    if not batch_first:
        tokens = tokens.transpose(0, 1)
    dim = 1 if batch_first else 0
    return torch.cat([x.narrow(dim, 0, start), tokens, x.narrow(dim, stop, sequence - stop)], dim=dim)


def encode_image(
    model: nn.Module,
    images: torch.Tensor,
    *,
    append: torch.Tensor | None = None,
    deep: DeepPrompts | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Image features with prompts in open_clip's vision transformer: (V·B, dim), view-major.

    ``append``: (n, width) or (V, n, width) tokens before ``ln_pre``; ``deep``: block index →
    (n, width) tokens replacing the last n positions at that block's input (needs ``append``).
    """
    visual = model.visual
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    length = x.shape[1]
    views = _views(append, x.shape[-1])
    if views is None and deep:
        raise ValueError("deep vision prompts replace the appended ones: give `append` too")
    if views is not None:
        count, batch = views.shape[0], x.shape[0]
        x = x.unsqueeze(0).expand(count, -1, -1, -1)
        tokens = views.to(x.dtype).unsqueeze(1).expand(-1, batch, -1, -1)
        x = torch.cat([x, tokens], dim=2).reshape(count * batch, -1, x.shape[-1])
    x = visual.ln_pre(x)
    x = run_blocks(visual.transformer, x, deep=deep, positions=slice(length, x.shape[1]))
    pooled, _ = visual._pool(x[:, :length])
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return F.normalize(pooled, dim=-1) if normalize else pooled


def encode_text(
    model: nn.Module,
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    *,
    deep: DeepPrompts | None = None,
    start: int = 1,
    normalize: bool = True,
) -> torch.Tensor:
    """Text features of prompt embeddings (N, L, width) pooled at the end token, with ``deep``: block
    index → (n, width) tokens replacing positions ``start … start+n-1`` at that block's input."""
    length = embeddings.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    count = next(iter(deep.values())).shape[0] if deep else 0
    x = run_blocks(
        model.transformer,
        x,
        deep=deep,
        positions=slice(start, start + count),
        attn_mask=model.attn_mask[:length, :length],
    )
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if model.text_projection is not None:
        x = (
            model.text_projection(x)
            if isinstance(model.text_projection, nn.Linear)
            else x @ model.text_projection
        )
    return F.normalize(x, dim=-1) if normalize else x
