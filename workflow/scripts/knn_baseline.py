"""k-NN on frozen CLIP image features: a few-shot baseline that lives outside blocklora, run by its own
rule (workflow/rules/knn_baseline.smk; README, "Adding a baseline as a rule").

Each test image is classified by its ``k`` nearest few-shot training images under cosine similarity
of CLIP's normalized image embeddings; each neighbour votes for its class with weight
``exp(similarity / temperature)`` (the weighted k-NN of Wu et al., 2018, with which DINO evaluates
frozen features). Nothing is trained and no text is used: it measures what the image tower alone
knows from the K shots, the floor every adapter of that tower should beat. With fewer training images
than ``k``, every one of them votes.

It uses open_clip and torch directly, as a script in its own repository would. What it takes from
blocklora is the helper that writes its run record, blocklora.records.write_record (``blocklora
record`` from a shell does the same for code in another language or environment), and, on a node
with several GPUs, blocklora.gpus.claim_gpu, which gives each job a GPU of its own.

    python workflow/scripts/knn_baseline.py --fewshot F --split S --image-root DIR --dataset D \\
        --shots 4 --seed 1 --backbone ViT-B-16 --pretrained openai --hparams '{"k": 20}' --record R
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULTS = {"k": 20, "temperature": 0.07, "batch_size": 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fewshot", required=True, help="few-shot file: train (K per class), val, test")
    p.add_argument("--split", required=True, help="the dataset's prepared split file (its hash is recorded)")
    p.add_argument("--image-root", required=True, help="folder the split's image paths are relative to")
    p.add_argument("--dataset", required=True)
    p.add_argument("--shots", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--backbone", required=True, help="open_clip model name")
    p.add_argument("--pretrained", default="none", help="open_clip tag, checkpoint file, or none")
    p.add_argument("--model-configs", default=None, help="a folder of extra open_clip model configs")
    p.add_argument("--hparams", default="{}", help=f"JSON object over the defaults {json.dumps(DEFAULTS)}")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch")
    p.add_argument("--method", default="knn_baseline", help="the method's name in the record")
    p.add_argument("--rule", default=None, help="the workflow rule running it (for the record)")
    p.add_argument("--code-version", default=None, help="this code's version (for the record)")
    p.add_argument("--record", required=True, help="the run record to write")
    return p.parse_args(argv)


def hyper_parameters(text: str) -> dict[str, Any]:
    """The defaults updated by ``text`` (a JSON object), each checked."""
    given = json.loads(text)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise SystemExit(
            f"unknown hyper-parameter(s) {unknown} of the k-NN baseline; known: {sorted(DEFAULTS)}"
        )
    hp = {**DEFAULTS, **given}
    if not (isinstance(hp["k"], int) and hp["k"] >= 1):
        raise SystemExit(f"k must be a positive integer, got {hp['k']!r}")
    if not (isinstance(hp["temperature"], int | float) and hp["temperature"] > 0):
        raise SystemExit(f"temperature must be a positive number, got {hp['temperature']!r}")
    if not (isinstance(hp["batch_size"], int) and hp["batch_size"] >= 1):
        raise SystemExit(f"batch_size must be a positive integer, got {hp['batch_size']!r}")
    return hp


def encode(model, preprocess, entries: list, image_root: Path, device, batch_size: int):
    """Normalized image embeddings of ``entries`` ([path, label, class name] each), in order."""
    import torch
    from PIL import Image

    features = []
    with torch.no_grad():
        for start in range(0, len(entries), batch_size):
            batch = []
            for path, _, _ in entries[start : start + batch_size]:
                with Image.open(image_root / path) as image:
                    batch.append(preprocess(image.convert("RGB")))
            embedded = model.encode_image(torch.stack(batch).to(device))
            features.append(torch.nn.functional.normalize(embedded.float(), dim=-1))
    return torch.cat(features)


def knn_predict(train, train_labels, test, num_classes: int, k: int, temperature: float, chunk: int = 1024):
    """Class of each test embedding: its k most similar training embeddings vote with exp(similarity / T)."""
    import torch

    k = min(k, len(train))
    predictions = []
    for start in range(0, len(test), chunk):
        similarity, nearest = (test[start : start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(nearest), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[nearest], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hp = hyper_parameters(args.hparams)

    from blocklora.gpus import claim_gpu, default_lock_dir
    from blocklora.records import write_record

    if args.device in ("auto", "cuda"):
        claim_gpu(default_lock_dir())  # before CUDA starts
    import open_clip
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.model_configs:
        open_clip.add_model_config(args.model_configs)
    torch.manual_seed(args.seed)  # random weights (pretrained none) are drawn the same way for a seed
    weights = None if args.pretrained in ("", "none", "random") else args.pretrained
    model, _, preprocess = open_clip.create_model_and_transforms(
        args.backbone, pretrained=weights, device=device
    )
    model.eval()

    fewshot = json.loads(Path(args.fewshot).read_text())
    train, test = fewshot["train"], fewshot["test"]
    labels = {int(label) for split in fewshot.values() for _, label, _ in split}
    num_classes = max(labels) + 1
    image_root = Path(args.image_root)

    started = time.perf_counter()
    memory = encode(model, preprocess, train, image_root, device, hp["batch_size"])
    memory_labels = torch.tensor([int(label) for _, label, _ in train], device=device)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    queries = encode(model, preprocess, test, image_root, device, hp["batch_size"])
    predicted = knn_predict(memory, memory_labels, queries, num_classes, hp["k"], hp["temperature"])
    truth = torch.tensor([int(label) for _, label, _ in test], device=device)
    accuracy = float((predicted == truth).float().mean())
    eval_seconds = time.perf_counter() - started

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    write_record(
        args.record,
        method=args.method,
        dataset=args.dataset,
        shots=args.shots,
        seed=args.seed,
        backbone=args.backbone,
        pretrained=weights,
        accuracy=accuracy,
        test_size=len(test),
        num_classes=num_classes,
        device=name,
        trainable_params=0,  # nothing is learned: the few-shot embeddings are kept, not trained
        total_params=sum(p.numel() for p in model.parameters()),
        iterations=0,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        peak_memory_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        hparams=hp,
        stats={"memory_size": len(train), "neighbours": min(hp["k"], len(train))},
        inputs={"fewshot": args.fewshot, "split": args.split},
        code_version=args.code_version,
        rule=args.rule,
    )
    print(
        f"k-NN on {args.dataset}, {args.shots} shots, seed {args.seed}: {len(train)} training images, "
        f"test accuracy {100 * accuracy:.2f} % over {len(test)} images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
