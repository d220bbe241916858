"""MaPLe (Khattak et al., CVPR 2023): prompts in both encoders, the image's coupled to the text's.

As the official code (muzairkhattak/multimodal-prompt-learning ``trainers/maple.py``,
``clip/model.py``: ``ResidualAttentionBlock_MaPLe``, ``VisionTransformer_MaPLe``; docs/protocol.md
§6): 2 text context vectors, the first two tokens of "a photo of a" (the prompt stays
"a photo of a classname.", so "of a" stays fixed), and 8 more pairs of text tokens, drawn from
N(0, 0.02²), that replace the context positions at the input of text blocks 1-8 (prompt depth 9).
The image encoder gets the same tokens through learned couplings: Linear(text → vision width) of
the context, appended before ``ln_pre``, and one Linear per deeper pair, replacing those appended
tokens at the input of vision blocks 1-8. The 8 couplings start as copies of one initialization
(the official ``_get_clones``). Cross-entropy only; SGD lr 0.0035, batch 4, 5 epochs, one warm-up
epoch at 1e-5, cosine per epoch; the last epoch is evaluated. MaPLe published no all-class
few-shot recipe; this one, its base-to-new config at every shot count, is what CLIP-LoRA ran.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from blocklora.methods.deep import DeepPromptMethod, normal_tokens
from blocklora.methods.registry import register_method


@register_method
class MaPLe(DeepPromptMethod):
    name = "maple"
    summary = "MaPLe: 2 text tokens in 9 layers, coupled into the image encoder by learned projections"
    defaults: ClassVar[dict[str, Any]] = {
        "n_ctx": 2,
        "ctx_init": "a photo of a",
        "depth": 9,
        "lr": 0.0035,
        "batch_size": 4,
        "epochs": 5,
    }

    def setup(self) -> None:
        n_ctx, depth = int(self.hp["n_ctx"]), self.check_depth(int(self.hp["depth"]), "text")
        self.check_depth(depth, "vision")
        self.context = self.build_text_context(self.hp["ctx_init"], n_ctx)
        text, vision = self.text_width, self.vision_width
        self.proj = nn.Linear(text, vision)
        self.deep_text = nn.ParameterList([normal_tokens(n_ctx, text) for _ in range(depth - 1)])
        coupling = nn.Linear(text, vision)
        self.couplings = nn.ModuleList([copy.deepcopy(coupling) for _ in range(depth - 1)])
        self.learner = nn.ModuleDict(
            {
                "context": self.context,
                "proj": self.proj,
                "deep_text": self.deep_text,
                "couplings": self.couplings,
            }
        ).to(self.device)

    def text_deep(self) -> dict[int, torch.Tensor]:
        return {block: tokens for block, tokens in enumerate(self.deep_text, start=1)}

    def vision_append(self) -> torch.Tensor:
        return self.proj(self.context.ctx)

    def vision_deep(self) -> dict[int, torch.Tensor]:
        return {
            block: coupling(tokens)
            for block, (coupling, tokens) in enumerate(
                zip(self.couplings, self.deep_text, strict=True), start=1
            )
        }
