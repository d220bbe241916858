"""Time one training step of each method against a CLIP-LoRA-style reference, in one run.

    python benchmarks/train_step.py                      # ViT-B/16, batch 32, 100 and 1000 classes
    python benchmarks/train_step.py --small --device cpu # demo-tiny, a CPU-sized run
    python benchmarks/train_step.py --out results/benchmarks/train_step.json

The step is the body of blocklora's training loop (autocast per precision, the method's losses,
its backward, optimizer step) on a fixed random batch; the backbone is randomly
initialised (timing does not depend on the weights). Variants: every registered method with a
generic-loop training step (lora, blocklora, coop, maple, …; deep-prompt depths cut to a small
backbone's layers), and
``reference``, CLIP-LoRA's way: q, k, v as separate projections, each adding
``dropout(x) @ (s · B A)ᵀ`` with the dense ΔW = B A built on every forward and its own dropout
mask, and prompts encoded at the full context length (77 positions; no truncation). Reported
per variant: median step time, peak CUDA memory (None on CPU) and speed-up over the reference.
Eager unless --compile [MODE] is given, which sets every variant's ``compile`` hyper-parameter
(``reduce-overhead``: CUDA graphs); the reference compiles the same way.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from datetime import UTC, datetime
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blocklora.adapters import LowRankAdapter
from blocklora.experiment import build_run
from blocklora.inject import encoder_blocks
from blocklora.io import write_json
from blocklora.methods import Method, get_method, method_names, register_method, resolve_hparams
from blocklora.methods.lora import LoRA
from blocklora.profiling import (
    count_flops,
    has_generic_step,
    peak_memory_mib,
    reset_peak_memory,
    synthetic_task,
    time_calls,
)
from blocklora.records import device_name, package_versions
from blocklora.runtime import resolve_device
from blocklora.train import TrainStep

REFERENCE = "reference"


class DenseDeltaProjection(nn.Module):
    """One of q, k, v as CLIP-LoRA computes it: ``W x + b + dropout(x) @ (s · B A)ᵀ``, ΔW dense."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, **adapter_kwargs: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        d_out, d_in = weight.shape
        self.adapter = LowRankAdapter(d_in, d_out, dtype=weight.dtype, device=weight.device, **adapter_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.adapter.delta_weight()  # s · B A, out × in, rebuilt on every call
        return F.linear(x, self.weight, self.bias) + self.adapter.dropout(x) @ delta.to(x.dtype).T


class ReferenceAttention(nn.Module):
    """``nn.MultiheadAttention`` unfused into q, k, v projections with dense-ΔW LoRA each."""

    def __init__(self, mha: nn.MultiheadAttention, targets: list[str], **adapter_kwargs: Any) -> None:
        super().__init__()
        d = mha.embed_dim
        self.embed_dim, self.num_heads, self.batch_first = d, mha.num_heads, mha.batch_first
        self.attn_dropout = mha.dropout
        bias = mha.in_proj_bias
        projections = {}
        for i, target in enumerate("qkv"):
            w = mha.in_proj_weight[i * d : (i + 1) * d]
            b = None if bias is None else bias[i * d : (i + 1) * d]
            projections[target] = (
                DenseDeltaProjection(w, b, **adapter_kwargs) if target in targets else _Frozen(w, b)
            )
        self.q_proj, self.k_proj, self.v_proj = projections["q"], projections["k"], projections["v"]
        self.out_proj = mha.out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        batch, length, _ = q.shape
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        elif attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))
        return (y if self.batch_first else y.transpose(0, 1)), None


