"""One generic training loop: a schedule of steps, AdamW, Adam or SGD, cosine, AMP, NaN guard.

Two schedules (:class:`Schedule`): CLIP-LoRA's iterations (docs/protocol.md §2), and Dassl's epochs,
which CoOp and the methods built on its trainer follow (docs/protocol.md §6).
"""

from __future__ import annotations

import logging
import math
import pickle
import random
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from blocklora.data.loading import DeviceAugment, decode_uint8
from blocklora.io import atomic_path
from blocklora.runtime import Precision, RunContext

log = logging.getLogger("blocklora")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(setting: Any, backend: str = "inductor") -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for the ``compile`` / ``compile_backend`` hyper-parameters.

    ``compile``: false (eager, the default), true (= ``"default"``), or an inductor mode:
    ``"reduce-overhead"`` replays the compiled step as CUDA graphs, ``"max-autotune"`` also
    searches kernel configurations. ``compile_backend`` is any ``torch.compile`` backend
    (``"cudagraphs"`` records CUDA graphs without inductor; ``"aot_eager"`` traces without code
    generation). None means: run eagerly.
    """
    if setting in (False, None, "off", "false"):
        return None
    mode = "default" if setting in (True, "on", "true") else setting
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"unknown compile setting {setting!r}: use false, true or one of {', '.join(COMPILE_MODES)}"
        )
    backends = torch.compiler.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(f"unknown compile_backend {backend!r}: use one of {', '.join(sorted(backends))}")
    if backend != "inductor":
        if mode != "default":
            raise ValueError(
                f"compile mode {mode!r} is an inductor mode; with compile_backend {backend!r} use true"
            )
        return {"backend": backend, "dynamic": False}
    return {"backend": backend, "mode": mode, "dynamic": False}


def loss_function(
    method, precision: Precision, device: torch.device, *, compiled: bool = True
) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """``(images, labels) -> loss terms``: ``method.train_losses`` under autocast.

    Compiled as the method's ``compile`` hyper-parameters say (shapes static: a run sees at most
    two batch sizes, the full one and the last of an epoch); ``compiled=False`` forces eager, as
    FLOP counting needs.
    """

    def loss(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with precision.autocast(device):
            return method.train_losses(images, labels)

    options = compile_options(method.hp["compile"], method.hp["compile_backend"])
    if not compiled or options is None:
        return loss
    traced = torch.compile(loss, **options)

    def compiled_loss(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # Under CUDA graphs an output lives in memory the next replay overwrites: each call is a
        # new step, and the losses are cloned because the loop keeps them past the next step.
        torch.compiler.cudagraph_mark_step_begin()
        return {name: value.clone() for name, value in traced(images, labels).items()}

    return compiled_loss


def cosine_lr(step: int, *, total: int, base: float, eta_min: float, warmup: int, warmup_lr: float) -> float:
    """CosineAnnealingLR's closed form over ``total - warmup`` steps after a constant warm-up."""
    if step < warmup:
        return warmup_lr
    span = max(1, total - warmup)
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * min(step - warmup, span) / span)) / 2


