"""What a method is: which parameters train, and how logits are made from images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from blocklora.clip import Backbone
from blocklora.io import read_tensors, write_tensors
from blocklora.train import train_loop

Entry = tuple[str, int, str]  # [relative image path, label, class name], as in CoOp split files

TRAIN_DEFAULTS: dict[str, Any] = {
    "iterations_per_shot": 500,
    "iterations": None,
    "batch_size": 32,
    "optimizer": "adamw",
    "lr": 2e-4,
    "weight_decay": 1e-2,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "momentum": 0.9,
    "eta_min": 1e-6,
    "warmup_iterations": 0,
    "warmup_lr": 1e-5,
    "precision": "auto",
    "logit_scale": 100.0,
    "crop_scale": [0.08, 1.0],
    "eval_batch_size": 128,
    "log_every": 50,
    "checkpoint_every": 500,
    "compile": False,
    "compile_backend": "inductor",
}
EVAL_DEFAULTS: dict[str, Any] = {
    "precision": "auto",
    "logit_scale": 100.0,
    "eval_batch_size": 128,
}
# Types the defaults above do not show (see blocklora.hparams).
TRAIN_TYPES: dict[str, str] = {"iterations": "int|null", "compile": "bool|str"}


@dataclass
class FewShotTask:
    """One (dataset, shots, seed): the class names, the prompt template and the three splits."""

    dataset: str
    classnames: list[str]
    template: str
    train: list[Entry]
    val: list[Entry]
    test: list[Entry]
    image_root: Path
    shots: int
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, template: str | None = None) -> list[str]:
        """One prompt per class; ``_`` in class names becomes a space."""
        template = template or self.template
        return [template.format(name.replace("_", " ")) for name in self.classnames]


class Method:
    """Base class of every method; a subclass registers with :func:`register_method`.

    The generic loop (:func:`blocklora.train.fit`) calls :meth:`train_logits` on augmented
    batches and optimizes :meth:`trainable_parameters`; methods that train otherwise (on cached
    features, or not at all) override :meth:`fit`. Evaluation calls :meth:`prepare_eval` once,
    then :meth:`eval_logits` on test batches.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    base_defaults: ClassVar[dict[str, Any]] = TRAIN_DEFAULTS
    # Types of hyper-parameters whose default does not show it (None, a flag that also takes a mode).
    hparam_types: ClassVar[dict[str, str]] = TRAIN_TYPES
    # True when nothing learned is tied to the training classes (adapters, prompt context), so
    # the method can be tested on a dataset with other classes (cross-dataset transfer).
    class_agnostic: ClassVar[bool] = False
    # False for a method that learns nothing from the few-shot set (zero-shot CLIP): its result
    # depends on neither shots nor seed, so it runs once per dataset.
    needs_fewshot: ClassVar[bool] = True

    def __init__(self, backbone: Backbone, task: FewShotTask, hparams: dict[str, Any]) -> None:
        self.backbone = backbone
        self.task = task
        self.hp = hparams

    @classmethod
    def all_defaults(cls) -> dict[str, Any]:
        return {**cls.base_defaults, **cls.defaults}

    @classmethod
    def all_types(cls) -> dict[str, str]:
        """The declared type of each hyper-parameter that needs one, subclasses' over their bases'."""
        types: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            types.update(getattr(klass, "hparam_types", None) or {})
        return {k: v for k, v in types.items() if k in cls.all_defaults()}

    @property
    def model(self) -> nn.Module:
        return self.backbone.model

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def setup(self) -> None:
        """Build the trainable parts (adapters, prompts, heads)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.modules_to_train().parameters() if p.requires_grad]

    def modules_to_train(self) -> nn.Module:
        """The module(s) whose parameters train; put in train mode by the loop."""
        return self.model

    def extra_modules(self) -> list[nn.Module]:
        """Modules outside the backbone that hold parameters (prompt learners, heads)."""
        return []

    def iterations(self) -> int:
        if self.hp.get("iterations") is not None:
            return int(self.hp["iterations"])
        return int(self.hp.get("iterations_per_shot", 0)) * self.task.shots

    def train_logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"method {self.name!r} does not train with the generic loop")

    def fit(self, run) -> dict[str, Any]:
        """Train; returns statistics for the record (the generic loop by default)."""
        return train_loop(self, run)

    def prepare_eval(self) -> None:
        """Get ready for inference (merge adapters, compute text features once)."""

    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The learned tensors that :meth:`save` writes (empty for training-free methods)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into :meth:`state`: the same names, each of the exact shape and dtype
        (ValueError naming the first that differs; nothing is broadcast or cast)."""
        state = self.state()
        missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
        if missing or unexpected:
            raise ValueError(
                f"it does not hold {self.name}'s tensors: missing {missing}, unexpected {unexpected}"
            )
        for key, value in state.items():
            if tensors[key].shape != value.shape or tensors[key].dtype != value.dtype:
                raise ValueError(
                    f"{key} has shape {tuple(tensors[key].shape)} and dtype {tensors[key].dtype}, "
                    f"the method's has {tuple(value.shape)} and {value.dtype}"
                )
        with torch.no_grad():
            for key, value in state.items():
                value.copy_(tensors[key])

    def save(self, path: str | Path, **metadata: Any) -> None:
        write_tensors(path, self.state(), {"method": self.name, "hparams": self.hp, **metadata})

    def load(self, path: str | Path) -> dict[str, Any]:
        tensors, meta = read_tensors(path)
        if "method" not in meta:
            raise ValueError(
                f"{path} does not say which method wrote it (no 'method' in its metadata): it is not a "
                "state file of this pipeline; retrain it"
            )
        if meta["method"] != self.name:
            raise ValueError(f"{path} holds a {meta.get('method')!r} state, not {self.name!r}")
        try:
            self.load_state(tensors)
        except ValueError as exc:
            raise ValueError(f"{path} cannot be loaded into {self.name}: {exc}") from None
        return meta

    def prompt_template(self) -> str:
        """The template this method prompts with: its ``template`` hyper-parameter, else the dataset's."""
        return self.hp.get("template") or self.task.template

    @torch.no_grad()
    def text_features(self, template: str | None = None) -> torch.Tensor:
        """Normalized text features of every class prompt (``template``: default :meth:`prompt_template`)."""
        return self.backbone.encode_text(self.task.prompts(template or self.prompt_template()))
