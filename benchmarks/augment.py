"""Time the training augmentation both ways: crop by crop, and batched by matmuls, in one run.

    python benchmarks/augment.py                          # batch 32 → 224 px, on the default device
    python benchmarks/augment.py --device cpu --threads 1
    python benchmarks/augment.py --out results/benchmarks/augment.json

The images are random uint8 tensors kept on the device, as the training loop keeps the decoded
few-shot images; two sets: every image 375 × 500 (one size: the batched path gathers from one
stacked tensor) and sizes drawn from 250–640 px per side (the batched path pads the crops).
Each variant draws its crop boxes from the same seed, so both resize the same crops; the table
also gives the largest difference between their outputs.
"""

from __future__ import annotations

import argparse
import statistics
from datetime import UTC, datetime
from typing import Any

import torch

from blocklora.data.loading import DeviceAugment
from blocklora.io import write_json
from blocklora.profiling import time_interleaved
from blocklora.records import device_name, package_versions
from blocklora.runtime import resolve_device

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def image_sets(count: int, generator: torch.Generator) -> dict[str, list[tuple[int, int]]]:
    sides = torch.randint(250, 641, (count, 2), generator=generator).tolist()
    return {"one size 375x500": [(375, 500)] * count, "mixed 250-640 px": [tuple(s) for s in sides]}


def measure(name: str, shapes: list[tuple[int, int]], args: argparse.Namespace, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in shapes]
    augments = {
        mode: DeviceAugment(
            images,
            args.size,
            MEAN,
            STD,
            device=device,
            batched=mode == "batched",
            generator=torch.Generator().manual_seed(1),
        )
        for mode in ("per-crop", "batched")
    }
    batches = torch.randint(len(images), (args.warmup + args.steps, args.batch_size), generator=generator)
    difference = (augments["per-crop"](batches[0]) - augments["batched"](batches[0])).abs().max().item()
    counters = dict.fromkeys(augments, 0)

    def call(mode: str):
        def run() -> torch.Tensor:
            counters[mode] += 1
            return augments[mode](batches[counters[mode] % len(batches)].tolist())

        return run

    times = time_interleaved({m: call(m) for m in augments}, device, warmup=args.warmup, steps=args.steps)
    return {
        "images": name,
        "max_abs_difference": difference,
        **{f"{mode}_ms": statistics.median(t) for mode, t in times.items()},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224, help="output side in pixels")
    p.add_argument("--images", type=int, default=256, help="images kept on the device")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(device),
        "batch_size": args.batch_size,
        "size": args.size,
        "steps": args.steps,
        "warmup": args.warmup,
        "cpu_threads": torch.get_num_threads(),
        "versions": package_versions(),
    }
    sets = image_sets(args.images, torch.Generator().manual_seed(2))
    results = [measure(name, shapes, args, device) for name, shapes in sets.items()]
    print(f"# augmentation of a batch of {args.batch_size} to {args.size} px; device {meta['device']}")
    print(f"# median of {args.steps} calls after {args.warmup} warm-up; {meta['date']}")
    print("\n| images | per-crop ms | batched ms | max abs difference |\n|---|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['images']} | {r['per-crop_ms']:.2f} | {r['batched_ms']:.2f} | {r['max_abs_difference']:.1e} |"
        )
    if args.out:
        write_json(args.out, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
