"""The ``blocklora`` command: thin wrappers over the library, one subcommand per pipeline step."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

log = logging.getLogger("blocklora")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"rank\": 4}'")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def cmd_methods(args: argparse.Namespace) -> int:
    """From the catalog: no torch, so it answers at once (``--write-catalog`` imports the methods)."""
    from blocklora.catalog import load_catalog, write_catalog

    if args.write_catalog:
        print(write_catalog())
        return 0
    catalog = load_catalog()
    width = max(map(len, catalog))
    print(f"{'method':{width}s}  summary")
    for name, entry in sorted(catalog.items()):
        print(f"{name:{width}s}  {entry['summary']}")
        if args.defaults:
            print(f"{'':{width}s}  defaults: {json.dumps(entry['defaults'])}")
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    from blocklora.data.fewshot import write_fewshot

    write_fewshot(args.split, args.shots, args.seed, args.out)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from blocklora.data.prepare import prepare_dataset

    path = prepare_dataset(
        args.dataset,
        args.data_root,
        archives_dir=args.archives_dir,
        download=not args.offline,
        sources=args.sources,
    )
    print(path)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from blocklora.data.prepare import fetch_dataset

    print(fetch_dataset(args.dataset, args.data_root, archives_dir=args.archives_dir, sources=args.sources))
    return 0


SPLIT_SOURCES = {
    "split_zhou": "CoOp's split file",
    "fgvc_official": "official variant lists",
    "imagenet_folders": "ILSVRC class folders",
    "eval_only": "test only (folders)",
}


def cmd_datasets(args: argparse.Namespace) -> int:
    from blocklora.data.registry import dataset_names, get_dataset

    rows = []
    for name in dataset_names():
        spec = get_dataset(name)
        manual = [s.filename for s in spec.sources if s.remote is None and s.kind != "split"]
        how = "generated (demo)" if spec.synthetic else ("manual download" if manual else "downloaded")
        split = "synthetic" if spec.synthetic else SPLIT_SOURCES[spec.split_source]
        rows.append((name, spec.title, str(spec.num_classes), split, how))
    header = ("dataset", "title", "classes", "split", "files")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                cell.rjust(w) if i == 2 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from blocklora.budget import lines
    from blocklora.plan import load_config

    plan = load_config(args.configfile, args.config, suites=args.suite)
    print("\n".join(lines(plan)))
    return 0


def cmd_fixtures(args: argparse.Namespace) -> int:
    from blocklora.data.fixtures import write_fixtures

    print(write_fixtures(args.out, args.datasets or None, seed=args.seed))
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from blocklora.data.synthetic import write_dataset

    print(write_dataset(args.dataset, args.data_root, seed=args.seed))
    return 0


def cmd_demo_corpus(args: argparse.Namespace) -> int:
    from pathlib import Path

    from blocklora.data.synthetic import CORPUS_FILE, write_corpus

    out = Path(args.out)
    if out.name != CORPUS_FILE:
        raise ValueError(f"--out must be a file named {CORPUS_FILE} (got {out})")
    print(write_corpus(out.parent, args.images, seed=args.seed))
    return 0


def cmd_pretrain_demo(args: argparse.Namespace) -> int:
    from blocklora.pretrain import pretrain

    stats = pretrain(
        args.backbone,
        args.corpus,
        args.out,
        steps=args.steps,
        seconds=args.seconds,
        seed=args.seed,
        threads=args.threads,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        data_root=args.data_root,
        stats_path=args.stats,
        progress=not args.no_progress,
    )
    print(json.dumps(stats, indent=2))
    return 0


def _claim_gpu_if_needed(device: str) -> None:
    """Before CUDA starts: on a multi-GPU node give this job one GPU of its own."""
    if device in ("auto", "cuda"):
        from blocklora.gpus import claim_gpu, default_lock_dir

        claim_gpu(default_lock_dir())


def _run_kwargs(args: argparse.Namespace) -> dict:
    """The arguments `train` and `transfer` share (see :func:`_add_run_arguments`)."""
    return {
        "method": args.method,
        "image_root": args.image_root,
        "shots": args.shots,
        "seed": args.seed,
        "backbone": args.backbone,
        "pretrained": args.pretrained,
        "hparams": args.hparams,
        "record": args.record,
        "device": args.device,
        "template": args.template,
        "module": args.module,
        "progress": not args.no_progress,
        "cache_dir": args.cache_dir,
        "threads": args.threads,
    }


def cmd_train(args: argparse.Namespace) -> int:
    _claim_gpu_if_needed(args.device)
    _set_threads(args.threads)
    from blocklora.experiment import run_experiment

    run_experiment(
        **_run_kwargs(args),
        dataset=args.dataset,
        fewshot=args.fewshot,
        state=args.state,
    )
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    _claim_gpu_if_needed(args.device)
    _set_threads(args.threads)
    from blocklora.experiment import run_transfer

    run_transfer(
        **_run_kwargs(args),
        source=args.source,
        source_fewshot=args.source_fewshot,
        state=args.state,
        target=args.dataset,
        target_split=args.split,
    )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    _claim_gpu_if_needed(args.device)
    _set_threads(args.threads)
    from blocklora.profiling import profile_method

    profile_method(
        args.method,
        args.backbone,
        args.pretrained,
        num_classes=args.classes,
        hparams=args.hparams,
        batch_size=args.batch_size,
        device=args.device,
        warmup=args.warmup,
        steps=args.steps,
        module=args.module,
        seed=args.seed,
        out=args.out,
    )
    return 0


def cmd_preload(args: argparse.Namespace) -> int:
    from blocklora.preload import enabled, server_dir, servers, stop_servers

    if args.stop:
        print(f"stopped {stop_servers()} preload server(s)")
        return 0
    running = servers()
    state = "on" if enabled() else "off (BLOCKLORA_PRELOAD, or inside a Slurm job)"
    print(f"preloading: {state}; servers in {server_dir()}: {len(running)}")
    for server in running:
        print(f"  pid {server['pid']}  {server['socket']}  log {server['log']}")
    return 0


def _named_file(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"expected NAME=PATH (e.g. fewshot=results/fewshot/...), got {text!r}"
        )
    return name, path


def cmd_record(args: argparse.Namespace) -> int:
    """Light (no torch): an external script's record, from any shell."""
    from blocklora.records import write_record

    if (args.shots is None) != (args.seed is None):
        raise ValueError(
            "give --shots and --seed together, or neither (a method that uses no few-shot subset)"
        )
    inputs = dict(args.input)
    if len(inputs) < len(args.input):
        raise ValueError(f"--input names a file twice: {[name for name, _ in args.input]}")
    write_record(
        args.record,
        method=args.method,
        dataset=args.dataset,
        shots=args.shots,
        seed=args.seed,
        backbone=args.backbone,
        pretrained=args.pretrained,
        accuracy=args.accuracy,
        test_size=args.test_size,
        num_classes=args.num_classes,
        device=args.device,
        trainable_params=args.trainable_params,
        total_params=args.total_params,
        iterations=args.iterations,
        train_seconds=args.train_seconds,
        eval_seconds=args.eval_seconds,
        peak_memory_mib=args.peak_memory_mib,
        hparams=args.hparams,
        stats=args.stats,
        inputs=inputs,
        code_version=args.code_version,
        rule=args.rule,
        command=args.command if args.command is not None else ["blocklora", *sys.argv[1:]],
    )
    print(args.record)
    return 0


