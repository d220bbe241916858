"""Low-rank adapters for linear maps: LoRA and Block-LoRA. Math only, no CLIP.

LoRA adds ``s · B A dropout(x)`` to a frozen ``W x + b``. Block-LoRA cuts the input
into ``blocks`` chunks and shares one down-projection ``A_s`` between them, so that
``A x = A_s (x_1 + … + x_n)``: the chunks are summed first, then one small matmul.
The equivalent dense update is ``ΔW = s · B [A_s | … | A_s]``, which merges into W.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCALINGS = ("sqrt", "linear")
# How A (for Block-LoRA the shared A_s) is drawn; B starts at zero either way.
#   kaiming: kaiming_uniform(a=sqrt(5)) on A's own shape (rank x in/blocks), as nn.Linear and LoRA do.
#   matched: the same, scaled by 1/sqrt(blocks), so that A·x has LoRA's spread at initialization (the
#            sum of n chunks has about sqrt(n) times one chunk's spread). Identical to kaiming for n = 1.
INITS = ("kaiming", "matched")


def lora_scaling(rank: int, alpha: float, scaling: str) -> float:
    """The factor s: alpha / sqrt(rank) (CLIP-LoRA) or alpha / rank (original LoRA)."""
    if scaling == "sqrt":
        return alpha / math.sqrt(rank)
    if scaling == "linear":
        return alpha / rank
    raise ValueError(f"unknown scaling {scaling!r}: use one of {SCALINGS}")


def chunk_sum(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """Sum the ``blocks`` equal chunks of the last dimension: (..., d) -> (..., d / blocks)."""
    if blocks == 1:
        return x
    return x.unflatten(-1, (blocks, x.shape[-1] // blocks)).sum(-2)


class LowRankAdapter(nn.Module):
    """The trainable update alone: ``delta(x) = s · B A_s chunk_sum(dropout(x))``.

    ``blocks > 1`` gives Block-LoRA: the down-projection ``A_s`` (rank × in/blocks) is shared by
    every block of the input. ``blocks = 1`` is exactly LoRA. The dense ΔW is only built for
    merging (:meth:`delta_weight`), never in the forward pass.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int = 2,
        alpha: float = 1.0,
        dropout: float = 0.0,
        blocks: int = 1,
        scaling: str = "sqrt",
        init: str = "kaiming",
        name: str = "",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        label = name or "adapter"
        if init not in INITS:
            raise ValueError(f"{label}: unknown init {init!r}: use one of {INITS}")
        if rank < 1:
            raise ValueError(f"{label}: rank must be >= 1, got {rank}")
        if blocks < 1 or in_features % blocks:
            raise ValueError(
                f"{label}: blocks={blocks} does not divide its input width {in_features}; "
                f"choose blocks among the divisors of {in_features}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{label}: dropout must be in [0, 1), got {dropout}")
        self.name = name
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha
        self.blocks = blocks
        self.scaling_kind = scaling
        self.scaling = lora_scaling(rank, alpha, scaling)
        self.init = init
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features // blocks, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "matched":
            with torch.no_grad():
                self.lora_A.div_(math.sqrt(blocks))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, blocks={self.blocks}, "
            f"alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout_p}, init={self.init}"
        )

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for an already dropped-out input: chunk sum, then one rank × in/blocks matmul."""
        return F.linear(chunk_sum(x, self.blocks), self.lora_A.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update ``s · B A dropout(x)``."""
        z = self.down(self.dropout(x))
        return F.linear(z, self.lora_B.to(x.dtype)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``ΔW = s · B [A_s | … | A_s]`` (out × in), for merging and checks."""
        return (self.lora_B @ self.lora_A.repeat(1, self.blocks)) * self.scaling


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` that owns a :class:`LowRankAdapter` and can merge it in place."""

    def __init__(self, base: nn.Linear, *, name: str = "", **adapter_kwargs) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name or 'layer'}: expected nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.adapter = LowRankAdapter(
            base.in_features,
            base.out_features,
            name=name,
            dtype=base.weight.dtype,
            device=base.weight.device,
            **adapter_kwargs,
        )
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return f"merged={self.merged}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            refuse_training_when_merged(self, self.adapter)
            return self.base(x)
        return self.base(x) + self.adapter(x)

    def delta_weight(self) -> torch.Tensor:
        return self.adapter.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight, after which the layer costs what the base costs."""
        if self.merged:
            raise RuntimeError(f"{self.adapter.name or 'LoRALinear'} is already merged")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again."""
        if not self.merged:
            raise RuntimeError(f"{self.adapter.name or 'LoRALinear'} is not merged")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False


class BlockLoRALinear(LoRALinear):
    """Block-LoRA on a linear layer: ``blocks`` input chunks share one down-projection."""

    def __init__(self, base: nn.Linear, *, blocks: int = 8, **kwargs) -> None:
        super().__init__(base, blocks=blocks, **kwargs)


def refuse_training_when_merged(module: nn.Module, adapter: LowRankAdapter) -> None:
    """A merged adapter gets no gradient: training it would silently do nothing."""
    if module.training and torch.is_grad_enabled() and adapter.lora_A.requires_grad:
        raise RuntimeError(
            f"{adapter.name or type(module).__name__} is merged and cannot be trained: "
            "call blocklora.unmerge_adapters(model) first"
        )


def adapter_parameter_count(d_in: int, d_out: int, rank: int, blocks: int = 1) -> int:
    """Trainable parameters of one adapted matrix: r (d_in / n + d_out)."""
    return rank * (d_in // blocks + d_out)