@dataclass(frozen=True)
class Schedule:
    """The optimizer steps of a run: how many, how the batches are drawn, and each step's learning rate.

    ``steps_per_epoch=None``: CLIP-LoRA's iterations. ``total`` steps of endless shuffled batches
    (each pass over the set a new permutation, its last batch kept whole), the learning rate
    constant at ``warmup_lr`` for ``warmup`` steps, then cosine from ``base`` to ``eta_min``
    stepped every iteration (:func:`cosine_lr`).

    Otherwise Dassl's epochs (:meth:`dassl`): each epoch a new permutation cut into
    ``steps_per_epoch`` batches (its last partial batch dropped once the set holds a full batch),
    the learning rate constant at ``warmup_lr`` for the first ``warmup`` epochs, then set once per
    epoch by ``CosineAnnealingLR(T_max=epochs)`` started after the warm-up, so that it never
    reaches ``eta_min``.
    """

    total: int
    batch_size: int
    base: float
    eta_min: float
    warmup: int
    warmup_lr: float
    steps_per_epoch: int | None = None
    drop_last: bool = False

    @classmethod
    def iterations(cls, total: int, hp: Mapping[str, Any]) -> Schedule:
        """CLIP-LoRA's schedule of ``total`` steps (``warmup_iterations`` of them at ``warmup_lr``)."""
        return cls(
            total=int(total),
            batch_size=int(hp["batch_size"]),
            base=float(hp["lr"]),
            eta_min=float(hp["eta_min"]),
            warmup=int(hp.get("warmup_iterations") or 0),
            warmup_lr=float(hp.get("warmup_lr", 0.0)),
        )

    @classmethod
    def dassl(cls, epochs: int, images: int, hp: Mapping[str, Any]) -> Schedule:
        """Dassl's schedule of ``epochs`` epochs over ``images`` training images (``warmup_epochs`` at
        ``warmup_lr``), as its data manager and ``build_lr_scheduler`` make it; with ``max_iterations``
        set, only its first steps (a trial run: each at the rate the full schedule gives it)."""
        batch = int(hp["batch_size"])
        if images < 1:
            raise ValueError("the few-shot training set is empty")
        drop_last = images >= batch
        steps = images // batch if drop_last else 1
        total = int(epochs) * steps
        if hp.get("max_iterations") is not None:
            total = min(total, int(hp["max_iterations"]))
        return cls(
            total=total,
            batch_size=batch,
            base=float(hp["lr"]),
            eta_min=float(hp["eta_min"]),
            warmup=int(hp["warmup_epochs"]),
            warmup_lr=float(hp["warmup_lr"]),
            steps_per_epoch=steps,
            drop_last=drop_last,
            epochs_planned=int(epochs),
        )

    epochs_planned: int | None = None  # Dassl: the epochs the learning rate is scheduled over

    @property
    def epochs(self) -> int | None:
        return self.epochs_planned

    @property
    def warmup_steps(self) -> int:
        """Optimizer steps taken at ``warmup_lr``."""
        return self.warmup if self.steps_per_epoch is None else self.warmup * self.steps_per_epoch

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        if self.steps_per_epoch is None:
            return cosine_lr(
                step, total=self.total, base=self.base, eta_min=self.eta_min, warmup=self.warmup,
                warmup_lr=self.warmup_lr,
            )  # fmt: skip
        epoch = step // self.steps_per_epoch
        if epoch < self.warmup:
            return self.warmup_lr
        cosine = (1 + math.cos(math.pi * (epoch - self.warmup) / self.epochs)) / 2
        return self.eta_min + (self.base - self.eta_min) * cosine

    def describe(self) -> dict[str, Any]:
        """What the record keeps of it."""
        if self.steps_per_epoch is None:
            return {"schedule": "iterations", "warmup_iterations": self.warmup}
        return {
            "schedule": "dassl",
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "drop_last": self.drop_last,
            "warmup_iterations": self.warmup_steps,
        }


