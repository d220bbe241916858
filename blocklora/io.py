"""Files that never pass half-written for complete: atomic writes, adapter files, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from blocklora.inject import adapted_attentions, adapter_config, adapter_state, is_merged

ADAPTER_FORMAT = "blocklora-adapters/1"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are shared like any other file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write a safetensors file atomically; ``metadata`` values are stored as JSON strings."""
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=meta)


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by :func:`write_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); delete it and rerun") from exc
    return tensors, meta


def backbone_identity(model: nn.Module) -> dict[str, Any]:
    return dict(getattr(model, "blocklora_backbone", {}) or {})


def save_adapters(model: nn.Module, path: str | Path, **extra: Any) -> None:
    """Write only the adapter tensors plus what is needed to rebuild them (small safetensors file)."""
    metadata = {
        "format": ADAPTER_FORMAT,
        "config": adapter_config(model),
        "backbone": backbone_identity(model),
        **extra,
    }
    write_tensors(path, adapter_state(model), metadata)


def check_compatible(saved: dict[str, Any], model: nn.Module, path: str | Path) -> None:
    """Refuse an adapter file made for another backbone or adapter configuration."""
    if saved.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a blocklora adapter file (format {saved.get('format')!r})")
    mine, theirs = backbone_identity(model), saved.get("backbone", {})
    for key in ("name", "pretrained"):
        if mine.get(key) and theirs.get(key) and mine[key] != theirs[key]:
            raise ValueError(
                f"{path} was trained on backbone {theirs.get('name')} / {theirs.get('pretrained')}, "
                f"but this model is {mine.get('name')} / {mine.get('pretrained')}: load it onto that backbone"
            )
    config, their_config = adapter_config(model), saved.get("config", {})
    differing = {k: (their_config.get(k), v) for k, v in config.items() if their_config.get(k) != v}
    if differing:
        detail = ", ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in differing.items())
        raise ValueError(
            f"{path} holds adapters of another configuration ({detail}); apply matching adapters"
        )


@torch.no_grad()
def load_adapters(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load adapter tensors into a model adapted with the same configuration; returns the metadata.

    Works on merged models too (it unmerges, swaps, merges again), so one loaded backbone can
    switch between tasks without reloading its base weights.
    """
    tensors, meta = read_tensors(path)
    check_compatible(meta, model, path)
    state = adapter_state(model)
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model's adapters: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, tensor in tensors.items():
        if tensor.shape != state[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, model expects {tuple(state[key].shape)}"
            )
    merged = is_merged(model)
    attentions = [attn for _, _, attn in adapted_attentions(model)]
    if merged:
        for attn in attentions:
            attn.unmerge()
    for key, tensor in tensors.items():
        state[key].copy_(tensor)
    if merged:
        for attn in attentions:
            attn.merge()
    return meta
