"""CoOp's prompt learner: what CoOp is, and what CoCoOp, KgCoOp and ProGrad build on.

A prompt is ``[SOS] ctx_1 … ctx_M classname . [EOS]``: M learnable context vectors of the text
width, shared by every class, in place of the token embeddings of the words before the class name.
The text encoder and the image encoder stay frozen; the class features are recomputed from the
context at every training step. The image encoder being frozen, the test images are scored from
cached features (:class:`~blocklora.methods.frozen.FeatureMethod`), and training follows Dassl's
trainer (:class:`~blocklora.methods.base.DasslTrained`), as the official code does.

The context starts from random vectors (``ctx_init: null``, CoOp: N(0, ``ctx_std``²)) or from words
(``ctx_init: "a photo of a"``, CoCoOp and KgCoOp). Words fill the *last* of the ``n_ctx`` vectors
with the token embeddings of their first ``k`` tokens, ``k`` being their number of *words*, and the
vectors before them start at zero (ProGrad's rule, which is CoCoOp's and KgCoOp's when ``n_ctx`` is
the number of words). The prompt text is then ``X … X <words> classname.``, so where the words
make more tokens than words (``"pet,"`` is two), the tokens left over stay fixed between the context
and the class name, as in ProGrad's code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from blocklora.clip import encode_text_embeddings
from blocklora.methods.base import DASSL_DEFAULTS, DasslTrained, FewShotTask
from blocklora.methods.frozen import FeatureMethod

PLACEHOLDER = "X"
# CoOp's epochs per shot count over a default of 200 (CoOp's README: 50 at 1 shot, 100 at 2 and 4,
# 200 at 8 and 16; 50 on ImageNet at every count), which ProGrad's recipe repeats.
COOP_EPOCHS: list[dict[str, Any]] = [
    {"shots": [1], "set": {"epochs": 50}},
    {"shots": [2, 4], "set": {"epochs": 100}},
    {"dataset": ["imagenet"], "set": {"epochs": 50}},
]


class PromptContext(nn.Module):
    """Learnable context vectors spliced between each prompt's start token and the tokens after them."""

    def __init__(self, init: torch.Tensor, embeddings: torch.Tensor) -> None:
        super().__init__()
        n_ctx = init.shape[0]
        self.ctx = nn.Parameter(init.detach().clone().to(embeddings.device))
        self.register_buffer("prefix", embeddings[:, :1].detach().clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx :].detach().clone(), persistent=False)

    @property
    def classes(self) -> int:
        return self.prefix.shape[0]

    def forward(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of every class prompt, (classes, length, width).

        With ``shift`` of shape (images, width), added to every context vector (CoCoOp's
        image-conditioned context): (images, classes, length, width).
        """
        ctx = self.ctx.to(self.prefix.dtype)
        if shift is None:
            return torch.cat([self.prefix, ctx.expand(self.classes, -1, -1), self.suffix], dim=1)
        images = shift.shape[0]
        shifted = ctx.unsqueeze(0) + shift.to(ctx.dtype).unsqueeze(1)  # (images, n_ctx, width)
        return torch.cat(
            [
                self.prefix.expand(images, -1, -1, -1),
                shifted.unsqueeze(1).expand(-1, self.classes, -1, -1),
                self.suffix.expand(images, -1, -1, -1),
            ],
            dim=2,
        )


def context_from_words(backbone, words: str, n_ctx: int) -> torch.Tensor:
    """MaPLe's, PromptSRC's and PLOT++'s start for ``n_ctx`` context vectors: the token embeddings of the
    first ``n_ctx`` tokens of ``words`` tokenized at the full context length (so past the words' own
    tokens come the end token's and the padding's embeddings, as in their code), (n_ctx, width)."""
    tokens = backbone.tokenizer([words.replace("_", " ")]).to(backbone.device)
    with torch.no_grad():
        return backbone.model.token_embedding(tokens)[0, 1 : 1 + n_ctx].detach().clone()


def template_for(templates: Mapping[str, Any], task: FewShotTask, fallback: str | None = None) -> Any:
    """A method's own template (or list of templates) for the task's dataset; for a dataset its table
    does not name, ``fallback``, else the dataset's own template."""
    return templates.get(task.dataset) or fallback or task.template


class PromptLearner(DasslTrained, FeatureMethod):
    """CoOp's prompt learner on a frozen CLIP, trained with Dassl's loop (module docstring)."""

    class_agnostic = True
    base_defaults: ClassVar[dict[str, Any]] = DASSL_DEFAULTS
    defaults: ClassVar[dict[str, Any]] = {"n_ctx": 16, "ctx_init": None, "ctx_std": 0.02}
    hparam_types: ClassVar[dict[str, str]] = {"ctx_init": "str|null"}

    def context_words(self) -> str | None:
        """The words the context starts from (None: random vectors)."""
        words = self.hp["ctx_init"]
        return words.replace("_", " ") if words else None

    def prompt_template(self) -> str:
        """The prompt whose words before the class name the context vectors replace."""
        n_ctx, words = int(self.hp["n_ctx"]), self.context_words()
        placeholders = n_ctx - (len(words.split(" ")) if words else 0)
        return " ".join([PLACEHOLDER] * placeholders + ([words] if words else [])) + " {}."

    def initial_context(self, width: int) -> torch.Tensor:
        """The context's starting vectors, (n_ctx, width) (module docstring)."""
        n_ctx, words = int(self.hp["n_ctx"]), self.context_words()
        if words is None:
            return torch.empty(n_ctx, width).normal_(std=float(self.hp["ctx_std"]))
        count = len(words.split(" "))
        if count > n_ctx:
            raise ValueError(
                f"{self.name}: ctx_init {words!r} has {count} words, more than n_ctx={n_ctx} context "
                f"vectors; set n_ctx to at least {count}"
            )
        with torch.no_grad():
            embedded = self.model.token_embedding(self.backbone.tokenize([words]))[0, 1 : 1 + count]
        init = torch.zeros(n_ctx, width, dtype=embedded.dtype)
        init[n_ctx - count :] = embedded.cpu()
        return init

    def setup(self) -> None:
        self.tokens = self.backbone.tokenize(self.task.prompts(self.prompt_template()))
        with torch.no_grad():
            embeddings = self.model.token_embedding(self.tokens)
        self.context = PromptContext(self.initial_context(embeddings.shape[-1]), embeddings)

    def modules_to_train(self) -> nn.Module:
        return self.context

    def extra_modules(self) -> list[nn.Module]:
        return [self.context]

    def class_features(self) -> torch.Tensor:
        """Normalized text features of every class prompt with the current context."""
        return encode_text_embeddings(self.model, self.context(), self.tokens)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized features of training images through the frozen image encoder."""
        with torch.no_grad():
            return self.backbone.encode_image(images)

    def train_logits(self, images: torch.Tensor) -> torch.Tensor:
        image = self.image_features(images)
        text = self.class_features()
        return self.hp["logit_scale"] * image @ text.to(image.dtype).T

    def prepare_eval(self) -> None:
        with torch.no_grad():
            self.classifier = self.class_features().float()

    def eval_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.hp["logit_scale"] * features.float() @ self.classifier.T

    def state(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.context.ctx}
