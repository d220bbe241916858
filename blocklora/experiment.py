"""One run: (method, dataset, shots, seed) from a few-shot file to a record and a state file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from blocklora.clip import load_backbone
from blocklora.data.splits import read_split
from blocklora.evaluate import evaluate
from blocklora.inject import count_parameters
from blocklora.io import write_json
from blocklora.methods import FewShotTask, Method, configured_method
from blocklora.records import (
    PROTOCOL_VERSION,
    config_hash,
    device_name,
    file_sha256,
    git_commit,
    now,
    package_versions,
)
from blocklora.runtime import RunContext, resolve_device, seed_everything

log = logging.getLogger("blocklora")


def class_names(splits: dict[str, list], source: str | Path) -> list[str]:
    """Class names indexed by label, from every entry (a validated split); labels must be 0..C-1."""
    names = {int(e[1]): str(e[2]) for entries in splits.values() for e in entries}
    missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
    if missing or not names:
        raise ValueError(f"{source}: labels must be 0..C-1 with a name each; missing {missing[:10]}")
    return [names[i] for i in range(len(names))]


def checkpoint_path(record: str | Path) -> Path:
    """Where a run keeps its resumable training state: beside its record, until the record exists."""
    record = Path(record)
    return record.with_name(f"{record.stem}.checkpoint.pt")


def dataset_template(dataset: str) -> str:
    from blocklora.data.registry import get_dataset

    return get_dataset(dataset).template


def build_run(
    method_cls: type[Method],
    hparams: dict[str, Any],
    task: FewShotTask,
    *,
    backbone: str,
    pretrained: str | None,
    device: str | torch.device = "auto",
    seed: int,
    **run_kwargs: Any,
) -> tuple[Method, RunContext, tuple[int, int]]:
    """Everything before training, the same for a run, a transfer and a profile.

    Seeds every generator, loads the backbone frozen on the run's device, builds the method with its
    resolved hyper-parameters (:func:`blocklora.methods.configured_method`) and its trainable parts
    (``setup``), and counts the parameters. Returns the method, the run context and (trainable,
    total) parameters.
    """
    run = RunContext(device=resolve_device(device), seed=seed, **run_kwargs)
    seed_everything(seed)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    loaded = load_backbone(backbone, pretrained, device=run.device)
    loaded.model.requires_grad_(False)
    instance = method_cls(loaded, task, hparams)
    instance.setup()
    return instance, run, count_parameters([loaded.model, *instance.extra_modules()])


def _check_image_root(image_root: str | Path, dataset: str) -> Path:
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"image folder {image_root} of dataset {dataset} does not exist; prepare the dataset"
        )
    return image_root


def _record(
    *,
    instance,
    run: RunContext,
    result: dict[str, Any],
    params: tuple[int, int],
    stats: dict[str, Any],
    inputs: dict[str, str],
    pretrained_arg: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """The run record (PROTOCOL_VERSION, hashes of the resolved config and of the inputs)."""
    task, backbone = instance.task, instance.backbone
    if backbone.pretrained and pretrained_arg and Path(pretrained_arg).is_file():
        inputs = {**inputs, "pretrained": file_sha256(pretrained_arg)}
    # a method that learns nothing from the few-shot set has no shots and no seed
    shots, seed = (task.shots, task.seed) if instance.needs_fewshot else (None, None)
    resolved = {
        "method": instance.name,
        "dataset": task.dataset,
        "shots": shots,
        "seed": seed,
        "backbone": backbone.name,
        "pretrained": backbone.pretrained,
        "template": instance.prompt_template(),
        "hparams": instance.hp,
        **extra,
    }
    return {
        "method": instance.name,
        "dataset": task.dataset,
        "shots": shots,
        "seed": seed,
        "backbone": backbone.name,
        "pretrained": backbone.pretrained,
        "accuracy": result["accuracy"],
        "num_classes": task.num_classes,
        "test_size": result["test_size"],
        "trainable_params": params[0],
        "total_params": params[1],
        "iterations": stats["iterations"] if "iterations" in stats else instance.iterations(),
        "train_seconds": stats.get("train_seconds", 0.0),
        "eval_seconds": result["eval_seconds"],
        "peak_memory_mib": (
            torch.cuda.max_memory_allocated(run.device) / 2**20 if run.device.type == "cuda" else None
        ),
        "device": device_name(run.device),
        "train_stats": {k: v for k, v in stats.items() if k not in ("iterations", "train_seconds")},
        "hparams": instance.hp,
        "template": instance.prompt_template(),
        **extra,
        "protocol_version": PROTOCOL_VERSION,
        "config_hash": config_hash(resolved),
        "inputs": inputs,
        "inputs_hash": config_hash(inputs),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "created": now(),
    }


def run_experiment(
    *,
    method: str,
    dataset: str,
    fewshot: str | Path,
    image_root: str | Path,
    shots: int | None,
    seed: int | None,
    backbone: str,
    pretrained: str | None,
    hparams: dict[str, Any] | None = None,
    record: str | Path,
    state: str | Path,
    device: str = "auto",
    template: str | None = None,
    module: str | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run; write the state file, then the record (both atomically).

    ``cache_dir`` holds what runs share (test images at evaluation resolution, frozen features);
    ``threads`` is how many CPU threads decoding and loading may use (default: torch's). A method
    that learns nothing from the few-shot set (zero-shot) takes no ``shots`` and no ``seed``.
    """
    if shots is not None and shots <= 0:
        raise ValueError(f"shots must be a positive integer, got {shots}")
    method_cls, hp = configured_method(method, module, hparams, dataset=dataset, shots=shots)
    if method_cls.needs_fewshot and (shots is None or seed is None):
        raise ValueError(f"method {method!r} learns from the few-shot set: give its shots and seed")
    shots, seed = (shots, seed) if method_cls.needs_fewshot else (shots or 0, seed or 0)
    splits = read_split(fewshot)
    task = FewShotTask(
        dataset=dataset,
        classnames=class_names(splits, fewshot),
        template=template or dataset_template(dataset),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        image_root=_check_image_root(image_root, dataset),
        shots=shots,
        seed=seed,
    )
    instance, run, params = build_run(
        method_cls,
        hp,
        task,
        backbone=backbone,
        pretrained=pretrained,
        device=device,
        seed=seed,
        progress=progress,
        cache_dir=Path(cache_dir) if cache_dir else None,
        checkpoint=checkpoint_path(record),
        threads=threads or torch.get_num_threads(),
    )
    cell = f"{shots} shots, seed {seed}" if method_cls.needs_fewshot else "no few-shot subset"
    log.info("%s on %s, %s: %d trainable of %d parameters", method, dataset, cell, *params)
    stats = instance.fit(run)
    instance.save(state, dataset=dataset, shots=shots, seed=seed)
    result = evaluate(instance, task.test, task.image_root, run)
    rec = _record(
        instance=instance,
        run=run,
        result=result,
        params=params,
        stats=stats,
        inputs={"fewshot": file_sha256(fewshot)},
        pretrained_arg=pretrained,
    )
    write_json(record, rec)
    if run.checkpoint is not None:  # its own, and those of the stages of a run trained in stages
        for leftover in run.checkpoint.parent.glob(f"{run.checkpoint.stem}*{run.checkpoint.suffix}"):
            leftover.unlink(missing_ok=True)
    log.info("%s on %s, %s: test accuracy %.2f %%", method, dataset, cell, 100 * rec["accuracy"])
    return rec


