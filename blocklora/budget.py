"""What a plan will cost, before it runs: jobs, iterations, device-hours, downloads and disk.

``blocklora plan`` prints it. Iterations come from the methods themselves (a LoRA run is
500 × shots steps, a CoOp run its epochs × batches of the few-shot set, …). Device-hours multiply
them by the step times of the suite's efficiency profiles wherever those exist (``snakemake
profiles`` measures them on the device it runs on, in minutes), and say which device that was.
Download sizes are the published archives' (:class:`blocklora.data.registry.Source`); extracted
data take about as much again (images in archives do not compress), and the evaluation cache holds
each dataset's test images at the backbone's resolution as uint8.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocklora.costs import device_hours, step_times
from blocklora.data.registry import get_dataset
from blocklora.plan import Plan, Run


@dataclass
class MethodCost:
    label: str
    runs: int = 0
    done: int = 0
    iterations: int = 0
    trains_on_features: bool = False
    hours: float | None = None
    prompts: int = 0  # through the text encoder, training and testing, over all runs
    images: int = 0  # through the image encoder, training and testing, over all runs
    rule: str | None = None  # made by this rule of its own: its code's cost is not known here


@dataclass
class RunCost:
    """What one run costs before it runs: generic-loop steps and prompts through the text encoder."""

    iterations: int
    on_features: bool
    prompts_train: int
    prompts_test: int
    images: int = 0  # through the image encoder, training and testing

    @property
    def prompts(self) -> int:
        return self.prompts_train + self.prompts_test


@dataclass
class Budget:
    """A plan's cost, method by method and dataset by dataset."""

    plan: Plan
    methods: dict[str, dict[str, MethodCost]] = field(default_factory=dict)  # suite -> label -> cost
    jobs: dict[str, int] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)
    unprofiled: set[str] = field(default_factory=set)
    largest: tuple[str, Run, RunCost] | None = None  # the run with the most prompts to encode


def run_cost(run: Run) -> RunCost:
    """Steps and text-encoder prompts of ``run``, from its method and its dataset's published sizes
    (none counted for a run made by a rule of its own: its code is not the library's)."""
    from blocklora.methods import FewShotTask, get_method

    if run.method.rule:
        return RunCost(0, False, 0, 0)

    method = get_method(run.method.library, run.method.module)
    if not run.method.needs_fewshot:
        return RunCost(0, False, 0, get_dataset(run.dataset).num_classes)
    spec = get_dataset(run.dataset)
    task = FewShotTask(
        dataset=run.dataset,
        classnames=[f"class {i}" for i in range(spec.num_classes)],
        template=spec.template,
        train=[("", c, "") for c in range(spec.num_classes) for _ in range(run.shots or 0)],
        val=[],
        test=[("", 0, "")] * int((spec.split_sizes or {}).get("test", 0)),
        image_root=Path("."),
        shots=run.shots or 0,
        seed=run.seed or 0,
    )
    instance = method(None, task, run.method.hparams)
    return RunCost(
        int(instance.iterations()),
        not method.trains_with_loop(),
        *instance.text_passes(),
        images=sum(instance.image_passes()),
    )


def iterations_of(run: Run) -> tuple[int, bool]:
    """(generic-loop iterations of ``run``, whether it trains on cached features instead)."""
    cost = run_cost(run)
    return cost.iterations, cost.on_features


def _profiles(plan: Plan) -> list[dict[str, Any]]:
    """The suite's profiles that exist already, labelled with the suites' entries."""
    found = []
    for suite in plan.suites.values():
        for label, profile in suite.profiles:
            path = Path(plan.results) / profile.path
            if path.is_file():
                found.append({**json.loads(path.read_text()), "label": f"{suite.name}:{label}"})
    return found


def budget(plan: Plan) -> Budget:
    result = Budget(plan)
    profiles = _profiles(plan)
    steps = step_times(profiles)
    result.devices = {str(p.get("device")) for p in profiles}
    for name, suite in plan.suites.items():
        costs: dict[str, MethodCost] = {}
        rows = []
        for label, run in suite.runs:
            cost = costs.setdefault(label, MethodCost(label, rule=run.method.rule))
            this = run_cost(run)
            cost.runs += 1
            cost.done += (Path(plan.results) / run.folder / "record.json").is_file()
            cost.iterations += this.iterations
            cost.trains_on_features = this.on_features
            cost.prompts += this.prompts
            cost.images += this.images
            if result.largest is None or this.prompts > result.largest[2].prompts:
                result.largest = (label, run, this)
            rows.append(
                {
                    "label": f"{name}:{label}",
                    "num_classes": get_dataset(run.dataset).num_classes,
                    "iterations": this.iterations,
                }
            )
        hours = device_hours(rows, steps)
        for label, cost in costs.items():
            cost.hours = hours.get(f"{name}:{label}")
            if cost.hours is None and cost.iterations and not any(m == f"{name}:{label}" for m, _ in steps):
                result.unprofiled.add(label)
        result.methods[name] = costs
    runs = plan.all_runs().values()
    result.jobs = {
        "train": sum(not run.method.rule for run in runs),
        **{
            rule: sum(run.method.rule == rule for run in runs)
            for rule in sorted({r.method.rule for r in runs} - {None})
        },
        "transfer": len(plan.all_transfers()),
        "profile": len(plan.all_profiles()),
        "report": len(plan.suites),
    }
    return result


def _millions(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.1f} G"
    if count >= 1e6:
        return f"{count / 1e6:.1f} M"
    if count >= 1e3:
        return f"{count / 1e3:.1f} k"
    return str(count)