def cmd_script(args: argparse.Namespace) -> int:
    """``python SCRIPT ARGS`` as a fresh interpreter would run it (``__main__``, ``sys.argv``, the
    script's folder first on the import path, a traceback and status 1 on an error), but started from
    the preloaded process, where torch and open_clip are imported already."""
    import runpy
    import traceback
    from pathlib import Path

    script = Path(args.script)
    if not script.is_file():
        raise FileNotFoundError(f"no script {script}")
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from blocklora.report import build_report

    lines = build_report(
        args.records,
        args.profiles,
        args.out_dir,
        suite=args.suite,
        methods=args.methods,
        datasets=args.datasets,
        shots=args.shots,
        note=args.note,
        allow_mixed=args.allow_mixed,
        left_out=args.left_out,
        average_over=args.average_over,
        reference=args.reference,
        published=args.published,
    )
    print("\n".join(lines))
    return 0


def _add_run_arguments(p: argparse.ArgumentParser, methods: str) -> None:
    """Arguments shared by `train` and `transfer`: which method, which backbone, where things go."""
    p.add_argument("--method", required=True, help=f"registered method: {methods}")
    p.add_argument("--image-root", required=True, help="folder the split's image paths are relative to")
    p.add_argument(
        "--shots",
        type=_positive_int,
        default=None,
        help="shots per class of the few-shot subset (omit for a method that uses none, e.g. zeroshot)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the few-shot subset (omit with --shots)")
    p.add_argument(
        "--backbone", required=True, help="open_clip model name, or a blocklora config (demo-tiny)"
    )
    p.add_argument("--pretrained", default=None, help="open_clip tag (openai), checkpoint file, or none")
    p.add_argument(
        "--hparams", type=_json_object, default={}, help="JSON object of hyper-parameter overrides"
    )
    p.add_argument("--record", required=True, help="where to write the run record (JSON)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--template", default=None, help="prompt template overriding the dataset's")
    p.add_argument("--module", default=None, help="import this module first (a method outside blocklora)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads of the job: torch, image decoding, loader workers (default: all)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="folder of what runs share: test images at evaluation resolution, frozen image features",
    )


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _method_names() -> str:
    from blocklora.catalog import load_catalog

    return ", ".join(sorted(load_catalog()))


