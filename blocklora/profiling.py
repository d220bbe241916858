"""Efficiency of a method: parameters, training FLOPs, step time, peak memory, inference latency.

A method is profiled on a synthetic task (classes "class 0", "class 1", …, random images), so no
dataset is needed. The training step is :class:`blocklora.train.TrainStep`, the step the training
loop runs, on one fixed batch: autocast per the method's precision, ``train_logits``,
cross-entropy, backward, optimizer step (data augmentation and the learning-rate schedule are left
out). Inference is
``eval_logits`` after ``prepare_eval`` (merged adapters) against the frozen backbone (image
encoder + the same-shaped text classifier), timed interleaved on one batch.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (one multiply-add = 2 FLOPs)
with the ``nn.MultiheadAttention`` fast path off and the math SDPA backend, without which the
attention matmuls are not counted (docs/protocol.md §10). Methods without a step of the generic loop
(no ``train_logits``: ``zeroshot``, ``clip_adapter``, which trains on cached features) get ``None``
for FLOPs, step time and training peak memory.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from blocklora.clip import encode_text, load_backbone
from blocklora.experiment import build_run
from blocklora.io import write_json
from blocklora.methods import FewShotTask, Method, configured_method
from blocklora.records import device_name, now, package_versions
from blocklora.runtime import seed_everything
from blocklora.train import TrainStep

log = logging.getLogger("blocklora")

DEFAULT_TEMPLATE = "a photo of a {}."


# ------------------------------------------------------------------ measuring tools


@contextlib.contextmanager
def counted_attention() -> Iterator[None]:
    """MHA fast path off and the math SDPA backend, so that FlopCounterMode sees the attention."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything ``fn`` runs (forward and, if it calls it, backward), attention included."""
    with counted_attention(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, *, warmup: int, steps: int) -> list[float]:
    """Milliseconds of each of ``steps`` calls after ``warmup`` untimed ones (CUDA events on GPU)."""
    return time_interleaved({"fn": fn}, device, warmup=warmup, steps=steps)["fn"]


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], device: torch.device, *, warmup: int, steps: int
) -> dict[str, list[float]]:
    """Milliseconds per call of several callables timed in alternating order, after a warm-up.

    Alternating spreads drifts (clocks, heat, caches) evenly over them. On CUDA each call sits
    between two events on the current stream and everything is read after one synchronization;
    on the CPU each call is timed with ``perf_counter``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    results: dict[str, list[float]] = {name: [] for name in names}
    events: list[tuple[str, Any, Any]] = []
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            if device.type == "cuda":
                with torch.cuda.device(device):
                    begin = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    begin.record()
                    fns[name]()
                    end.record()
                events.append((name, begin, end))
            else:
                started = time.perf_counter()
                fns[name]()
                results[name].append((time.perf_counter() - started) * 1e3)
    synchronize(device)
    for name, begin, end in events:
        results[name].append(begin.elapsed_time(end))
    return results


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------ the method's training step


def has_generic_step(method: Method | type[Method]) -> bool:
    """True when the method has a training step for the generic loop (:meth:`Method.trains_with_loop`)."""
    cls = method if isinstance(method, type) else type(method)
    return cls.trains_with_loop()


# ------------------------------------------------------------------ profiling one method


PROFILE_SHOTS = 16


def synthetic_task(
    num_classes: int, template: str = DEFAULT_TEMPLATE, classnames: Sequence[str] | None = None
) -> FewShotTask:
    """A task with ``num_classes`` classes named "class 0", "class 1", … and no images.

    Its training split lists 16 placeholder entries per class (never read), so methods whose
    inference cost grows with the few-shot set (Tip-Adapter's cache) are profiled at 16 shots.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    names = list(classnames) if classnames is not None else [f"class {i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for {num_classes} classes")
    return FewShotTask(
        dataset="profile",
        classnames=names,
        template=template,
        train=[(f"class{c}/{i}.png", c, names[c]) for c in range(num_classes) for i in range(PROFILE_SHOTS)],
        val=[],
        test=[],
        image_root=Path("."),
        shots=PROFILE_SHOTS,
        seed=0,
    )


def profile_method(
    method_name: str,
    backbone_name: str,
    pretrained: str | None,
    *,
    num_classes: int,
    hparams: Mapping[str, Any] | None = None,
    batch_size: int | None = 32,
    device: str | torch.device = "auto",
    warmup: int = 5,
    steps: int = 20,
    module: str | None = None,
    seed: int = 0,
    classnames: Sequence[str] | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Parameters, training FLOPs/step, step time, peak memory and merged-vs-frozen inference latency.

    ``batch_size=None`` takes the method's ``batch_size`` hyper-parameter. With ``out`` the result
    is also written there atomically as JSON.
    """
    method_cls, hp = configured_method(method_name, module, dict(hparams or {}))
    task = synthetic_task(num_classes, DEFAULT_TEMPLATE, classnames)
    method, run, (trainable, total) = build_run(
        method_cls,
        hp,
        task,
        backbone=backbone_name,
        pretrained=pretrained,
        device=device,
        seed=seed,
        progress=False,
    )
    dev, backbone = run.device, method.backbone
    batch = int(batch_size or hp.get("batch_size", 32))
    template = method.prompt_template()
    # The frozen backbone the merged model is compared with: the same weights (same seed), kept on
    # the CPU until the inference comparison, so that it does not count in the training peak.
    seed_everything(seed)
    frozen = load_backbone(backbone_name, pretrained, device="cpu").model

    generator = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    images = torch.randn(batch, 3, size, size, generator=generator).to(dev)
    labels = torch.randint(num_classes, (batch,), generator=generator).to(dev)
    precision = run.precision(hp)

    flops = step_ms = peak = None
    samples: list[float] = []
    generic = has_generic_step(method)
    if generic:
        step = TrainStep(method, precision, dev)
        trained = method.modules_to_train()
        trained.train()
        flops = count_flops(partial(step.forward_backward, images, labels))
        reset_peak_memory(dev)
        samples = time_calls(partial(step, images, labels), dev, warmup=warmup, steps=steps)
        step_ms = statistics.median(samples)
        peak = peak_memory_mib(dev)
        step.close()
        trained.eval()
        del step

    backbone.model.eval()
    with torch.no_grad():
        method.prepare_eval()
    frozen.to(dev).eval()
    tokens = backbone.tokenize(task.prompts(template))
    with torch.no_grad():
        frozen_text = encode_text(frozen, tokens)
    scale = float(hp.get("logit_scale", 100.0))

    @torch.no_grad()
    def merged_logits() -> torch.Tensor:
        with precision.autocast(dev):
            return method.eval_logits(images)

    @torch.no_grad()
    def frozen_logits() -> torch.Tensor:
        with precision.autocast(dev):
            features = frozen.encode_image(images, normalize=True)
            return scale * features @ frozen_text.to(features.dtype).T

    inference_flops = count_flops(merged_logits)
    latency = time_interleaved(
        {"merged": merged_logits, "frozen": frozen_logits}, dev, warmup=warmup, steps=steps
    )
    merged_ms, frozen_ms = statistics.median(latency["merged"]), statistics.median(latency["frozen"])

    result = {
        "method": method_name,
        "backbone": backbone_name,
        "pretrained": backbone.pretrained,
        "num_classes": num_classes,
        "batch_size": batch,
        "device": device_name(dev),
        "precision": precision.name,
        "train_step": "generic-loop" if generic else None,
        "trainable_params": trainable,
        "total_params": total,
        "train_flops_per_step": flops,
        "step_ms": step_ms,
        "step_ms_samples": samples,
        "peak_memory_mib": peak,
        "latency_ms_merged": merged_ms,
        "latency_ms_frozen": frozen_ms,
        "latency_ratio": merged_ms / frozen_ms,
        "throughput_merged": batch / (merged_ms / 1e3),
        "throughput_frozen": batch / (frozen_ms / 1e3),
        "inference_flops_per_image": inference_flops / batch,
        "text_tokens": int(getattr(method, "tokens", tokens).shape[1]),
        "warmup": warmup,
        "steps": steps,
        "hparams": hp,
        "versions": package_versions(),
        "created": now(),
    }
    if out is not None:
        write_json(out, result)
    log.info(
        "%s on %s, %d classes, batch %d: %s trainable, step %s ms, latency ratio %.3f",
        method_name,
        backbone_name,
        num_classes,
        batch,
        f"{trainable:,}",
        "n/a" if step_ms is None else f"{step_ms:.1f}",
        result["latency_ratio"],
    )
    return result