def _size(nbytes: float | None) -> str:
    if nbytes is None:
        return "unknown"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def image_size(backbone: str) -> int:
    """The input resolution of a backbone, from its model config (no model built)."""
    import open_clip

    from blocklora.clip import register_configs

    register_configs()
    config = open_clip.get_model_config(backbone) or {}
    size = config.get("vision_cfg", {}).get("image_size", 224)
    return size[0] if isinstance(size, list | tuple) else int(size)


def data_lines(plan: Plan) -> list[str]:
    """Per dataset: what is downloaded, what it takes on disk, and the evaluation cache."""
    side = max(image_size(plan.setup(name).backbone) for name in plan.suites)
    lines = [f"{'dataset':16s} {'download':>10s} {'on disk':>10s} {'eval cache':>11s}  how"]
    totals: dict[str, float] = defaultdict(float)
    unknown = []
    for name in plan.datasets_used():
        spec = get_dataset(name)
        if spec.synthetic:
            lines.append(f"{name:16s} {'-':>10s} {'-':>10s} {'-':>11s}  generated here (demo)")
            continue
        archives = [s.size for s in spec.sources if s.kind != "split"]
        download = sum(s for s in archives if s) if archives and all(archives) else None
        test = (spec.split_sizes or {}).get("test", 0)
        cache = test * side * side * 3
        manual = [s.filename for s in spec.sources if s.remote is None and s.kind != "split"]
        how = f"manual: {', '.join(manual)}" if manual else "downloaded"
        split = spec.split_file_source()
        if split is not None:
            how += " + CoOp split file (Google Drive)"
        if download is None:
            unknown.append(name)
        else:
            totals["download"] += download
        totals["cache"] += cache
        disk = None if download is None else 2 * download
        lines.append(f"{name:16s} {_size(download):>10s} {_size(disk):>10s} {_size(cache):>11s}  {how}")
    lines.append(
        f"{'total':16s} {_size(totals['download']):>10s} {_size(2 * totals['download']):>10s} "
        f"{_size(totals['cache']):>11s}"
        + (f"  (+ {', '.join(unknown)}: size not published)" if unknown else "")
    )
    lines.append(
        "on disk: archives plus what they extract to (about as much again: images do not compress); "
        "delete the archives after `prepare` to keep half."
    )
    return lines


def lines(plan: Plan) -> list[str]:
    """``blocklora plan``'s report."""
    cost = budget(plan)
    out = []
    for name, suite in plan.suites.items():
        setup = plan.setup(name)
        out.append(
            f"suite {name}: {setup.backbone} ({setup.pretrained or 'random weights'}), "
            f"{len(suite.datasets)} datasets, {len(suite.entries)} methods, shots {suite.shots}, seeds {suite.seeds}"
        )
        if suite.targets:
            out.append(f"  tested also on: {', '.join(suite.targets)} ({len(suite.transfers)} transfer jobs)")
        if suite.left_out:
            out.append(f"  left out (without:): {', '.join(suite.left_out)}")
        header = (
            f"{'method':18s} {'runs':>6s} {'done':>6s} {'iterations':>12s} {'prompts':>10s} {'images':>10s} "
            f"{'device-hours':>13s}"
        )
        out.append(f"  {header}")
        for label, method in cost.methods[name].items():
            if method.rule:
                hours = f"{'own rule':>13s}"
            elif method.hours is not None:
                hours = f"{method.hours:13.2f}"
            elif method.trains_on_features:
                hours = f"{'features':>13s}"
            elif method.iterations == 0:
                hours = f"{'-':>13s}"
            else:
                hours = f"{'no profile':>13s}"
            out.append(
                f"  {label:18s} {method.runs:6d} {method.done:6d} {method.iterations:12,d} "
                f"{_millions(method.prompts):>10s} {_millions(method.images):>10s} {hours}"
            )
        known = [m.hours for m in cost.methods[name].values() if m.hours is not None]
        if known:
            out.append(f"  {'total':18s} {'':6s} {'':6s} {'':12s} {'':10s} {'':10s} {sum(known):13.2f}")
    out.append("")
    jobs = ", ".join(f"{count} {kind}" for kind, count in cost.jobs.items())
    out.append(f"jobs (each run once, whatever suites ask for it): {jobs}")
    if cost.devices:
        out.append(
            f"device-hours: training steps only, from the profiles measured on {', '.join(sorted(cost.devices))}"
        )
    if cost.unprofiled:
        chosen = plan.chosen[0] if len(plan.chosen) == 1 else f"[{','.join(plan.chosen)}]"
        out.append(
            f"no step time yet for {', '.join(sorted(cost.unprofiled))}: `snakemake profiles --cores 1 "
            f"--resources gpu=1 --config suite={chosen}` measures them (one short job per method) on the "
            "machine that runs it"
        )
    out.append("'features': trains on cached frozen features, minutes per run; '-': trains nothing")
    made_by = sorted({m.rule for costs in cost.methods.values() for m in costs.values() if m.rule})
    if made_by:
        out.append(
            f"'own rule': made by a rule of its own ({', '.join(made_by)}), whose code's cost is not known here: "
            "neither its steps nor its device-hours are counted"
        )
    out.append(
        "prompts, images: through the text and the image encoder, training and testing (a step encodes every "
        "class's prompt, CoCoOp's for every image; PLOT++ sees each image once per image prompt)"
    )
    if cost.largest is not None:
        label, run, this = cost.largest
        cell = f"{run.shots} shots, seed {run.seed}" if run.shots is not None else "no few-shot subset"
        out.append(
            f"most prompts in one run: {label} on {run.dataset} ({cell}): {this.iterations:,} steps, "
            f"{_millions(this.prompts_train)} prompts in training and {_millions(this.prompts_test)} at test time"
        )
    out.append("")
    out += data_lines(plan)
    return out