def _dataset_names() -> str:
    from blocklora.data.registry import builtin_names

    return ", ".join(builtin_names())


def build_parser() -> argparse.ArgumentParser:
    import blocklora

    parser = argparse.ArgumentParser(
        prog="blocklora",
        description=__doc__,
        epilog="`blocklora COMMAND --help` explains a command; README.md explains the pipeline.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors"
    )
    parser.add_argument("--version", action="version", version=f"blocklora {blocklora.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    methods, datasets = _method_names(), _dataset_names()

    p = sub.add_parser("methods", help="list the registered methods (and their hyper-parameters)")
    p.add_argument("--defaults", action="store_true", help="also print each method's hyper-parameters")
    p.add_argument(
        "--write-catalog",
        action="store_true",
        help="regenerate blocklora/methods/catalog.json from the registry (after adding or changing a method)",
    )
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("datasets", help="list the registered datasets: classes, split, how they are obtained")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser(
        "plan", help="what a suite will cost before it runs: jobs, iterations, device-hours, downloads, disk"
    )
    p.add_argument("--suite", nargs="+", default=None, help="suite(s) to plan (default: config key `suite`)")
    p.add_argument("--configfile", default="config.yaml", help="the workflow's config (default: config.yaml)")
    p.add_argument(
        "--config",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides as snakemake takes them, e.g. without='[imagenet]' rehearse=true",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("download", help="download (or find) and verify the files of one dataset")
    _add_data_arguments(p, datasets)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("prepare", help="extract, check and split one dataset (downloading what is missing)")
    _add_data_arguments(p, datasets)
    p.add_argument("--offline", action="store_true", help="never download: use local archives only")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "fixtures", help="write miniatures of the real datasets' archives (for rehearsing the suites offline)"
    )
    p.add_argument("datasets", nargs="*", help=f"which (default: all of {datasets})")
    p.add_argument("--out", required=True, help="folder for the archives and sources.json (their checksums)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images' pixels")
    p.set_defaults(func=cmd_fixtures)

    p = sub.add_parser("demo-data", help="write one synthetic demo dataset (images + split.json)")
    p.add_argument("dataset", help="demo_shapes, demo_colors or demo_combos")
    p.add_argument("--data-root", required=True, help="the dataset goes to DATA_ROOT/<dataset>/")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn images")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo-corpus", help="write the demo's captioned pre-training corpus")
    p.add_argument("--out", required=True, help="the corpus file, .../corpus.npz")
    p.add_argument(
        "--images", type=_positive_int, default=8000, help="captioned images to draw (default 8000)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn images and captions")
    p.set_defaults(func=cmd_demo_corpus)

    p = sub.add_parser("pretrain-demo", help="pre-train the tiny demo CLIP contrastively on the corpus (CPU)")
    p.add_argument("--corpus", required=True, help="corpus.npz written by `blocklora demo-corpus`")
    p.add_argument("--backbone", default="demo-tiny", help="model config to pre-train (default demo-tiny)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--steps", type=_positive_int, default=1200, help="optimizer steps (default 1200)")
    p.add_argument(
        "--seconds", type=float, default=None, help="stop early after this long (not reproducible)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and the batches")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="image-caption pairs per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the matrices")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--data-root", default=None, help="report zero-shot accuracy on the demo datasets here")
    p.add_argument("--stats", default=None, help="write the pre-training statistics (JSON) here")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.set_defaults(func=cmd_pretrain_demo)

    p = sub.add_parser("fewshot", help="sample a few-shot subset of a split file (CoOp/Dassl protocol)")
    p.add_argument("split", help="split file: {train, val, test} lists of [path, label, classname]")
    p.add_argument("--shots", type=_positive_int, required=True, help="training images per class")
    p.add_argument("--seed", type=int, required=True, help="seed of the draw (1, 2, 3 reproduce CoOp's)")
    p.add_argument("--out", required=True, help="the few-shot file to write (JSON)")
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("train", help="train and evaluate one run: a method on a dataset's few-shot subset")
    _add_run_arguments(p, methods)
    p.add_argument("--dataset", required=True, help=f"the dataset's registered name: {datasets}")
    p.add_argument(
        "--fewshot",
        required=True,
        help="few-shot file (`blocklora fewshot`), or the split file for zero-shot",
    )
    p.add_argument(
        "--state",
        required=True,
        help="where to write the learned state: adapters, prompts, heads (safetensors)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "transfer", help="test a method trained on one dataset on another dataset's test split"
    )
    _add_run_arguments(p, methods)
    p.add_argument("--source", required=True, help="the dataset the method was trained on")
    p.add_argument("--source-fewshot", required=True, help="the few-shot file it was trained with")
    p.add_argument("--state", required=True, help="its learned state (the train job's state.safetensors)")
    p.add_argument("--dataset", required=True, help=f"the target dataset: {datasets}")
    p.add_argument("--split", required=True, help="the target's split file (its test split is used)")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("profile", help="parameters, FLOPs, step time, memory and latency of one method")
    p.add_argument("--method", required=True, help=f"registered method: {methods}")
    p.add_argument("--module", default=None, help="import this module first (a method outside blocklora)")
    p.add_argument(
        "--backbone", required=True, help="open_clip model name, or a blocklora config (demo-tiny)"
    )
    p.add_argument("--pretrained", default=None, help="open_clip tag, checkpoint file, or none")
    p.add_argument("--classes", type=_positive_int, required=True, help="classes of the synthetic task")
    p.add_argument(
        "--hparams", type=_json_object, default={}, help="JSON object of hyper-parameter overrides"
    )
    p.add_argument("--out", required=True, help="where to write the profile (JSON)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: the method's batch_size")
    p.add_argument("--steps", type=_positive_int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights' initialization and the batch")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: all)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        "preload", help="list (or --stop) the preloaded processes that start train/transfer/profile jobs"
    )
    p.add_argument("--stop", action="store_true", help="stop them (running jobs finish first)")
    p.set_defaults(func=cmd_preload)

    p = sub.add_parser(
        "record",
        help="write a run record from what an external script knows (a baseline run by a rule of its own)",
        description="Write a run record (workflow/schemas/record.schema.json) atomically, checked against "
        "the schema, with the protocol version, the sha256 of each --input, the command line, package "
        "versions and the time filled in. README: 'Adding a baseline as a rule'.",
    )
    p.add_argument("--record", required=True, help="the record file to write (the rule's output.record)")
    p.add_argument("--method", required=True, help="the method's name (a rule-made run: the rule's name)")
    p.add_argument("--dataset", required=True, help="the dataset tested on")
    p.add_argument(
        "--shots", type=_positive_int, default=None, help="shots per class (omit with --seed for none)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the few-shot subset")
    p.add_argument(
        "--backbone", required=True, help="open_clip model name (or a blocklora config: demo-tiny)"
    )
    p.add_argument(
        "--pretrained", default=None, help="open_clip tag or checkpoint file; none for random weights"
    )
    p.add_argument("--accuracy", type=float, required=True, help="top-1 test accuracy as a fraction (0.723)")
    p.add_argument("--test-size", type=_positive_int, required=True, help="test images the accuracy is over")
    p.add_argument("--num-classes", type=_positive_int, required=True, help="classes of the task")
    p.add_argument("--device", required=True, help="what it ran on, e.g. 'NVIDIA H100' or 'cpu'")
    p.add_argument("--trainable-params", type=int, default=0, help="parameters it learns (default 0)")
    p.add_argument("--total-params", type=int, default=None, help="all parameters, frozen ones included")
    p.add_argument("--iterations", type=int, default=None, help="training steps, where the code counts them")
    p.add_argument("--train-seconds", type=float, default=0.0, help="wall time of training (default 0)")
    p.add_argument("--eval-seconds", type=float, default=None, help="wall time of the test evaluation")
    p.add_argument("--peak-memory-mib", type=float, default=None, help="peak GPU memory")
    p.add_argument(
        "--hparams", type=_json_object, default={}, help="JSON object: the hyper-parameters it ran with"
    )
    p.add_argument(
        "--stats", type=_json_object, default={}, help="JSON object: free-form training statistics"
    )
    p.add_argument(
        "--input",
        type=_named_file,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an input file whose sha256 the record keeps (repeat: --input fewshot=F --input split=S)",
    )
    p.add_argument("--code-version", default=None, help="version of the external code, e.g. its git commit")
    p.add_argument("--rule", default=None, help="the workflow rule that ran it")
    p.add_argument(
        "--command", default=None, help="the command line that made the run (default: this command)"
    )
    p.set_defaults(func=cmd_record)

    p = sub.add_parser(
        "script",
        help="run a Python script as `python SCRIPT ARGS` would, from the preloaded process (torch imported)",
        description="Run SCRIPT with ARGS as `python SCRIPT ARGS` would, but started from the preload server "
        "(README, 'Job start-up'), where torch, torchvision and open_clip are imported already: a job of a "
        "baseline made by a rule of its own then starts in a fraction of a second instead of seconds.",
    )
    p.add_argument("script", help="the Python script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    p.set_defaults(func=cmd_script)

    p = sub.add_parser("report", help="tables and figures of a suite from run records and profiles")
    p.add_argument(
        "--records",
        nargs="+",
        required=True,
        help="record.json files, or folders holding them, each optionally LABEL=PATH (the table's row label)",
    )
    p.add_argument(
        "--profiles", nargs="*", default=[], help="profile JSON files or folders, each optionally LABEL=PATH"
    )
    p.add_argument("--out-dir", required=True, help="where the tables, figures and report.md go")
    p.add_argument("--suite", default=None, help="suite name, for titles and labels")
    p.add_argument("--methods", nargs="*", default=None, help="row order (and selection) of method entries")
    p.add_argument("--datasets", nargs="*", default=None, help="column order (and selection) of datasets")
    p.add_argument("--shots", nargs="*", type=int, default=None, help="shot counts to tabulate")
    p.add_argument("--note", default=None, help="a sentence printed at the top of report.md")
    p.add_argument("--allow-mixed", action="store_true", help="report records of different protocol versions")
    p.add_argument(
        "--left-out",
        nargs="*",
        default=[],
        help="datasets the suite names but the config leaves out (without:)",
    )
    p.add_argument(
        "--average-over", nargs="*", default=None, help="datasets of the Average column (default: all)"
    )
    p.add_argument(
        "--reference",
        default="blocklora",
        help="method entry every other one is compared with, pair by pair (default: blocklora)",
    )
    p.add_argument(
        "--published",
        default=None,
        help="YAML file of published numbers shown beside the measured ones (workflow/published/few_shot.yaml)",
    )
    p.set_defaults(func=cmd_report)
    return parser


def _add_data_arguments(p: argparse.ArgumentParser, datasets: str) -> None:
    p.add_argument("dataset", help=f"registered dataset: {datasets}")
    p.add_argument("--data-root", required=True, help="datasets live in DATA_ROOT/<dataset>/")
    p.add_argument("--archives-dir", default=None, help="folder of archives you already downloaded")
    p.add_argument(
        "--sources", default=None, help="JSON file of other URLs and checksums (a mirror, fixtures)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is not cmd_script:  # a script sets up its own logging, as under `python SCRIPT`
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        return args.func(args)
    except BrokenPipeError:  # `blocklora methods | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        log.error("%s", exc)
        if args.verbose:
            raise
        return 1


# Commands worth a preloaded process: those that import torch (or pandas and matplotlib).
HEAVY_COMMANDS = frozenset({"train", "transfer", "profile", "report", "pretrain-demo", "plan", "script"})


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand of a ``blocklora`` command line (its first argument that is not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def preload_imports() -> None:
    """What a preload server imports once for the heavy commands (no CUDA, no thread pool)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import seaborn  # noqa: F401
    import sklearn.linear_model  # noqa: F401

    import blocklora.experiment
    import blocklora.pretrain
    import blocklora.profiling
    import blocklora.report  # noqa: F401
    from blocklora.methods import method_names

    method_names()  # imports every method module


def entry() -> int:
    """The ``blocklora`` command line: heavy commands run in a preloaded process (:mod:`blocklora.preload`)."""
    from blocklora.preload import run

    argv = sys.argv[1:]
    heavy = command_of(argv) in HEAVY_COMMANDS
    code = run(argv, target="blocklora.cli:main", warm="blocklora.cli:preload_imports") if heavy else None
    return main() if code is None else code


if __name__ == "__main__":
    sys.exit(entry())
