"""Surgery: put low-rank adapters into the attention of an open_clip CLIP model.

open_clip 3.3.0 builds attention with ``nn.MultiheadAttention``, whose q, k and v live in one
fused ``in_proj_weight``. :class:`AdaptedAttention` replaces such a module, shares its frozen
parameters (same ``nn.Parameter`` objects, no copy) and adds one :class:`LowRankAdapter` per
target. Merging folds every ΔW into those shared parameters and puts the original
``nn.MultiheadAttention`` back, so a merged model runs through open_clip's own modules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blocklora.adapters import LowRankAdapter, chunk_sum, refuse_training_when_merged
from blocklora.io import read_tensors, write_tensors

TARGETS = ("q", "k", "v", "o")
ENCODERS = ("vision", "text")
KINDS = {"lora": 1, "blocklora": None}  # adapter kind -> forced blocks (None: from the argument)
ADAPTER_FORMAT = "blocklora-adapters/2"


class AdaptedAttention(nn.Module):
    """``nn.MultiheadAttention`` (self- or cross-attention) with low-rank adapters on q, k, v, o.

    With ``fuse=True`` and self-attention, the frozen q, k, v come from one matmul, the adapters of
    q, k and v from one (batched) down-projection matmul and one block-diagonal up-projection; each
    adapter still draws its own dropout mask.
    """

    def __init__(self, mha: nn.MultiheadAttention, adapters: dict[str, LowRankAdapter], *, fuse: bool = True):
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "only nn.MultiheadAttention with a fused in_proj and no bias_k/zero_attn is supported"
            )
        unknown = set(adapters) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown adapter targets {sorted(unknown)}: use a subset of {TARGETS}")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.attn_dropout = mha.dropout
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.adapters = nn.ModuleDict(adapters)
        self.fuse = fuse
        self.merged = False
        object.__setattr__(self, "original", mha)  # not a submodule: its parameters are ours

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, heads={self.num_heads}, fuse={self.fuse}, merged={self.merged}"

    def _slice(self, target: str) -> slice:
        d = self.embed_dim
        i = "qkv".index(target)
        return slice(i * d, (i + 1) * d)

    def _project(self, x: torch.Tensor, target: str) -> torch.Tensor:
        sl = self._slice(target)
        bias = None if self.in_proj_bias is None else self.in_proj_bias[sl]
        y = F.linear(x, self.in_proj_weight[sl], bias)
        if target in self.adapters and not self.merged:
            y = y + self.adapters[target](x)
        return y

    def _fusable(self) -> bool:
        qkv = [self.adapters[t] for t in "qkv" if t in self.adapters]
        # one shape for all of them (so at least one): one chunk sum, one batched matmul
        return self.fuse and not self.merged and len({(a.blocks, a.dropout_p, a.rank) for a in qkv}) == 1

    def _project_qkv_fused(self, x: torch.Tensor) -> torch.Tensor:
        """One matmul for the frozen q, k, v; one for the down-projections; one for the up ones.

        Each target draws its own dropout mask, as separate projections do (CLIP-LoRA gives each its
        own ``nn.Dropout``); the three chunk-summed inputs then go through one batched matmul. Without
        dropout (eval mode, or p = 0) they are one and the same input, summed once.
        """
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        present = [self.adapters[t] for t in "qkv" if t in self.adapters]
        first = present[0]
        if self.training and first.dropout_p > 0:
            z = torch.stack([chunk_sum(a.dropout(x), a.blocks) for a in present])  # (T, ..., d/n)
            a = torch.stack([a.lora_A for a in present]).to(x.dtype)  # (T, r, d/n)
            z = (z.flatten(1, -2) @ a.transpose(1, 2)).movedim(0, -2)  # (B·L, T, r)
            z = z.reshape(*x.shape[:-1], -1)  # targets side by side: (..., T·r)
        else:
            z = F.linear(chunk_sum(x, first.blocks), torch.cat([a.lora_A for a in present]).to(x.dtype))
        up = [
            self.adapters[t].lora_B * self.adapters[t].scaling
            if t in self.adapters
            else x.new_zeros(self.embed_dim, 0)
            for t in "qkv"
        ]
        return qkv + F.linear(z, torch.block_diag(*up).to(x.dtype))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights or key_padding_mask is not None:
            raise NotImplementedError("AdaptedAttention supports need_weights=False without key_padding_mask")
        if self.merged:
            for adapter in self.adapters.values():
                refuse_training_when_merged(self, adapter)
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query is key and key is value and self._fusable():
            q, k, v = self._project_qkv_fused(query).chunk(3, dim=-1)
        else:
            q, k, v = self._project(query, "q"), self._project(key, "k"), self._project(value, "v")
        batch, length, _ = q.shape
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        elif attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal and attn_mask is None,
        )
        out = out.transpose(1, 2).reshape(batch, length, self.embed_dim)
        y = self.out_proj(out)
        if "o" in self.adapters and not self.merged:
            y = y + self.adapters["o"](out)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return y, None

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {t: a.delta_weight() for t, a in self.adapters.items()}

    @torch.no_grad()
    def _apply_deltas(self, sign: float) -> None:
        for target, delta in self.delta_weights().items():
            weight = self.out_proj.weight if target == "o" else self.in_proj_weight[self._slice(target)]
            weight.add_(delta.to(weight.dtype), alpha=sign)

    def merge(self) -> None:
        """Fold every ΔW into the shared frozen weights."""
        if self.merged:
            raise RuntimeError("attention adapters are already merged")
        self._apply_deltas(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract every ΔW from the shared frozen weights."""
        if not self.merged:
            raise RuntimeError("attention adapters are not merged")
        self._apply_deltas(-1.0)
        self.merged = False