class _Frozen(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@register_method
class CLIPLoRAReference(Method):
    """CLIP-LoRA-style training step: unfused dense-ΔW q/k/v adapters, prompts at 77 positions."""

    name = REFERENCE
    defaults: ClassVar[dict[str, Any]] = dict(LoRA.defaults)

    def setup(self) -> None:
        hp = self.hp
        self.model.requires_grad_(False)
        layers = hp["layers"]
        for encoder in hp["encoders"]:
            blocks = encoder_blocks(self.model, encoder)
            chosen = range(len(blocks)) if layers == "all" else [i % len(blocks) for i in layers]
            for i in chosen:
                blocks[i].attn = ReferenceAttention(
                    blocks[i].attn,
                    [t for t in hp["targets"] if t in "qkv"],
                    rank=hp["rank"],
                    alpha=hp["alpha"],
                    dropout=hp["dropout"],
                    scaling=hp["scaling"],
                )
        self.tokens = self.backbone.tokenizer(self.task.prompts(hp["template"])).to(self.device)

    def train_logits(self, images: torch.Tensor) -> torch.Tensor:
        text = self.model.encode_text(self.tokens, normalize=True)
        image = self.model.encode_image(images, normalize=True)
        return self.hp["logit_scale"] * image @ text.to(image.dtype).T


def generic_methods() -> list[str]:
    """Registered methods with a training step of the generic loop (``train_logits``)."""
    return [name for name in method_names() if name != REFERENCE and has_generic_step(get_method(name))]


def prompt_depths(cls: type[Method], backbone: str) -> dict[str, int]:
    """Deep-prompt depths (their defaults assume ViT-B/16's 12 layers) cut to a smaller backbone's layers."""
    import open_clip

    from blocklora.clip import register_configs

    register_configs()
    config = open_clip.get_model_config(backbone) or {}
    layers = min(config.get("vision_cfg", {}).get("layers", 12), config.get("text_cfg", {}).get("layers", 12))
    defaults = cls.all_defaults()
    return {
        k: layers for k in ("depth", "depth_text", "depth_vision") if k in defaults and defaults[k] > layers
    }


def measure(
    variant: str, args: argparse.Namespace, classes: int, device: torch.device, hparams: dict[str, Any]
) -> dict[str, Any]:
    """Build ``variant`` on a fresh random-init backbone and time its training step."""
    cls = get_method(variant)
    given = {k: v for k, v in hparams.items() if k in cls.all_defaults()}
    hp = resolve_hparams(cls, {**prompt_depths(cls, args.backbone), **given})
    method, run, (trainable, _) = build_run(
        cls,
        hp,
        synthetic_task(classes),
        backbone=args.backbone,
        pretrained=None,
        device=device,
        seed=0,
        progress=False,
    )
    if not has_generic_step(method):
        raise ValueError(f"variant {variant!r} does not train with the generic loop")
    backbone, precision = method.backbone, run.precision(method.hp)
    generator = torch.Generator().manual_seed(0)
    size = backbone.image_size
    images = torch.randn(args.batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(classes, (args.batch_size,), generator=generator).to(device)
    step = TrainStep(method, precision, device)
    method.modules_to_train().train()
    flops = count_flops(partial(step.forward_backward, images, labels)) if args.flops else None
    reset_peak_memory(device)
    times = time_calls(partial(step, images, labels), device, warmup=args.warmup, steps=args.steps)
    peak = peak_memory_mib(device)
    tokens = getattr(method, "tokens", None)
    result = {
        "variant": variant,
        "classes": classes,
        "step_ms": statistics.median(times),
        "step_ms_min": min(times),
        "step_ms_max": max(times),
        "peak_memory_gib": None if peak is None else peak / 1024,
        "trainable_params": trainable,
        "train_flops_per_step": flops,
        "text_tokens": None if tokens is None else int(tokens.shape[1]),
        "precision": precision.name,
    }
    step.close()
    del step, method, backbone, images, labels
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    versions = meta["versions"]
    lines = [
        f"# one training step, {meta['backbone']} (random init), batch {meta['batch_size']}",
        f"# date {meta['date']}; device {meta['device']}",
        f"# torch {versions.get('torch')} (CUDA build {versions.get('cuda')}); "
        f"open_clip {versions.get('open_clip_torch')}; python {versions.get('python')}",
        f"# median of {meta['steps']} steps after {meta['warmup']} warm-up; compile={meta['compile']}",
        "",
        "| classes | variant | precision | step ms (median) | step ms (min) | peak GiB "
        "| speed-up vs reference | trainable params | text positions | train GFLOP/step |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        flops = None if r["train_flops_per_step"] is None else r["train_flops_per_step"] / 1e9
        lines.append(
            f"| {r['classes']} | {r['variant']} | {r['precision']} | {r['step_ms']:.1f} "
            f"| {r['step_ms_min']:.1f} | {_fmt(r['peak_memory_gib'], '.2f')} "
            f"| {_fmt(r['speedup_vs_reference'], '.2f')} "
            f"| {r['trainable_params']:,} | {r['text_tokens']} | {_fmt(flops, '.1f')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=None, help="default 100 1000 (--small: 10 100)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (--small: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, default 50 (--small: 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, default 10 (--small: 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--backbone", default=None, help="open_clip model name, default ViT-B-16 (--small: demo-tiny)"
    )
    p.add_argument(
        "--variants", nargs="+", default=None, help=f"default: {REFERENCE} + every generic-loop method"
    )
    p.add_argument("--hparams", type=json.loads, default={}, help="JSON overrides for every variant")
    p.add_argument("--small", action="store_true", help="a CPU-sized run: demo-tiny, 10 and 100 classes")
    p.add_argument("--flops", action="store_true", help="also count FLOPs/step (slow on CPU)")
    p.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        help="compile each step as the training loop does (hyper-parameter compile): no value = "
        "default mode, or a mode such as reduce-overhead (CUDA graphs); off by default",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    small = args.small
    args.classes = args.classes or ([10, 100] if small else [100, 1000])
    args.batch_size = args.batch_size or (8 if small else 32)
    args.steps = args.steps or (5 if small else 50)
    args.warmup = args.warmup if args.warmup is not None else (2 if small else 10)
    args.backbone = args.backbone or ("demo-tiny" if small else "ViT-B-16")
    args.variants = args.variants or [REFERENCE, *generic_methods()]
    if args.compile:
        args.hparams = {**args.hparams, "compile": args.compile}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    results = []
    for classes in args.classes:
        rows = []
        for variant in args.variants:
            print(f"timing {variant} at {classes} classes ...", file=sys.stderr, flush=True)
            rows.append(measure(variant, args, classes, device, args.hparams))
        reference = next((r["step_ms"] for r in rows if r["variant"] == REFERENCE), None)
        for r in rows:
            r["speedup_vs_reference"] = None if reference is None else reference / r["step_ms"]
        results.extend(rows)
    meta = {
        "date": started,
        "device": device_name(device),
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "cpu_threads": torch.get_num_threads(),
        "hparams": args.hparams,
        "versions": package_versions(),
    }
    print(table(meta, results))
    if args.out:
        write_json(args.out, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
