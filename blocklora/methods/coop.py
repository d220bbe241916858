"""CoOp (Zhou et al., IJCV 2022): learnable prompt context shared by all classes, frozen CLIP.

As the reference ViT-B/16 configs (docs/protocol.md §6): 16 context vectors of the text width, drawn
from N(0, 0.02²), class token at the end ("X X … X classname."); SGD lr 0.002, momentum 0.9,
weight decay 5e-4, batch 32; one warm-up epoch at a constant 1e-5, then a cosine set once per
epoch; 50 epochs at 1 shot, 100 at 2 and 4, 200 at 8 and 16, 50 on ImageNet at every shot count;
the model after the last epoch is evaluated. Training follows Dassl's loop (its last partial batch
dropped, the cosine per epoch); training images get CoOp's RandomResizedCrop(scale 0.08-1) + flip.
The logit scale is fixed at 100 (OpenAI CLIP's learned value).
"""

from __future__ import annotations

from typing import Any, ClassVar

from blocklora.methods.prompting import COOP_EPOCHS, PromptLearner
from blocklora.methods.registry import register_method


@register_method
class CoOp(PromptLearner):
    name = "coop"
    summary = "CoOp: 16 shared learnable context vectors, class token at the end (SGD, 50-200 epochs)"
    defaults: ClassVar[dict[str, Any]] = {**PromptLearner.defaults, "epochs": 200}
    when: ClassVar[list[dict[str, Any]]] = COOP_EPOCHS