def encoder_blocks(model: nn.Module, encoder: str) -> Sequence[nn.Module]:
    """The residual attention blocks of one tower of an open_clip CLIP."""
    if encoder == "vision":
        transformer = getattr(getattr(model, "visual", None), "transformer", None)
    elif encoder == "text":
        transformer = getattr(model, "transformer", None)
    else:
        raise ValueError(f"unknown encoder {encoder!r}: use a subset of {ENCODERS}")
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None:
        raise ValueError(
            f"the {encoder} tower of {type(model).__name__} is not an open_clip transformer "
            "with .resblocks (ResNet and HF text towers are not supported)"
        )
    return blocks


def _layer_indices(layers: str | Iterable[int], depth: int, encoder: str) -> list[int]:
    if layers == "all":
        return list(range(depth))
    if isinstance(layers, str):
        raise ValueError(f"layers must be 'all' or a list of indices, got {layers!r}")
    indices = [int(i) for i in layers]
    bad = [i for i in indices if not -depth <= i < depth]
    if bad:
        raise ValueError(f"layers {bad} out of range for the {encoder} encoder with {depth} layers")
    return sorted({i % depth for i in indices})


def _normalize_tuple(values: str | Iterable[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    items = (values,) if isinstance(values, str) else tuple(values)
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise ValueError(f"{what} must be a non-empty subset of {tuple(allowed)}, got {items!r}")
    return tuple(dict.fromkeys(items))


def apply_adapters(
    model: nn.Module,
    kind: str,
    *,
    rank: int = 2,
    alpha: float = 1.0,
    dropout: float = 0.25,
    blocks: int = 8,
    targets: Iterable[str] = ("q", "k", "v"),
    encoders: Iterable[str] = ("vision", "text"),
    layers: str | Iterable[int] = "all",
    scaling: str = "sqrt",
    fuse: bool = True,
    init: str = "kaiming",
) -> nn.Module:
    """Freeze ``model`` and add adapters of ``kind`` ("lora" or "blocklora") in place; returns it.

    ``kind="lora"`` ignores ``blocks`` (it is LoRA: one block).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}: use one of {sorted(KINDS)}")
    if getattr(model, "blocklora_config", None) is not None:
        raise RuntimeError("this model already has adapters; load a fresh backbone to add others")
    targets = _normalize_tuple(targets, TARGETS, "targets")
    encoders = _normalize_tuple(encoders, ENCODERS, "encoders")
    blocks = KINDS[kind] or blocks
    for p in model.parameters():
        p.requires_grad_(False)
    chosen_layers: dict[str, list[int]] = {}
    for encoder in encoders:
        resblocks = encoder_blocks(model, encoder)
        chosen_layers[encoder] = _layer_indices(layers, len(resblocks), encoder)
        for i in chosen_layers[encoder]:
            block = resblocks[i]
            mha = block.attn
            d = mha.embed_dim
            w = mha.in_proj_weight
            adapters = {
                t: LowRankAdapter(
                    d,
                    d,
                    rank=rank,
                    alpha=alpha,
                    dropout=dropout,
                    blocks=blocks,
                    scaling=scaling,
                    init=init,
                    name=f"{encoder}.layer{i}.attn.{t} (width {d})",
                    dtype=w.dtype,
                    device=w.device,
                )
                for t in targets
            }
            block.attn = AdaptedAttention(mha, adapters, fuse=fuse).train(mha.training)
    model.blocklora_config = {
        "kind": kind,
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "blocks": blocks,
        "scaling": scaling,
        "targets": list(targets),
        "encoders": list(encoders),
        "layers": layers if layers == "all" else sorted({int(i) for i in layers}),
        "fuse": fuse,
        "init": init,
    }
    return model


def adapted_attentions(model: nn.Module) -> Iterator[tuple[str, nn.Module, AdaptedAttention]]:
    """(qualified name, parent block, adapted attention) for every adapted block, merged ones too."""
    config = getattr(model, "blocklora_config", None)
    if config is None:
        raise ValueError("this model has no adapters: call blocklora.apply_adapters(model, ...) first")
    merged: dict[str, AdaptedAttention] = getattr(model, "blocklora_merged", {})
    for encoder in config["encoders"]:
        for i, block in enumerate(encoder_blocks(model, encoder)):
            name = f"{encoder}.layer{i}"
            if isinstance(block.attn, AdaptedAttention):
                yield name, block, block.attn
            elif name in merged:
                yield name, block, merged[name]


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold all adapters into the frozen weights and restore open_clip's attention modules."""
    backbone_weights_sha256(model)  # the backbone's identity, while its weights are still its own
    parked: dict[str, AdaptedAttention] = {}
    for name, block, attn in adapted_attentions(model):
        if attn.merged:
            raise RuntimeError(f"{name}: adapters are already merged")
        attn.merge()
        block.attn = attn.original
        parked[name] = attn
    object.__setattr__(model, "blocklora_merged", parked)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters`: subtract every ΔW and put the adapted modules back."""
    parked: dict[str, AdaptedAttention] = getattr(model, "blocklora_merged", {})
    if not parked:
        raise RuntimeError("this model's adapters are not merged")
    for _, block, attn in adapted_attentions(model):
        attn.unmerge()
        block.attn = attn
    object.__setattr__(model, "blocklora_merged", {})
    return model


def is_merged(model: nn.Module) -> bool:
    return bool(getattr(model, "blocklora_merged", {}))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, keyed ``<encoder>.layer<i>.<target>.lora_A|lora_B``."""
    state = {}
    for name, _, attn in adapted_attentions(model):
        for target, adapter in attn.adapters.items():
            state[f"{name}.{target}.lora_A"] = adapter.lora_A
            state[f"{name}.{target}.lora_B"] = adapter.lora_B
    return state


def adapter_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "blocklora_config", None)
    if config is None:
        raise ValueError("this model has no adapters: call blocklora.apply_adapters(model, ...) first")
    return dict(config)


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``, each tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(modules: Sequence[nn.Module] | nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of one or several modules, each tensor counted once."""
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    seen = {id(p): p for module in modules for p in module.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def backbone_weights_sha256(model: nn.Module) -> str:
    """sha256 of the backbone's own weights (every tensor of its state dict but the adapters': names,
    dtypes, shapes and bytes), computed once per model and kept.

    Taken before any merge (:func:`merge_adapters` takes it first), since merging changes the
    weights; a merged model that never had it cannot say which weights it started from.
    """
    known = getattr(model, "blocklora_weights_sha256", None)
    if known is not None:
        return known
    if is_merged(model):
        raise ValueError(
            "this model's adapters were merged before its weights were hashed: load a fresh backbone"
        )
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".adapters." in f".{name}":
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    object.__setattr__(model, "blocklora_weights_sha256", digest.hexdigest())
    return model.blocklora_weights_sha256


def backbone_identity(model: nn.Module) -> dict[str, Any]:
    return dict(getattr(model, "blocklora_backbone", {}) or {})


def save_adapters(model: nn.Module, path: str | Path, **extra: Any) -> None:
    """Write only the adapter tensors plus what is needed to rebuild them (small safetensors file),
    and the identity of the backbone they were trained on: its name, weights file and a sha256 of
    its weights."""
    metadata = {
        "format": ADAPTER_FORMAT,
        "config": adapter_config(model),
        "backbone": {**backbone_identity(model), "weights_sha256": backbone_weights_sha256(model)},
        **extra,
    }
    write_tensors(path, adapter_state(model), metadata)


# What an adapter file's tensors mean: the same values must hold for the model they are loaded into.
# (dropout, fuse and init shape training only.)
STRUCTURE_KEYS = ("kind", "rank", "alpha", "blocks", "scaling", "targets", "encoders", "layers")


def _check_format(saved: dict[str, Any], path: str | Path) -> None:
    if saved.get("format") != ADAPTER_FORMAT:
        raise ValueError(
            f"{path} is not an adapter file of this blocklora (format {saved.get('format')!r}, expected "
            f"{ADAPTER_FORMAT!r}); retrain it with this version"
        )
    backbone, config = saved.get("backbone"), saved.get("config")
    missing = [
        f"backbone.{key}"
        for key in ("name", "pretrained", "weights_sha256")
        if not isinstance(backbone, dict) or key not in backbone
    ] + (["config"] if not isinstance(config, dict) else [])
    if missing:
        raise ValueError(
            f"{path} lacks {', '.join(missing)} in its metadata, so nothing says which backbone and "
            "adapters it holds: it was not written by this blocklora's save_adapters; retrain it"
        )


def _check_backbone(saved: dict[str, Any], model: nn.Module, path: str | Path) -> None:
    """Refuse an adapter file trained on another backbone: another name or weights file, or weights
    that hash differently (two checkpoints may share a file name)."""
    mine, theirs = backbone_identity(model), saved["backbone"]
    said = f"{path} was trained on backbone {theirs.get('name')} / {theirs.get('pretrained')}"
    for key in ("name", "pretrained"):
        if mine.get(key) and theirs.get(key) and mine[key] != theirs[key]:
            raise ValueError(
                f"{said}, but this model is {mine.get('name')} / {mine.get('pretrained')}: load it onto that backbone"
            )
    weights = backbone_weights_sha256(model)
    if theirs["weights_sha256"] != weights:
        raise ValueError(
            f"{said} with weights of sha256 {theirs['weights_sha256']}, but this model's weights hash to "
            f"{weights}: another checkpoint under the same name? Load it onto the weights it was trained on"
        )


def check_compatible(saved: dict[str, Any], model: nn.Module, path: str | Path) -> None:
    """Refuse an adapter file made for another backbone or adapter configuration, or one that does
    not say which (missing metadata)."""
    _check_format(saved, path)
    _check_backbone(saved, model, path)
    config, their_config = adapter_config(model), saved.get("config", {})
    differing = {
        k: (their_config.get(k), config.get(k))
        for k in STRUCTURE_KEYS
        if their_config.get(k) != config.get(k)
    }
    if differing:
        detail = ", ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in differing.items())
        raise ValueError(
            f"{path} holds adapters of another configuration ({detail}); apply matching adapters"
        )


def load_adapters(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load an adapter file into ``model``; returns the file's metadata.

    A backbone without adapters gets them first, built from the file's own configuration (kind,
    rank, blocks, alpha, scaling, targets, encoders, layers, dropout, fuse, init), so a fresh
    ``load_backbone(...)`` reproduces the trained model. A model that has adapters must have the
    file's (a named error otherwise); a merged one is unmerged, swapped and merged again, so one
    loaded backbone can switch between tasks without reloading its base weights. The file must name
    the backbone it was trained on (name, weights file, sha256 of the weights) and it must be this
    one; every tensor must have the model's exact shape and dtype.
    """
    tensors, meta = read_tensors(path)
    if getattr(model, "blocklora_config", None) is None:
        _check_format(meta, path)
        _check_backbone(meta, model, path)  # before the bare backbone gets adapters
        _adapt_as_saved(model, meta, path)
    check_compatible(meta, model, path)
    state = adapter_state(model)
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model's adapters: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, tensor in tensors.items():
        if tensor.shape != state[key].shape or tensor.dtype != state[key].dtype:
            raise ValueError(
                f"{path}: {key} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, model expects "
                f"{tuple(state[key].shape)} and {state[key].dtype}"
            )
    merged = is_merged(model)
    attentions = [attn for _, _, attn in adapted_attentions(model)]
    with torch.no_grad():
        if merged:
            for attn in attentions:
                attn.unmerge()
        for key, tensor in tensors.items():
            state[key].copy_(tensor)
        if merged:
            for attn in attentions:
                attn.merge()
    return meta


def _adapt_as_saved(model: nn.Module, meta: dict[str, Any], path: str | Path) -> None:
    """Put into a bare backbone the adapters an adapter file was saved from."""
    mine, theirs = backbone_identity(model), meta.get("backbone", {})
    if mine.get("name") and theirs.get("name") and mine["name"] != theirs["name"]:
        raise ValueError(
            f"{path} was trained on backbone {theirs.get('name')} / {theirs.get('pretrained')}, "
            f"but this model is {mine.get('name')} / {mine.get('pretrained')}: load it onto that backbone"
        )
    config = dict(meta.get("config") or {})
    kind = config.pop("kind", None)
    if kind is None:
        raise ValueError(f"{path} does not say which adapters it holds (no config.kind)")
    try:
        apply_adapters(model, kind, **config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} holds adapters this backbone cannot take: {exc}") from None