def make_optimizer(params: list[torch.nn.Parameter], hp: dict[str, Any]) -> torch.optim.Optimizer:
    """``adamw`` (decoupled weight decay), ``adam`` (Dassl's: weight decay as an L2 term) or ``sgd``."""
    if hp["optimizer"] == "adamw":
        return torch.optim.AdamW(
            params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"]
        )
    if hp["optimizer"] == "adam":
        return torch.optim.Adam(
            params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"]
        )
    if hp["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    raise ValueError(f"unknown optimizer {hp['optimizer']!r}: use adamw, adam or sgd")


class BatchSampler:
    """Shuffled batches of indices, a new permutation each pass over the set.

    The last batch of a pass is kept whole, or, with ``drop_last``, the images that do not fill
    one are left out of that pass (Dassl's loader).
    """

    def __init__(
        self, n: int, batch_size: int, generator: torch.Generator, *, drop_last: bool = False
    ) -> None:
        if n == 0:
            raise ValueError("the few-shot training set is empty")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.drop_last = drop_last and n >= batch_size
        self.order: list[int] = []

    def next(self) -> list[int]:
        if not self.order:
            self.order = torch.randperm(self.n, generator=self.generator).tolist()
            if self.drop_last:
                self.order = self.order[: self.n // self.batch_size * self.batch_size]
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return batch


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every generator's state as tensors and plain data (what a checkpoint may hold)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.get_state(),
    }


def _restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["name"],
            saved["keys"].numpy().astype(np.uint32),
            saved["pos"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any, where: str = "checkpoint") -> None:
    """Refuse anything but tensors and plain data (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, _PLAIN):
                raise TypeError(
                    f"{where} has a key of type {type(key).__name__}: only plain data may be saved"
                )
            _plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint holds only tensors and plain data")


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write a resumable training state atomically: tensors and plain data only (TypeError otherwise),
    so that it loads back with ``weights_only=True``."""
    _plain(state)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this very run, else None (and it is ignored).

    Read with ``weights_only=True``: a results folder is shared, and a file planted there must not
    run code as whoever resumes. Anything beyond tensors and plain data is refused.
    """
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # a foreign file's pickle protocol: refused below if it matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            log.warning(
                "ignoring checkpoint %s: it holds %s, not only tensors and plain data, so this pipeline did not "
                "write it (it is not loaded: it could run code); training from the start",
                path,
                found[1],
            )
        else:
            log.warning("ignoring unreadable checkpoint %s (not a checkpoint); training from the start", path)
        return None
    except Exception as exc:  # a checkpoint we cannot read is no reason to fail: start over
        log.warning("ignoring unreadable checkpoint %s (%s); training from the start", path, exc)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s: it belongs to another configuration", path)
        return None
    return state


def _fits(state: dict[str, Any], params: list[torch.nn.Parameter], samples: int) -> str | None:
    """Why a checkpoint of this run cannot be resumed from (shapes, dtypes, indices), or None."""
    saved = state.get("params")
    if not isinstance(saved, list) or len(saved) != len(params):
        return (
            f"it holds {len(saved) if isinstance(saved, list) else 'no'} parameter tensors, not {len(params)}"
        )
    for i, (p, tensor) in enumerate(zip(params, saved, strict=True)):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != p.shape or tensor.dtype != p.dtype:
            got = (
                (tuple(tensor.shape), tensor.dtype)
                if isinstance(tensor, torch.Tensor)
                else type(tensor).__name__
            )
            return f"parameter {i} is {got}, the model's is {(tuple(p.shape), p.dtype)}"
    for i, entry in enumerate(state.get("optimizer", {}).get("state", {}).values()):
        for name, value in entry.items():
            if (
                isinstance(value, torch.Tensor)
                and value.ndim
                and i < len(params)
                and value.shape != params[i].shape
            ):
                return f"optimizer state {name!r} of parameter {i} has shape {tuple(value.shape)}"
    order = state.get("sampler_order")
    if not isinstance(order, list) or not all(isinstance(j, int) and 0 <= j < samples for j in order):
        return "its sampler order names images the training set does not have"
    return None


class TrainStep:
    """One iteration of the generic loop: the method's losses under autocast, its backward (scaled),
    an optimizer step. The loop trains with it and the profiler times it, so both run the same step.

    The losses are compiled as the method's ``compile`` hyper-parameters say (a bad setting stops
    here, before any image is decoded); :meth:`forward_backward` runs them eagerly, for FLOP counting.
    """

    def __init__(self, method, precision: Precision, device: torch.device) -> None:
        self.method = method
        self.params = method.trainable_parameters()
        if not self.params:
            raise RuntimeError(f"method {method.name!r} has no trainable parameters")
        self.optimizer = make_optimizer(self.params, method.hp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
        self.loss = loss_function(method, precision, device)
        self.eager_loss = loss_function(method, precision, device, compiled=False)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimization step; returns the (detached) loss the loop logs."""
        losses = self.loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.method.backward(losses, self.scaler, self.params)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return losses["loss"].detach()

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Forward and backward only, eagerly (what FLOPs are counted on); gradients are dropped."""
        self.optimizer.zero_grad(set_to_none=True)
        self.method.backward(self.eager_loss(images, labels), self.scaler, self.params)
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Free the gradients and the optimizer state."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()


def stage_checkpoint(path: Path | None, stage: str | None) -> Path | None:
    """Where one stage of a run that trains in stages keeps its state: ``record.checkpoint.<stage>.pt``."""
    if path is None or stage is None:
        return path
    return path.with_suffix(f".{stage}{path.suffix}")


def train_loop(method, run: RunContext, *, stage: str | None = None) -> dict[str, Any]:
    """Optimize ``method.trainable_parameters()`` on ``method.train_losses`` along ``method.schedule()``.

    With ``run.checkpoint`` set and ``checkpoint_every > 0``, the trainable tensors, optimizer,
    scaler, sampler and RNG states are saved every ``checkpoint_every`` iterations, and a rerun
    resumes from there: on CPU it ends with exactly the metrics of an uninterrupted run. A method
    that trains in several calls of the loop names each ``stage``: each keeps its own checkpoint.

    After each epoch of a Dassl schedule the loop calls ``method.epoch_end(epoch, epochs)``; what the
    method keeps across steps (``method.loop_state()``) is checkpointed with the rest.
    """
    hp, task, device = method.hp, method.task, run.device
    schedule = method.schedule()
    iterations = schedule.total
    started = time.perf_counter()
    precision = run.precision(hp)
    step = TrainStep(method, precision, device)
    generator = torch.Generator().manual_seed(run.seed)
    images = decode_uint8(task.train, task.image_root, threads=run.threads)
    augment = DeviceAugment(
        images,
        method.backbone.image_size,
        method.backbone.mean,
        method.backbone.std,
        device=device,
        scale=hp["crop_scale"],
        generator=generator,
    )
    labels = torch.tensor([int(e[1]) for e in task.train], device=device)
    sampler = BatchSampler(len(images), schedule.batch_size, generator, drop_last=schedule.drop_last)
    losses: list[torch.Tensor] = []
    start_step = 0
    every = int(hp.get("checkpoint_every") or 0)
    fingerprint = {
        "method": method.name,
        "hparams": hp,
        "seed": run.seed,
        "train": [e[0] for e in task.train],
        "stage": stage,
    }
    checkpoint = stage_checkpoint(run.checkpoint, stage)
    resumed = load_checkpoint(checkpoint, fingerprint) if checkpoint and every > 0 else None
    problem = _fits(resumed, step.params, len(images)) if resumed is not None else None
    if problem:
        log.warning("ignoring checkpoint %s: %s; training from the start", checkpoint, problem)
        resumed = None
    if resumed is not None:
        with torch.no_grad():
            for p, saved in zip(step.params, resumed["params"], strict=True):
                p.copy_(saved)
        step.optimizer.load_state_dict(resumed["optimizer"])
        step.scaler.load_state_dict(resumed["scaler"])
        sampler.order = list(resumed["sampler_order"])
        losses = [t.to(device) for t in resumed["losses"]]
        start_step = int(resumed["step"])
        _restore_rng(resumed["rng"], generator)
        method.load_loop_state(resumed.get("method_state") or {})
        log.info(
            "resuming %s on %s from iteration %d (%s)", method.name, task.dataset, start_step, checkpoint
        )
    module = method.modules_to_train()
    module.train()
    first_bad = torch.tensor(-1, device=device)
    bar = tqdm(
        total=iterations,
        initial=start_step,
        desc=f"{method.name} {task.dataset} {task.shots}-shot",
        disable=not run.progress,
    )
    log_every = max(1, int(hp["log_every"]))  # 0 logs every iteration
    for iteration in range(start_step, iterations):
        step.set_lr(schedule.lr(iteration))
        index = sampler.next()
        loss = step(augment(index), labels[index])
        first_bad = torch.where(
            (first_bad < 0) & ~torch.isfinite(loss), torch.tensor(iteration, device=device), first_bad
        )
        losses.append(loss)
        done = iteration + 1
        if done % log_every == 0 or done == iterations:
            _stop_if_not_finite(first_bad, method, losses)
            recent = torch.stack(losses[-log_every:]).mean().item()
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{step.lr:.2e}")
            if not run.progress:
                log.info("iteration %d/%d loss %.4f", done, iterations, recent)
        if schedule.steps_per_epoch and done % schedule.steps_per_epoch == 0:
            method.epoch_end(done // schedule.steps_per_epoch - 1, schedule.epochs)
        if checkpoint and every > 0 and (done % every == 0 or done == iterations):
            _stop_if_not_finite(first_bad, method, losses)
            save_checkpoint(
                checkpoint,
                fingerprint=fingerprint,
                step=done,
                params=[p.detach().cpu() for p in step.params],
                optimizer=step.optimizer.state_dict(),
                scaler=step.scaler.state_dict(),
                sampler_order=list(sampler.order),
                losses=[t.cpu() for t in losses],
                rng=_rng_state(generator),
                method_state={k: v.detach().cpu() for k, v in method.loop_state().items()},
            )
        bar.update(1)
    bar.close()
    module.eval()
    curve = torch.stack(losses).float().cpu() if losses else torch.zeros(0)
    window = max(1, min(log_every, len(curve)))
    return {
        "iterations": iterations,
        "resumed_from": start_step,
        "train_seconds": time.perf_counter() - started,
        "loss_first": float(curve[:window].mean()) if len(curve) else None,
        "loss_last": float(curve[-window:].mean()) if len(curve) else None,
        "precision": precision.name,
        **schedule.describe(),
    }


def _stop_if_not_finite(first_bad: torch.Tensor, method, losses: list[torch.Tensor]) -> None:
    step = int(first_bad.item())
    if step >= 0:
        raise FloatingPointError(
            f"{method.name} on {method.task.dataset} ({method.task.shots} shots, seed {method.task.seed}): "
            f"loss became {losses[step].item()} at iteration {step + 1}; lower lr or use precision fp32"
        )
