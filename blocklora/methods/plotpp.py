"""PLOT++ (Chen et al., ICLR 2023): several text and image prompts matched by optimal transport.

As the official code (CHENGY12/PLOT ``plot-pp/trainers/plotpp.py``, ``plot-pp/clip/model.py``,
``plot-pp/configs/trainers/PLOTPP/vit.yaml``, ``scripts/main_visiononly.sh`` and
``scripts/main_joint.sh``; docs/protocol.md §6): N = 4 text prompts, their contexts initialized
from four hand-written templates per dataset (n_ctx = the number of words of the first); M = 4
image prompts of 2 tokens, drawn from N(0, 0.02²) and appended before ``ln_pre``, so each image is
seen M times. For an image and a class, the M×N cosine similarities are matched by Sinkhorn's
optimal transport (ε = 0.1, uniform marginals, at most 100 iterations, stopping when the mean
change of the row scaling falls below 0.01, no gradient), and the logit is 100 · Σ T ⊙ sim.

Two stages of 50 epochs each (SGD lr 0.002, batch 32, one warm-up epoch at 1e-5, cosine per epoch):
the image prompts alone, with the logits of the pooled features added to the transport's; then
both prompts from there, on the transport's logits alone. The official scripts run stage 1 on
seed 1's few-shot split only and start every seed's stage 2 from it, so seeds 2 and 3 see more
labelled images than their split; here each run trains its own stage 1 on its own split.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blocklora import prompts
from blocklora.methods.deep import DeepPromptMethod
from blocklora.methods.prompting import PromptContext, context_from_words
from blocklora.methods.registry import register_method
from blocklora.train import train_loop

# plot-pp/trainers/plotpp.py's template_dict, by this project's dataset names (their spacing kept).
PLOT_TEMPLATES: dict[str, list[str]] = {
    "caltech101": ["a photo of a", "this is a photo", "this is picture of", "one picture of a"],
    "dtd": ["a photo of a texture", "this is a photo texture", "this is a picture texture", "one picture of a texture"],
    "eurosat": ["a centered satellite photo of", "a centered satellite picture of", "this is centered satellite photo of",
                "one centered satellite photo of a"],
    "fgvc_aircraft": ["a photo of an aircraft", "a picture of an aircraft", "this is aircraft picture of",
                      "one picture of an aircraft"],
    "food101": ["a photo of a food", "this is a food photo", " this is food picture of", "one picture of a food"],
    "imagenet": ["a photo of a", "this is a photo ", "this is a", "one picture of a"],
    "oxford_flowers": ["a photo of a flower", "one picture of a flower", "this is flower picture of",
                       "one picture of a flower"],
    "oxford_pets": ["a photo of a pet", "one picture of a pet", "this is pet picture of", "one picture of a pet"],
    "stanford_cars": ["a photo of a", "this is a photo ", "this is picture of", "one picture of a"],
    "sun397": ["a photo of a", "this is a photo", "this is picture of", "one picture of a"],
    "ucf101": ["a photo of a person doing", "this is a photo people doing", "this is picture of people doing",
               "one picture of a person doing"],
}  # fmt: skip
GENERIC = "imagenet"  # whose templates a dataset the table does not name takes
VISION, JOINT = "vision", "joint"


def sinkhorn(kernel: torch.Tensor, iterations: int, threshold: float) -> torch.Tensor:
    """The transport plan of each (M × N) ``kernel`` with uniform marginals, as PLOT++'s ``Sinkhorn``."""
    rows = torch.full(kernel.shape[:-1], 1.0 / kernel.shape[-2], dtype=kernel.dtype, device=kernel.device)
    cols = torch.full(kernel.shape[:-2] + kernel.shape[-1:], 1.0 / kernel.shape[-1], dtype=kernel.dtype,
                      device=kernel.device)  # fmt: skip
    r, c = torch.ones_like(rows), torch.ones_like(cols)
    for _ in range(iterations):
        previous = r
        r = rows / (kernel @ c.unsqueeze(-1)).squeeze(-1)
        c = cols / (kernel.transpose(-2, -1) @ r.unsqueeze(-1)).squeeze(-1)
        if (r - previous).abs().mean().item() < threshold:
            break
    return r.unsqueeze(-1) * c.unsqueeze(-2) * kernel