def transfer_task(
    *,
    source: str,
    source_fewshot: str | Path,
    target: str,
    target_split: str | Path,
    image_root: Path,
    shots: int,
    seed: int,
    template: str | None,
) -> tuple[FewShotTask, list[int] | None, bool]:
    """The task a source-trained method is tested on; (task, label subset, same label space).

    A target labelled with ImageNet indices (V2, Sketch, A, R) keeps the source's 1000 class names
    when the source is ImageNet, and ImageNet-A/-R are scored on the classes they contain. Any other
    target brings its own classes, which only class-agnostic methods can handle.
    """
    from blocklora.data.registry import get_dataset

    source_splits = read_split(source_fewshot)
    target_splits = read_split(target_split)
    same_labels = get_dataset(target).imagenet_labels and (
        source == "imagenet" or get_dataset(source).imagenet_labels
    )
    if same_labels:
        names = class_names(source_splits, source_fewshot)
        present = sorted({int(e[1]) for e in target_splits["test"]})
        subset = present if len(present) < len(names) else None
    else:
        names = class_names({"test": target_splits["test"]}, target_split)
        subset = None
    task = FewShotTask(
        dataset=target,
        classnames=names,
        template=template or dataset_template(target),
        train=[],
        val=[],
        test=target_splits["test"],
        image_root=image_root,
        shots=shots,
        seed=seed,
        extra={"source_dataset": source},
    )
    return task, subset, bool(same_labels)


def run_transfer(
    *,
    method: str,
    source: str,
    source_fewshot: str | Path,
    state: str | Path,
    target: str,
    target_split: str | Path,
    image_root: str | Path,
    shots: int | None,
    seed: int | None,
    backbone: str,
    pretrained: str | None,
    hparams: dict[str, Any] | None = None,
    record: str | Path,
    device: str = "auto",
    template: str | None = None,
    module: str | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate a method trained on ``source`` (its saved state) on ``target``'s full test split.

    Its hyper-parameters are those it trained with: resolved for ``source`` and ``shots``.
    """
    method_cls, hp = configured_method(method, module, hparams, dataset=source, shots=shots)
    if method_cls.needs_fewshot and (shots is None or seed is None):
        raise ValueError(f"method {method!r} learned from a few-shot set: give its shots and seed")
    shots, seed = (shots, seed) if method_cls.needs_fewshot else (shots or 0, seed or 0)
    task, subset, same_labels = transfer_task(
        source=source,
        source_fewshot=source_fewshot,
        target=target,
        target_split=target_split,
        image_root=_check_image_root(image_root, target),
        shots=shots,
        seed=seed,
        template=template,
    )
    if not same_labels and not method_cls.class_agnostic:
        raise ValueError(
            f"method {method!r} learns parameters tied to {source}'s classes, so it cannot be tested on "
            f"{target}, which has other classes; drop it from this suite's methods"
        )
    instance, run, _ = build_run(
        method_cls,
        hp,
        task,
        backbone=backbone,
        pretrained=pretrained,
        device=device,
        seed=seed,
        progress=progress,
        cache_dir=Path(cache_dir) if cache_dir else None,
        threads=threads or torch.get_num_threads(),
    )
    instance.load(state)
    params = count_parameters([instance.model, *instance.extra_modules()])  # as loaded (Tip-F: its cache)
    result = evaluate(instance, task.test, task.image_root, run, label_subset=subset)
    rec = _record(
        instance=instance,
        run=run,
        result=result,
        params=params,
        stats={"iterations": 0, "train_seconds": 0.0},
        inputs={"source_fewshot": file_sha256(source_fewshot), "state": file_sha256(state)},
        pretrained_arg=pretrained,
        source_dataset=source,
        label_subset=len(subset) if subset else None,
    )
    write_json(record, rec)
    log.info(
        "%s trained on %s, tested on %s: accuracy %.2f %%", method, source, target, 100 * rec["accuracy"]
    )
    return rec
