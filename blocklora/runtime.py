"""What a run needs beyond its hyper-parameters: the device, its precision, the seeds.

A leaf module: the loop, evaluation, the feature cache, profiling and the experiment all build on
it, and it builds on nothing of the package.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (every CUDA device too), as Dassl's set_random_seed does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator, CUDA included


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; an explicit CUDA device must exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu")
    return resolved


@dataclass
class Precision:
    """Autocast dtype (None = fp32) and whether a GradScaler is needed."""

    dtype: torch.dtype | None
    scaler: bool

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> Precision:
        if name == "auto":
            name = "fp16" if device.type == "cuda" else "fp32"
        if name == "fp32":
            return cls(None, False)
        if name == "bf16":
            return cls(torch.bfloat16, False)
        if name == "fp16":
            if device.type != "cuda":
                raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
            return cls(torch.float16, True)
        raise ValueError(f"unknown precision {name!r}: use auto, fp32, bf16 or fp16")

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


@dataclass
class RunContext:
    """What a method needs to run beyond its hyper-parameters."""

    device: torch.device
    seed: int
    progress: bool = True
    cache_dir: Path | None = None  # reusable artefacts such as frozen image features
    checkpoint: Path | None = None  # where the loop keeps its resumable state
    threads: int = field(default_factory=torch.get_num_threads)  # CPU threads for decoding and loading
    stats: dict[str, Any] = field(default_factory=dict)

    def precision(self, hp: dict[str, Any]) -> Precision:
        return Precision.resolve(hp.get("precision", "auto"), self.device)

    @property
    def loader_workers(self) -> int:
        """DataLoader worker processes within the job's threads: none for a single thread."""
        return self.threads if self.threads > 1 else 0