@register_method
class PLOTPP(DeepPromptMethod):
    name = "plotpp"
    summary = "PLOT++: 4 text and 4 image prompts matched by optimal transport (two stages of 50 epochs)"
    defaults: ClassVar[dict[str, Any]] = {
        "views": 4,
        "n_ctx_vision": 2,
        "epsilon": 0.1,
        "sinkhorn_iterations": 100,
        "sinkhorn_threshold": 0.01,
        "lr": 0.002,
        "batch_size": 32,
        "epochs": 50,
        "templates": PLOT_TEMPLATES,
    }
    stage = JOINT

    def templates(self) -> list[str]:
        """The text prompts' starting words: the trained dataset's (a transfer keeps its source's)."""
        dataset = self.task.extra.get("source_dataset", self.task.dataset)
        table = self.hp["templates"]
        return list(table.get(dataset) or table.get(GENERIC) or PLOT_TEMPLATES[GENERIC])

    def prompt_template(self) -> str:
        """The first text prompt's template (the one whose words set n_ctx)."""
        return f"{self.templates()[0]} {{}}."

    def setup(self) -> None:
        templates = self.templates()
        n_ctx = len(templates[0].split())
        names = [name.replace("_", " ") for name in self.task.classnames]
        self.tokens = self.backbone.tokenize([f"{words} {name}." for words in templates for name in names])
        with torch.no_grad():
            embeddings = self.model.token_embedding(self.tokens).unflatten(0, (len(templates), len(names)))
        self.contexts = nn.ModuleList(
            [
                PromptContext(context_from_words(self.backbone, words, n_ctx), embeddings[i])
                for i, words in enumerate(templates)
            ]
        )
        vision = torch.empty(int(self.hp["views"]), int(self.hp["n_ctx_vision"]), self.vision_width).normal_(
            std=0.02
        )
        self.learner = nn.ModuleDict({"contexts": self.contexts})
        self.learner.register_parameter("vision", nn.Parameter(vision))
        self.learner.to(self.device)

    def text_passes(self) -> tuple[int, int]:
        """Every class's prompt under each text prompt, at every step of both stages and once for the test."""
        per_pass = len(self.templates()) * self.task.num_classes
        return self.iterations() * per_pass, per_pass

    def image_passes(self) -> tuple[int, int]:
        """Every image once per image prompt, in training and at test time."""
        train, test = super().image_passes()
        views = int(self.hp["views"])
        return train * views, test * views

    def iterations(self) -> int:
        return 2 * self.schedule().total  # two stages

    def class_features(self) -> torch.Tensor:
        """Normalized text features of every class under each text prompt: (N, classes, dim)."""
        embeddings = torch.cat([context() for context in self.contexts])
        text = prompts.encode_text(self.model, embeddings, self.tokens, normalize=False)
        return text.unflatten(0, (len(self.contexts), -1))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalized features of each image under each image prompt: (M, images, dim)."""
        features = prompts.encode_image(self.model, images, append=self.learner.vision, normalize=False)
        return features.unflatten(0, (self.learner.vision.shape[0], -1))

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """100 · Σ T ⊙ sim over the M × N matching of each (image, class); in stage 1 plus the logits
        of the features pooled over the prompts."""
        scale = self.hp["logit_scale"]
        image, text = image.float(), text.float()
        views, batch = image.shape[:2]
        sim = torch.einsum("mbd,ncd->bcmn", F.normalize(image, dim=-1), F.normalize(text, dim=-1))
        sim = sim.reshape(-1, views, text.shape[0])
        with torch.no_grad():
            plan = sinkhorn(
                torch.exp(-(1.0 - sim) / self.hp["epsilon"]),
                int(self.hp["sinkhorn_iterations"]),
                float(self.hp["sinkhorn_threshold"]),
            )
        logits = scale * (plan * sim).sum(dim=(1, 2)).view(batch, -1)
        if self.stage == VISION:
            pooled = F.normalize(image.mean(0), dim=-1) @ F.normalize(text.mean(0), dim=-1).T
            logits = logits + scale * pooled
        return logits

    def train_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.image_features(images), self.class_features())

    def fit(self, run) -> dict[str, Any]:
        """Stage 1 trains the image prompts alone (with the pooled logits); stage 2 both, from there."""
        self.stage = VISION
        self.contexts.requires_grad_(False)
        try:
            first = train_loop(self, run, stage="stage1")
        finally:
            self.contexts.requires_grad_(True)
        self.stage = JOINT
        second = train_loop(self, run, stage="stage2")
        return {
            **second,
            "iterations": first["iterations"] + second["iterations"],
            "train_seconds": first["train_seconds"] + second["train_seconds"],
            "stage1": {k: v for k, v in first.items() if k not in ("precision",)},
        }

    def prepare_eval(self) -> None:
        self.stage = JOINT
        self.learner.eval()
        with torch.no_grad():
            self.classifier = self.class_features()

    @torch.no_grad()
    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.image_features(images), self.classifier)
