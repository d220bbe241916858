"""Where a job's fixed cost goes: interpreter start-up, imports, backbone load, test-set decoding,
reading the evaluation cache, and the evaluation forward pass.

    python benchmarks/job_cost.py --threads 1                      # demo-tiny and ViT-B/16, on the CPU
    python benchmarks/job_cost.py --backbones ViT-B-16 --device cuda --out results/benchmarks/job_cost.json

Each phase is timed on its own, median of --repeat runs: start-up and imports in fresh interpreters
(as a job without the preload server pays them), the rest in this process. Decoding uses synthetic
500 x 375 JPEGs (ImageNet's typical size) resized and center-cropped to the backbone's resolution, as
the evaluation cache is built; reading the cache and the forward pass use --images images at a time.
ViT-B/16 is loaded with random weights and from a state-dict file of the same size (the OpenAI weights
cannot be downloaded everywhere); demo-tiny from the demo's checkpoint when it exists.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from blocklora.clip import load_backbone
from blocklora.data.eval_images import decode, eval_images
from blocklora.io import write_json
from blocklora.records import device_name, package_versions
from blocklora.runtime import resolve_device

IMPORTS = "import blocklora.experiment; from blocklora.methods import method_names; method_names()"


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fresh_interpreter(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


def jpegs(folder: Path, count: int) -> list[list]:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(count):
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        (folder / f"{i}.jpg").write_bytes(buffer.getvalue())
        entries.append([f"{i}.jpg", 0, "x"])
    return entries


def measure(
    backbone: str, args: argparse.Namespace, device: torch.device, folder: Path, entries: list
) -> dict:
    demo = Path(args.demo_checkpoint)
    pretrained = str(demo) if backbone == "demo-tiny" and demo.is_file() else None
    load = median_seconds(lambda: load_backbone(backbone, pretrained, device=device), args.repeat)
    loaded = load_backbone(backbone, pretrained, device=device)
    result: dict[str, Any] = {"backbone": backbone, "weights": pretrained or "random", "load_s": load}
    if pretrained is None:
        state = folder / f"{backbone}.pt"
        torch.save(loaded.model.state_dict(), state)
        result["load_from_file_s"] = median_seconds(
            lambda: load_backbone(backbone, str(state), device=device), args.repeat
        )
    size = loaded.image_size
    out = np.empty((len(entries), size, size, 3), dtype=np.uint8)
    seconds = median_seconds(lambda: decode(entries, folder, size, out, threads=args.threads), args.repeat)
    result["decode_images_per_s"] = len(entries) / seconds
    cached = eval_images(entries, folder, size, cache_dir=folder / "cache", threads=args.threads)

    def read_cache():
        for _ in cached.batches(args.batch_size, device, loaded.mean, loaded.std):
            pass

    result["cache_read_images_per_s"] = len(entries) / median_seconds(read_cache, args.repeat)
    batch = next(cached.batches(args.batch_size, device, loaded.mean, loaded.std))[0]
    loaded.model.eval()

    @torch.no_grad()
    def forward():
        loaded.encode_image(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    forward()
    result["forward_images_per_s"] = len(batch) / median_seconds(forward, args.repeat)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=["demo-tiny", "ViT-B-16"], help="backbones to measure")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch and of decoding (default 1)")
    p.add_argument("--images", type=int, default=64, help="test images decoded and read (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch (default 32)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each phase; the median is reported")
    p.add_argument(
        "--demo-checkpoint", default="results/demo/backbone.pt", help="demo-tiny's weights, if built"
    )
    p.add_argument("--out", default=None, help="also write the figures here (JSON)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    start = median_seconds(lambda: fresh_interpreter("pass"), args.repeat)
    imports = median_seconds(lambda: fresh_interpreter(IMPORTS), args.repeat) - start
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = jpegs(folder, args.images)
        rows = [measure(name, args, device, folder, entries) for name in args.backbones]
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(device),
        "versions": package_versions(),
        "threads": args.threads,
        "interpreter_start_s": start,
        "imports_s": imports,
        "images": args.images,
        "batch_size": args.batch_size,
    }
    print(
        f"# job fixed cost on {meta['device']}, {args.threads} thread(s), median of {args.repeat}; {meta['date']}"
    )
    print(f"interpreter start-up {start:.2f} s; imports of a train job {imports:.2f} s")
    print(
        "| backbone | weights | load s | load from file s | decode img/s | cache read img/s | forward img/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        from_file = r.get("load_from_file_s")
        print(
            f"| {r['backbone']} | {r['weights']} | {r['load_s']:.2f} | "
            f"{'-' if from_file is None else f'{from_file:.2f}'} | {r['decode_images_per_s']:.0f} | "
            f"{r['cache_read_images_per_s']:.0f} | {r['forward_images_per_s']:.1f} |"
        )
    if args.out:
        write_json(args.out, {**meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
