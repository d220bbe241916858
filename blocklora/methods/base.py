"""What a method is: which parameters train, and how logits are made from images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blocklora.clip import Backbone
from blocklora.io import read_tensors, write_tensors
from blocklora.train import Schedule, train_loop

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
TRAIN_TYPES: dict[str, str] = {"iterations": "int|null", "max_iterations": "int|null", "compile": "bool|str"}
# Dassl's trainer (CoOp and the methods built on it): the hyper-parameters of its epochs and its
# optimizer, as its defaults and CoOp's ViT-B/16 configs set them (docs/protocol.md §6).
DASSL_DEFAULTS: dict[str, Any] = {
    **{
        k: v
        for k, v in TRAIN_DEFAULTS.items()
        if k not in ("iterations_per_shot", "iterations", "warmup_iterations")
    },
    "optimizer": "sgd",
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "eta_min": 0.0,
    "batch_size": 32,
    "epochs": 200,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "crop_scale": [0.08, 1.0],
    "max_iterations": None,  # stop after this many steps (a trial run, e.g. the rehearsal); null: all
}


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
    # Values that depend on the dataset or the shot count, as rules (blocklora.hparams): applied
    # over the defaults, under what the config overrides.
    when: ClassVar[list[dict[str, Any]]] = []

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

    def schedule(self) -> Schedule:
        """The steps of the generic loop: CLIP-LoRA's ``iterations`` (or ``iterations_per_shot`` × shots)."""
        if self.hp.get("iterations") is not None:
            total = int(self.hp["iterations"])
        else:
            total = int(self.hp.get("iterations_per_shot", 0)) * self.task.shots
        return Schedule.iterations(total, self.hp)

    @classmethod
    def trains_with_loop(cls) -> bool:
        """True when the method has a step of the generic loop: it implements :meth:`train_logits`
        (or :meth:`train_losses`). Methods that train otherwise (on cached features, or not at all)
        leave both alone; a method may wrap the loop in its own ``fit`` and still counts."""
        return cls.train_logits is not Method.train_logits or cls.train_losses is not Method.train_losses

    def iterations(self) -> int:
        """Optimizer steps of the generic loop (0 for a method that trains otherwise)."""
        return self.schedule().total if self.trains_with_loop() else 0

    def text_passes(self) -> tuple[int, int]:
        """Prompts this run puts through the text encoder (training, testing), for the plan's cost
        estimate: by default every class prompt at every step of the generic loop, and once for the
        test. Computed from the hyper-parameters and the task alone (no backbone needed)."""
        classes = self.task.num_classes
        return self.iterations() * classes, classes

    def image_passes(self) -> tuple[int, int]:
        """Images this run puts through the image encoder (training, testing), for the plan's cost
        estimate: a batch at every step of the generic loop, and the test split once."""
        steps = self.iterations()
        batch = min(int(self.hp.get("batch_size", 0)), len(self.task.train))
        return steps * batch, len(self.task.test)

    def train_logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"method {self.name!r} does not train with the generic loop")

    def train_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of one step; ``"loss"`` is what the loop minimizes and logs (by default the
        cross-entropy of :meth:`train_logits`)."""
        return {"loss": F.cross_entropy(self.train_logits(images).float(), labels)}

    def backward(
        self, losses: dict[str, torch.Tensor], scaler: torch.amp.GradScaler, params: list[nn.Parameter]
    ) -> None:
        """Put the gradients of one step into ``params``' ``.grad`` (scaled by ``scaler``): by default
        the gradient of ``losses["loss"]``. A method that combines gradients (ProGrad) overrides it."""
        scaler.scale(losses["loss"]).backward()

    def fit(self, run) -> dict[str, Any]:
        """Train; returns statistics for the record (the generic loop by default)."""
        return train_loop(self, run)

    def epoch_end(self, epoch: int, epochs: int) -> None:
        """Called by the generic loop after epoch ``epoch`` (0-based) of ``epochs`` of a Dassl schedule."""

    def loop_state(self) -> dict[str, torch.Tensor]:
        """What the method keeps across training steps (besides the trained tensors), for checkpoints."""
        return {}

    def load_loop_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back :meth:`loop_state` from a checkpoint."""

    def eval_classes(self, subset: list[int] | None) -> None:
        """Called before :meth:`prepare_eval` when only ``subset``'s classes compete for each prediction
        (ImageNet-A and -R): a method whose test-time cost grows with the classes may skip the others,
        its logits for them then mattering to nobody."""

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


class DasslTrained:
    """Mixin of a method trained as Dassl's ``TrainerX`` trains it: ``epochs`` epochs over the few-shot
    set (its last partial batch dropped once a full batch exists), a constant warm-up, then a cosine
    set once per epoch (:meth:`blocklora.train.Schedule.dassl`). Its hyper-parameters start from
    :data:`DASSL_DEFAULTS`.
    """

    hp: dict[str, Any]
    task: FewShotTask

    def schedule(self) -> Schedule:
        return Schedule.dassl(int(self.hp["epochs"]), len(self.task.train), self.hp)

    def iterations(self) -> int:
        return self.schedule().total
