"""The official prompt learners' computation written out plainly, for the methods' tests to compare with.

As in CoOp's ``TextEncoder`` and ``PromptLearner`` (and every method built on them): prompts tokenized
to the full context length, their token embeddings cut into the start token, the context and what
follows, the text transformer run on all positions with the causal mask, the end token's state
projected. Nothing here is imported from the package's methods.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F


def perturbed(method, seed: int = 0, scale: float = 0.1):
    """The method's learned tensors moved off their initial values (N(0, scale²) added), so that a
    comparison with the reference compares something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in method.modules_to_train().parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return method


def tokenize(model_name: str, texts: list[str]) -> torch.Tensor:
    """Token ids at the model's full context length (no cut to the longest prompt)."""
    return open_clip.get_tokenizer(model_name)(texts)


def prompt_embeddings(model, model_name: str, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, token embeddings) of ``texts`` at the full context length."""
    tokens = tokenize(model_name, texts)
    with torch.no_grad():
        return tokens, model.token_embedding(tokens)


def text_encoder(model, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CoOp's TextEncoder.forward: unnormalized text features of prompt embeddings (N, L, width)."""
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def spliced(prefix: torch.Tensor, ctx: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """CoOp's construct_prompts: [SOS] ctx suffix for each class (ctx: (n_ctx, width) or (classes, n_ctx, width))."""
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
    return torch.cat([prefix, ctx, suffix], dim=1)


def normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def image_features(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return normalized(model.encode_image(images))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def prompted_image(model, images: torch.Tensor, first: torch.Tensor, deep: dict) -> torch.Tensor:
    """MaPLe's VisionTransformer_MaPLe (and PromptSRC's, PLOT++'s) one step at a time: prompts appended
    after the positional embeddings and before ln_pre; at block i in ``deep``, the last n positions
    dropped and deep[i] put in their place; the class token's state after ln_post, projected.
    Unnormalized. open_clip's blocks take (N, L, D)."""
    visual = model.visual
    x = visual.conv1(images).flatten(2).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    x = torch.cat([x, first.expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    n = first.shape[0]
    for i, block in enumerate(visual.transformer.resblocks):
        if i in deep:
            x = torch.cat([x[:, : x.shape[1] - n], deep[i].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def prompted_text(model, prompts: torch.Tensor, tokens: torch.Tensor, deep: dict) -> torch.Tensor:
    """MaPLe's and PromptSRC's text encoder: at block i in ``deep``, positions 1 … n replaced by deep[i]
    (the start token and what follows the context kept). Unnormalized, at the full context length."""
    x = prompts + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if i in deep:
            n = deep[i].shape[0]
            x = torch.cat([x[:, :1], deep[i].expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
