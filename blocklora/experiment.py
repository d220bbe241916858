"""One run: (method, dataset, shots, seed) from a few-shot file to a record and a state file."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blocklora.clip import load_backbone
from blocklora.evaluate import evaluate
from blocklora.io import write_json
from blocklora.methods import FewShotTask, get_method, resolve_hparams
from blocklora.records import (
    PROTOCOL_VERSION,
    config_hash,
    device_name,
    file_sha256,
    git_commit,
    now,
    package_versions,
)
from blocklora.train import RunContext, resolve_device, seed_everything

log = logging.getLogger("blocklora")


def read_fewshot(path: str | Path) -> dict[str, list]:
    """A few-shot (or split) file: {"train", "val", "test"} lists of [path, label, classname]."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read few-shot file {path} ({exc}); rerun its fewshot job") from exc
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise ValueError(f"few-shot file {path} must hold 'train', 'val' and 'test' lists")
    return {k: [tuple(e) for e in data.get(k, [])] for k in ("train", "val", "test")}


def class_names(splits: dict[str, list], source: str | Path) -> list[str]:
    """Class names indexed by label, from every entry; gaps or conflicts are errors."""
    names: dict[int, str] = {}
    for entries in splits.values():
        for entry in entries:
            if len(entry) != 3:
                raise ValueError(f"{source}: entry {list(entry)} is not [path, label, classname]")
            label, name = int(entry[1]), str(entry[2])
            if names.setdefault(label, name) != name:
                raise ValueError(f"{source}: label {label} is named both {names[label]!r} and {name!r}")
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


def count_parameters(modules: Sequence[torch.nn.Module] | torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor counted once."""
    modules = [modules] if isinstance(modules, torch.nn.Module) else list(modules)
    seen: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen[id(p)] = p
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def run_experiment(
    *,
    method: str,
    dataset: str,
    fewshot: str | Path,
    image_root: str | Path,
    shots: int,
    seed: int,
    backbone: str,
    pretrained: str | None,
    hparams: dict[str, Any] | None = None,
    record: str | Path,
    adapter: str | Path,
    device: str = "auto",
    suite: str | None = None,
    template: str | None = None,
    module: str | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    variant: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run; write the state file, then the record (both atomically)."""
    if shots <= 0:
        raise ValueError(f"shots must be a positive integer, got {shots}")
    method_cls = get_method(method, module)
    hp = resolve_hparams(method_cls, hparams)
    splits = read_fewshot(fewshot)
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"image folder {image_root} of dataset {dataset} does not exist; prepare the dataset"
        )
    task = FewShotTask(
        dataset=dataset,
        classnames=class_names(splits, fewshot),
        template=template or dataset_template(dataset),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        image_root=image_root,
        shots=shots,
        seed=seed,
    )
    run = RunContext(
        device=resolve_device(device),
        seed=seed,
        progress=progress,
        cache_dir=Path(cache_dir) if cache_dir else None,
        checkpoint=checkpoint_path(record),
    )
    seed_everything(seed)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    loaded = load_backbone(backbone, pretrained, device=run.device)
    loaded.model.requires_grad_(False)
    instance = method_cls(loaded, task, hp)
    instance.setup()
    trainable, total = count_parameters([loaded.model, *instance.extra_modules()])
    log.info(
        "%s on %s, %d shots, seed %d: %d trainable of %d parameters",
        method,
        dataset,
        shots,
        seed,
        trainable,
        total,
    )
    stats = instance.fit(run)
    instance.save(adapter, dataset=dataset, shots=shots, seed=seed)
    result = evaluate(instance, task.test, task.image_root, run)
    inputs = {"fewshot": file_sha256(fewshot)}
    if loaded.pretrained and Path(str(pretrained)).is_file():
        inputs["pretrained"] = file_sha256(pretrained)
    resolved = {
        "method": method,
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "backbone": backbone,
        "pretrained": loaded.pretrained,
        "template": task.template,
        "hparams": hp,
    }
    rec = {
        "method": method,
        "variant": variant or method,
        "dataset": dataset,
        "suite": suite,
        "shots": shots,
        "seed": seed,
        "backbone": backbone,
        "pretrained": loaded.pretrained,
        "accuracy": result["accuracy"],
        "num_classes": task.num_classes,
        "test_size": result["test_size"],
        "trainable_params": trainable,
        "total_params": total,
        "iterations": stats.get("iterations", instance.iterations()),
        "train_seconds": stats.get("train_seconds", 0.0),
        "eval_seconds": result["eval_seconds"],
        "peak_memory_mib": (
            torch.cuda.max_memory_allocated(run.device) / 2**20 if run.device.type == "cuda" else None
        ),
        "device": device_name(run.device),
        "train_stats": {k: v for k, v in stats.items() if k not in ("iterations", "train_seconds")},
        "hparams": hp,
        "template": task.template,
        "protocol_version": PROTOCOL_VERSION,
        "config_hash": config_hash(resolved),
        "inputs": inputs,
        "inputs_hash": config_hash(inputs),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "created": now(),
    }
    write_json(record, rec)
    if run.checkpoint is not None:
        run.checkpoint.unlink(missing_ok=True)
    log.info(
        "%s on %s, %d shots, seed %d: test accuracy %.2f %%",
        method,
        dataset,
        shots,
        seed,
        100 * rec["accuracy"],
    )
    return rec
