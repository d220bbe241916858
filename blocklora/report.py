"""Tables and figures of a suite, from run records and profile files; importable from a notebook.

    runs = load_runs(paths)                    # one row per record, accuracy in % as ``acc``
    summary = accuracy_summary(runs)           # mean ± std over seeds per (method, dataset, shots)
    accuracy_table(summary, shots=16)          # rows = methods, columns = datasets + Average
    pairs = paired_differences(runs, "blocklora")  # each method against Block-LoRA on the same subsets
    paired_summary(pairs, ["lora"], [1, 16])   # n, mean difference, 95 % interval, wins/ties/losses
    write_report(runs, profiles, out_dir)      # everything `blocklora report` writes (.files, .lines)

Records and profiles are given as files or folders, each optionally labelled ``LABEL=PATH``: a
suite's report labels them with its entries of ``methods:`` (``blocklora_n4`` for a variant), which
the workflow passes. An unlabelled record is labelled with its method, or with its run folder
(``lora-1a2b3c4d``) when several configurations of one method are loaded.

A run of a method that learns nothing from the few-shot set (zero-shot CLIP: no shots, no seed)
stands in every shot column, and in the paired comparison it pairs with every seed of the reference.

Published numbers of other papers (:mod:`blocklora.published`) are shown beside the measured ones,
as separate rows with their sources; they never enter the runs, the measured tables, their averages
or the paired comparison.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from blocklora.io import atomic_path, write_text
from blocklora.published import FEW_SHOT_DATASETS, PublishedEntry, load_published, same_backbone

AVERAGE = "Average"
MISSING = "–"
NOT_PROFILED = "not profiled"  # an efficiency cell of a method made by a rule of its own
REFERENCE = "blocklora"  # the entry the paired comparison measures every other one against
CONFIDENCE = 0.95
TIE = 1e-9  # points: a smaller difference of two accuracies is a tie
METHOD_TITLES = {
    "zeroshot": "Zero-shot CLIP",
    "linear_probe": "Linear probe",
    "coop": "CoOp",
    "cocoop": "CoCoOp",
    "kgcoop": "KgCoOp",
    "prograd": "ProGrad",
    "taskres": "TaskRes",
    "maple": "MaPLe",
    "promptsrc": "PromptSRC",
    "plotpp": "PLOT++",
    "clip_adapter": "CLIP-Adapter",
    "tip_adapter": "Tip-Adapter",
    "tip_adapter_f": "Tip-Adapter-F",
    "lora": "LoRA",
    "blocklora": "Block-LoRA",
    "knn": "k-NN (CLIP features)",
}
PROFILE_FIELDS = (
    "method",
    "trainable_params",
    "total_params",
    "train_flops_per_step",
    "step_ms",
    "peak_memory_mib",
    "latency_ms_merged",
    "latency_ms_frozen",
)
# Every file write_report puts in out_dir (workflow/rules/report.smk lists the same names).
REPORT_FILES = (
    "runs.csv",
    "accuracy.csv",
    "accuracy.md",
    "accuracy.tex",
    "efficiency.csv",
    "efficiency.md",
    "efficiency.tex",
    "accuracy_vs_shots.png",
    "accuracy_vs_shots.pdf",
    "accuracy_vs_params.png",
    "accuracy_vs_params.pdf",
    "efficiency.png",
    "efficiency.pdf",
    "paired.csv",
    "paired.md",
    "paired.tex",
    "published.csv",
    "published.md",
    "report.md",
)
PAIRED_COLUMNS = (
    "label", "method", "reference", "shots", "n", "mean_diff", "ci_low", "ci_high", "wins", "ties", "losses",
)  # fmt: skip
PUBLISHED_COLUMNS = (
    "method", "title", "backbone", "dataset", "shots", "accuracy", "computed", "source", "url", "note",
)  # fmt: skip


@dataclass
class WrittenReport:
    """What :func:`write_report` wrote: the files by name, and the summary at the top of report.md."""

    files: dict[str, Path]
    lines: list[str]


_FIRST_COLUMNS = ("label", "method", "dataset", "suite", "shots", "seed", "accuracy", "acc")


# ------------------------------------------------------------------ names


def method_title(label: str) -> str:
    """Display name of a method entry: ``blocklora`` -> Block-LoRA; variants keep their entry name."""
    return METHOD_TITLES.get(label, label)


@functools.cache
def dataset_title(name: str) -> str:
    """Display name of a dataset from the registry (ImageNet, OxfordPets, ...), else the name itself."""
    try:
        from blocklora.data.registry import get_dataset

        return get_dataset(name).title
    except Exception:  # a title is cosmetic: a registry that cannot answer must not stop the report
        return name


# ------------------------------------------------------------------ loading


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"cannot read {what} {path} ({exc}); delete it and rerun the job that writes it"
        ) from exc
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} is not a JSON object; delete it and rerun the job that writes it")
    return value


Sources = Iterable[str | Path] | str | Path


def _labelled(paths: Sources, pattern: str) -> list[tuple[str | None, Path]]:
    """(label or None, file) for files as given (``LABEL=PATH`` or ``PATH``) and every ``pattern``
    match under folders given."""
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[tuple[str | None, Path]] = []
    for item in paths:
        label, _, path = str(item).rpartition("=") if "=" in str(item) else (None, "", str(item))
        path = Path(path)
        matches = sorted(path.rglob(pattern)) if path.is_dir() else [path]
        files.extend((label or None, match) for match in matches)
    return files


def _default_labels(runs: pd.DataFrame) -> list[str]:
    """The method; its run folder (``lora-1a2b3c4d``) where one method comes in several configurations."""
    folders = [Path(p).parent.parent.name for p in runs["path"]]
    configurations = pd.Series(folders).groupby(runs["method"].values).nunique()
    return [
        folder if configurations[method] > 1 else str(method)
        for method, folder in zip(runs["method"], folders, strict=True)
    ]


def check_protocol_versions(runs: pd.DataFrame) -> None:
    """Refuse records of different protocol versions: their numbers are not comparable."""
    versions = runs.get("protocol_version", pd.Series(index=runs.index, dtype=object))
    versions = versions.map(lambda v: "unversioned" if pd.isna(v) else f"version {int(v)}")
    if versions.nunique() <= 1:
        return
    groups = "; ".join(
        f"{version}: {len(paths)} record(s), e.g. {paths.iloc[0]}"
        for version, paths in runs["path"].groupby(versions)
    )
    raise ValueError(
        f"records from different protocol versions ({groups}); rerun the older runs, "
        "or pass --allow-mixed to report them together anyway"
    )


def load_runs(paths: Sources, *, allow_mixed: bool = False) -> pd.DataFrame:
    """Run records (``[LABEL=]PATH`` files, or every record.json under folders) as one row each,
    plus ``label`` and ``acc`` (%)."""
    from blocklora.records import load_records

    files = _labelled(paths, "record.json")
    if not files:
        raise ValueError(f"no run records found in {paths}; run the train jobs first")
    runs = load_records([path for _, path in files])
    if not allow_mixed:
        check_protocol_versions(runs)
    defaults = _default_labels(runs)
    runs.insert(0, "label", [label or default for (label, _), default in zip(files, defaults, strict=True)])
    runs["acc"] = 100.0 * runs["accuracy"].astype(float)
    first = [c for c in _FIRST_COLUMNS if c in runs.columns]
    runs = runs[first + [c for c in runs.columns if c not in first]]
    return runs.sort_values(["label", "dataset", "shots", "seed"], kind="stable").reset_index(drop=True)


def load_profiles(paths: Sources) -> pd.DataFrame:
    """Profile files (``[LABEL=]PATH``, or folders of them) as one row each; unlabelled ones take
    their method's name."""
    rows = []
    for label, path in _labelled(paths, "*.json"):
        profile = _read_json(path, "profile")
        rows.append({"label": label or str(profile.get("method") or path.stem), **profile, "path": str(path)})
    columns = ["label", *PROFILE_FIELDS, "path"]
    frame = pd.DataFrame(rows)
    return frame.reindex(columns=[*columns, *[c for c in frame.columns if c not in columns]])


def in_every_shot_column(runs: pd.DataFrame, shots: Sequence[int]) -> pd.DataFrame:
    """Runs that used no few-shot subset (``shots`` empty) repeated under each of ``shots``."""
    independent = runs["shots"].isna()
    if not independent.any():
        return runs
    copies = [runs[independent].assign(shots=k) for k in shots]
    expanded = pd.concat([runs[~independent], *copies], ignore_index=True)
    expanded["shots"] = expanded["shots"].astype(int)
    return expanded


# ------------------------------------------------------------------ numbers


def _shots_text(shots: int) -> str:
    return f"{shots} shot" if shots == 1 else f"{shots} shots"


def _order(values: Iterable[Any], preferred: Sequence[Any] | None) -> list[Any]:
    present = list(dict.fromkeys(values))
    if preferred:
        return [v for v in preferred if v in present]
    return present


def accuracy_summary(runs: pd.DataFrame, average_over: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof 1) of accuracy (%) over seeds, per (label, dataset, shots).

    The ``Average`` dataset is the mean over datasets (``average_over``, default all; a transfer
    suite averages its targets) of each seed's accuracies, then mean ± std over seeds; it is left out
    for a (label, shots) that lacks any of those datasets.
    """
    keys = ["label", "dataset", "shots"]
    per_dataset = runs.groupby(keys, sort=False)["acc"].agg(mean="mean", std="std", n="count").reset_index()
    datasets = set(average_over or runs["dataset"])
    averaged = runs[runs["dataset"].isin(datasets)]
    per_seed = averaged.groupby(["label", "shots", "seed"], sort=False, dropna=False).agg(
        acc=("acc", "mean"), datasets=("dataset", "nunique")
    )
    complete = per_seed[per_seed["datasets"] == len(datasets)].reset_index()
    average = complete.groupby(["label", "shots"], sort=False)["acc"].agg(mean="mean", std="std", n="count")
    average = average.reset_index().assign(dataset=AVERAGE)
    return pd.concat([per_dataset, average[per_dataset.columns]], ignore_index=True)


def format_mean_std(mean: float, std: float, decimals: int = 1) -> str:
    """``72.3 ± 0.4``; the mean alone for a single seed; ``–`` when missing."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return MISSING
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def accuracy_table(
    summary: pd.DataFrame,
    shots: int,
    methods: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    decimals: int = 1,
) -> pd.DataFrame:
    """One shot count: rows = method titles, columns = dataset titles + Average, cells ``mean ± std``."""
    rows = summary[summary["shots"] == shots]
    methods = _order(rows["label"], methods) if methods else _order(summary["label"], None)
    datasets = list(datasets) if datasets else [d for d in _order(summary["dataset"], None) if d != AVERAGE]
    cells = {(r.label, r.dataset): format_mean_std(r.mean, r.std, decimals) for r in rows.itertuples()}
    table = pd.DataFrame(
        [[cells.get((m, d), MISSING) for d in [*datasets, AVERAGE]] for m in methods],
        index=pd.Index([method_title(m) for m in methods], name="Method"),
        columns=[dataset_title(d) for d in datasets] + [AVERAGE],
    )
    return table


def _count(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    value = float(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def _number(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return format(float(value), fmt)


def _missing(value: Any) -> bool:
    """None or NaN; containers (a profile's list of step times) are values, never missing."""
    return not isinstance(value, list | tuple | dict) and bool(pd.isna(value))


def unprofiled_rows(runs: pd.DataFrame, profiles: pd.DataFrame) -> pd.DataFrame:
    """A row per label made by a rule of its own (external records) that has no profile: its trainable
    and total parameters as its records state them (median), ``profiled`` False and the ``rule``."""
    columns = ["label", "method", "trainable_params", "total_params", "profiled", "rule"]
    if "external" not in runs.columns:
        return pd.DataFrame(columns=columns)
    profiled = set(profiles["label"]) if "label" in profiles.columns else set()
    external = runs[runs["external"].map(lambda v: v is True)]
    rows = []
    for label, group in external.groupby("label", sort=False):
        if label in profiled:
            continue
        rules = [r for r in group.get("rule", pd.Series(dtype=object)) if isinstance(r, str)]
        total = pd.to_numeric(group.get("total_params"), errors="coerce").median()
        rows.append(
            {
                "label": label,
                "method": str(group["method"].iloc[0]),
                "trainable_params": pd.to_numeric(group["trainable_params"], errors="coerce").median(),
                "total_params": None if pd.isna(total) else total,
                "profiled": False,
                "rule": rules[0] if rules else None,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def _with_unprofiled(profiles: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The profiles, and a row for each method made by a rule of its own (:func:`unprofiled_rows`)."""
    extra = unprofiled_rows(runs, profiles)
    if extra.empty:
        return profiles
    if profiles.empty:
        return extra.reset_index(drop=True)
    return pd.concat([profiles.astype(object), extra.astype(object)], ignore_index=True)


def unprofiled_note(rows: pd.DataFrame, methods: Sequence[str] | None = None) -> str:
    """The sentence under the efficiency table on the methods it could not profile (none: empty)."""
    if "profiled" not in rows.columns:
        return ""
    unprofiled = rows[rows["profiled"].map(lambda v: v is False)]
    labels = _order(unprofiled["label"], methods) if methods else list(unprofiled["label"])
    if not labels:
        return ""
    rules = dict(zip(unprofiled["label"], unprofiled["rule"], strict=True))
    named = ", ".join(
        f"{method_title(label)} (rule `{rules[label]}`)"
        if isinstance(rules[label], str)
        else method_title(label)
        for label in labels
    )
    return (
        f"{NOT_PROFILED.capitalize()}: {named}, made by code of its own outside the library, which the "
        "efficiency profile cannot run (README, 'Adding a baseline as a rule'); trainable parameters as "
        "its records state them.\n"
    )


def efficiency_table(profiles: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows = methods; trainable params, FLOPs per training step, step time, peak memory, latency ratio.

    A row whose ``profiled`` is False (:func:`unprofiled_rows`: a method made by a rule of its own)
    shows its trainable parameters and ``not profiled`` in the measured columns."""
    if profiles.empty:
        return pd.DataFrame(columns=["Method"]).set_index("Method")
    by_label = {row["label"]: row for _, row in profiles.iterrows()}
    labels = _order(by_label, methods) if methods else list(by_label)
    rows = []
    for label in labels:
        p = {k: (None if _missing(v) else v) for k, v in by_label[label].items()}
        trainable, total = p.get("trainable_params"), p.get("total_params")
        merged, frozen = p.get("latency_ms_merged"), p.get("latency_ms_frozen")
        measured = p.get("profiled") is not False
        rows.append(
            {
                "Method": method_title(label),
                "Trainable params": MISSING if trainable is None else f"{int(trainable):,}",
                "Trainable (%)": MISSING
                if not (trainable is not None and total)
                else f"{100 * trainable / total:.3f}",
                "Train FLOPs/step": _count(p.get("train_flops_per_step")) if measured else NOT_PROFILED,
                "Step (ms)": _number(p.get("step_ms"), ".1f") if measured else NOT_PROFILED,
                "Peak memory (MiB)": _number(p.get("peak_memory_mib"), ".0f") if measured else NOT_PROFILED,
                "Latency merged / frozen": NOT_PROFILED
                if not measured
                else MISSING
                if not (merged is not None and frozen)
                else f"{merged / frozen:.2f}×",
            }
        )
    return pd.DataFrame(rows).set_index("Method")


# ------------------------------------------------------------------ paired comparison


def paired_differences(
    runs: pd.DataFrame,
    reference: str = REFERENCE,
    shots: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Every (label, shots, dataset, seed) where a label and the reference both have a run: both
    accuracies (%) and ``diff`` = label − reference, in points.

    Runs of one seed share its few-shot subset, so they pair by seed; a run without a seed (zero-shot)
    pairs with every seed of the other side and stands under each of ``shots`` (default: the measured
    ones). ``methods`` and ``datasets`` restrict the pairs (a report passes the Average's datasets).
    """
    columns = ["label", "shots", "dataset", "seed", "acc", "reference_acc", "diff"]
    measured = sorted(int(k) for k in runs["shots"].dropna().unique())
    runs = in_every_shot_column(runs, list(shots) if shots else measured)
    if datasets:
        runs = runs[runs["dataset"].isin(list(datasets))]
    keys = ["label", "dataset", "shots", "seed"]
    acc = runs.groupby(keys, sort=False, dropna=False)["acc"].mean().reset_index()
    ref = acc[acc["label"] == reference].drop(columns="label").rename(columns={"acc": "reference_acc"})
    others = acc[acc["label"] != reference]
    if methods:
        others = others[others["label"].isin(list(methods))]
    cell = ["dataset", "shots"]
    seeded, seedless = others[others["seed"].notna()], others[others["seed"].isna()]
    pairs = pd.concat(
        [
            seeded.merge(ref[ref["seed"].notna()], on=[*cell, "seed"]),
            seeded.merge(ref[ref["seed"].isna()].drop(columns="seed"), on=cell),
            seedless.drop(columns="seed").merge(ref, on=cell),
        ],
        ignore_index=True,
    )
    pairs["diff"] = pairs["acc"] - pairs["reference_acc"]
    return pairs.reindex(columns=columns).sort_values(
        ["label", "shots", "dataset", "seed"], ignore_index=True
    )


def paired_summary(
    pairs: pd.DataFrame, methods: Sequence[str], shots: Sequence[int], reference: str = REFERENCE
) -> pd.DataFrame:
    """Per (method, shots): pairs n, mean difference (points), its 95 % Student-t interval (none
    when n < 2), and the pairs won (difference > 0), tied and lost."""
    from scipy import stats

    rows = []
    for label in methods:
        for k in shots:
            d = pairs.loc[(pairs["label"] == label) & (pairs["shots"] == k), "diff"].to_numpy(dtype=float)
            n = len(d)
            mean = float(d.mean()) if n else math.nan
            low = high = math.nan
            if n >= 2:
                half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
                low, high = mean - half, mean + half
            rows.append(
                {"label": label, "method": method_title(label), "reference": reference, "shots": int(k),
                 "n": n, "mean_diff": mean, "ci_low": low, "ci_high": high, "wins": int((d > TIE).sum()),
                 "ties": int((abs(d) <= TIE).sum()), "losses": int((d < -TIE).sum())}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


def _signed(value: float, decimals: int = 1) -> str:
    """``+1.2``, ``−2.3`` (a minus sign), ``0.0``."""
    text = f"{value:+.{decimals}f}"
    if float(text) == 0:
        return text[1:]
    return text.replace("-", "−")


def format_paired(row: Any, decimals: int = 1) -> str:
    """``−2.3 [−3.1, −1.5], 4/33 wins``; no interval for one pair; ``–`` for none."""
    if not row.n:
        return MISSING
    text = _signed(row.mean_diff, decimals)
    if row.n >= 2:
        text += f" [{_signed(row.ci_low, decimals)}, {_signed(row.ci_high, decimals)}]"
    return f"{text}, {row.wins}/{row.n} wins"


def paired_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows = method titles, columns = shot counts, cells :func:`format_paired`."""
    methods = _order(summary["label"], None)
    shots = _order(summary["shots"], None)
    cells = {(r.label, r.shots): format_paired(r) for r in summary.itertuples()}
    return pd.DataFrame(
        [[cells[(m, k)] for k in shots] for m in methods],
        index=pd.Index([method_title(m) for m in methods], name="Method"),
        columns=[_shots_text(k) for k in shots],
    )


def _paired_text(reference: str, average_over: Sequence[str]) -> str:
    """What the paired numbers are, and how far the interval can be trusted."""
    name = method_title(reference)
    over = ", ".join(dataset_title(d) for d in average_over)
    return (
        f"Each cell compares a method with {name} on the same few-shot subsets: the mean over "
        f"(dataset, seed) pairs of its accuracy minus {name}'s, in points (negative: below {name}), the "
        f"{100 * CONFIDENCE:.0f} % confidence interval of that mean (Student t; none for a single pair) and the "
        f"pairs it wins out of all; a run without a seed (zero-shot CLIP, run once per dataset) pairs with "
        "every seed. "
        f"Datasets: {over}. The interval treats the pairs as independent, though the seeds of one "
        "dataset share its test set: read it as a lower bound on the uncertainty.\n"
    )


# ------------------------------------------------------------------ published numbers


def published_frame(entries: Sequence[PublishedEntry]) -> pd.DataFrame:
    """Every published number, one row each, plus the averages computed from 11 datasets (``computed``)."""
    rows = []
    for e in entries:
        about = {"source": e.source, "url": e.url, "note": e.note}
        for dataset, values in e.accuracy.items():
            for k, value in sorted(values.items()):
                rows.append({"method": e.method, "title": e.title, "backbone": e.backbone, "dataset": dataset,
                             "shots": k, "accuracy": value, "computed": False, **about})  # fmt: skip
        for k in e.shot_counts():
            if e.average_is_computed(k):
                rows.append({"method": e.method, "title": e.title, "backbone": e.backbone, "dataset": "average",
                             "shots": k, "accuracy": e.average(k), "computed": True, **about})  # fmt: skip
    return pd.DataFrame(rows, columns=list(PUBLISHED_COLUMNS))


def _published_cell(value: float | None, decimals: int) -> str:
    return MISSING if value is None else f"{value:.{decimals}f}"


def published_table(
    entries: Sequence[PublishedEntry], shots: int, datasets: Sequence[str], decimals: int = 1
) -> pd.DataFrame:
    """One shot count: rows = entries with a number there, columns = those of ``datasets`` they give,
    + Average (published, or the mean of the 11); an entry's missing cell is ``–``."""
    shown = [
        e
        for e in entries
        if e.average(shots) is not None or any(e.value(d, shots) is not None for d in datasets)
    ]
    columns = [d for d in datasets if any(e.value(d, shots) is not None for e in shown)]
    cells = [
        [
            *(_published_cell(e.value(d, shots), decimals) for d in columns),
            _published_cell(e.average(shots), decimals),
        ]
        for e in shown
    ]
    return pd.DataFrame(
        cells,
        index=pd.Index([e.title for e in shown], name="Method"),
        columns=[*(dataset_title(d) for d in columns), AVERAGE],
    )


def _published_sources(entries: Sequence[PublishedEntry], shots: int | None = None) -> str:
    """``Sources: PLOT++: Chen et al., …, URL (ViT-B/16); …``, saying whose Average is computed here."""
    parts = []
    for e in entries:
        computed = (
            e.average_is_computed(shots)
            if shots is not None
            else any(e.average_is_computed(k) for k in e.shot_counts())
        )
        average = "; its Average is the mean of its 11 datasets, computed here" if computed else ""
        parts.append(f"{e.method}: {e.source}, {e.url} ({e.backbone}{average})")
    return "Sources: " + "; ".join(parts) + ".\n"


def suite_backbone(runs: pd.DataFrame) -> str:
    """The backbone of the runs (several joined by ``, ``)."""
    names = list(dict.fromkeys(str(b) for b in runs.get("backbone", pd.Series(dtype=object)).dropna()))
    return ", ".join(names) or "unknown"


def is_transfer(runs: pd.DataFrame) -> bool:
    """True when some runs were tested on a dataset they did not train on (cross-dataset, domain shift)."""
    return "source_dataset" in runs.columns and bool(runs["source_dataset"].notna().any())


def comparable_published(
    entries: Sequence[PublishedEntry], runs: pd.DataFrame, average_over: Sequence[str]
) -> list[PublishedEntry]:
    """The entries whose published Average may be drawn beside the measured one: same backbone as every
    run, the measured Average over the same 11 datasets, and no transfer."""
    backbones = set(runs.get("backbone", pd.Series(dtype=object)).dropna())
    if is_transfer(runs) or len(backbones) != 1 or set(average_over) != set(FEW_SHOT_DATASETS):
        return []
    backbone = str(backbones.pop())
    return [e for e in entries if same_backbone(e.backbone, backbone)]


def _published_context(
    entries: Sequence[PublishedEntry], runs: pd.DataFrame, average_over: Sequence[str]
) -> str:
    """One or two sentences: what the published rows are, and why they are or are not comparable."""
    text = "Published rows (not run here) are other papers' numbers, each with its source; they stay out "
    text += "of the measured tables, their averages and the paired comparison."
    backbone = suite_backbone(runs)
    others = sorted({e.backbone for e in entries if not same_backbone(e.backbone, backbone)})
    foreign = not set(average_over) <= set(FEW_SHOT_DATASETS)
    if others:
        datasets = " on other datasets" if foreign else ""
        text += (
            f" They were measured with {', '.join(others)}{datasets}, this suite with {backbone}: they are "
            "context, not comparable."
        )
    elif foreign:
        text += " They were measured on other datasets than this suite's: context, not comparable."
    elif set(average_over) != set(FEW_SHOT_DATASETS):
        text += (
            f" Their Average is over the 11 datasets, this suite's over {len(average_over)}: compare the "
            "dataset columns, not the averages."
        )
    return text + "\n"


# ------------------------------------------------------------------ text formats


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (index as the first column)."""
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", *["---:"] * len(table.columns)]) + "|"]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index), *map(str, row)]) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}"}


def _latex_escape(text: str) -> str:
    text = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return text.replace("±", r"$\pm$").replace("×", r"$\times$").replace("–", "--").replace("−", "$-$")


def to_latex(table: pd.DataFrame, caption: str = "", label: str = "") -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    lines = [r"\begin{table}[t]", r"\centering", r"\small"]
    if caption:
        lines.append(rf"\caption{{{_latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [
        r"\begin{tabular}{l" + "r" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(map(_latex_escape, [table.index.name or "", *table.columns])) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(map(_latex_escape, [i, *row])) + r" \\" for i, row in table.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt


def _palette(labels: Sequence[str]) -> dict[str, Any]:
    import seaborn as sns

    return dict(zip(labels, sns.color_palette("tab10", n_colors=max(len(labels), 1)), strict=False))


def plot_accuracy_vs_shots(
    summary: pd.DataFrame,
    methods: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    published: Sequence[PublishedEntry] = (),
):
    """A grid of panels (datasets + Average): accuracy vs shots, mean line and ± std band over seeds;
    ``published`` averages as grey dashed lines with hollow markers in the Average panel."""
    plt = _pyplot()
    methods = _order(summary["label"], methods)
    datasets = list(datasets) if datasets else [d for d in _order(summary["dataset"], None) if d != AVERAGE]
    panels = [*datasets, AVERAGE]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    colors = _palette(methods)
    shots = sorted(summary["shots"].unique())
    for ax, dataset in zip(axes.flat, panels, strict=False):
        for label in methods:
            rows = summary[(summary["label"] == label) & (summary["dataset"] == dataset)].sort_values("shots")
            if rows.empty:
                continue
            std = rows["std"].fillna(0.0)
            ax.plot(
                rows["shots"], rows["mean"], marker="o", ms=3, color=colors[label], label=method_title(label)
            )
            ax.fill_between(
                rows["shots"], rows["mean"] - std, rows["mean"] + std, color=colors[label], alpha=0.2
            )
        if dataset == AVERAGE:
            _plot_published(ax, published, shots)
        ax.set_title(dataset_title(dataset) if dataset != AVERAGE else AVERAGE)
        if min(shots) > 0:  # only runs without shots (zero-shot alone) sit at 0
            ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    labels, handles = list(legend), list(legend.values())
    ncol = min(len(labels), 4)
    legend_rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * legend_rows / nrows, 1, 1))
    return fig


def _plot_published(ax: Any, entries: Sequence[PublishedEntry], shots: Sequence[int]) -> None:
    """Each entry's published Average at the plotted shot counts: grey, dashed, hollow markers."""
    for number, entry in enumerate(entries):
        points = [(k, entry.average(k)) for k in shots if entry.average(k) is not None]
        if not points:
            continue
        ax.plot(
            [k for k, _ in points],
            [v for _, v in points],
            ls=(0, (4, 2 + number)),
            color=str(0.25 + 0.5 * number / max(len(entries), 1)),
            marker="sD^vP"[number % 5],
            ms=4,
            mfc="none",
            label=entry.title,
        )


def plot_accuracy_vs_params(
    summary: pd.DataFrame, params: dict[str, float], methods: Sequence[str] | None = None
):
    """Average accuracy against trainable parameters (log x); methods without parameters as dashed lines."""
    plt = _pyplot()
    methods = _order(summary["label"], methods)
    colors = _palette(methods)
    average = summary[summary["dataset"] == AVERAGE]
    shots = sorted(average["shots"].unique())
    markers = dict(zip(shots, "os^Dvp*hX<>", strict=False))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label in methods:
        rows = average[average["label"] == label]
        count = params.get(label)
        if rows.empty or count is None or (isinstance(count, float) and math.isnan(count)):
            continue
        if count <= 0:
            for row in rows.itertuples():
                ax.axhline(row.mean, color=colors[label], ls="--", lw=0.8)
            ax.plot([], [], color=colors[label], ls="--", label=f"{method_title(label)} (0 params)")
            continue
        for row in rows.itertuples():
            ax.errorbar(
                count,
                row.mean,
                yerr=0.0 if math.isnan(row.std) else row.std,
                color=colors[label],
                marker=markers.get(row.shots, "o"),
                ls="none",
                capsize=2,
            )
        ax.plot([], [], color=colors[label], marker="o", ls="none", label=method_title(label))
    for k in shots:
        ax.plot([], [], color="gray", marker=markers.get(k, "o"), ls="none", label=_shots_text(k))
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    positive = [v for v in params.values() if v and v > 0 and not math.isnan(v)]
    if positive:
        ax.set_xlim(min(positive) / 3, max(positive) * 3)
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{AVERAGE.lower()} accuracy (%)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


def plot_efficiency(profiles: pd.DataFrame, methods: Sequence[str] | None = None):
    """Bars per method: trainable parameters, training step time, peak training memory."""
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter

    metrics = (
        ("trainable_params", "trainable parameters", EngFormatter()),
        ("step_ms", "train step (ms)", None),
        ("peak_memory_mib", "peak memory (MiB)", None),
    )
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    labels = _order(profiles["label"], methods) if not profiles.empty else []
    colors = _palette(labels)
    for ax, (column, title, formatter) in zip(axes.flat, metrics, strict=True):
        values = []
        if column in profiles.columns:
            by_label = profiles.set_index("label")[column]
            values = [(m, by_label.get(m)) for m in labels]
        values = [(m, float(v)) for m, v in values if v is not None and not pd.isna(v)]
        if values:
            ax.bar(
                [method_title(m) for m, _ in values],
                [v for _, v in values],
                color=[colors[m] for m, _ in values],
            )
            plt.setp(ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
            if formatter is not None:
                ax.yaxis.set_major_formatter(formatter)
        else:
            ax.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ writing


def save_figure(fig, stem: Path) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.pdf`` atomically, then close the figure."""
    import matplotlib.pyplot as plt

    paths = []
    for fmt in ("png", "pdf"):
        path = stem.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def trainable_params(runs: pd.DataFrame, profiles: pd.DataFrame) -> dict[str, float]:
    """Trainable parameters per label: the median over its records, else its profile."""
    counts: dict[str, float] = {}
    if not profiles.empty and "trainable_params" in profiles.columns:
        counts.update(profiles.set_index("label")["trainable_params"].dropna().astype(float).to_dict())
    if "trainable_params" in runs.columns:
        counts.update(runs.groupby("label")["trainable_params"].median().dropna().astype(float).to_dict())
    return counts


def summary_lines(summary: pd.DataFrame, runs: pd.DataFrame, suite: str | None = None) -> list[str]:
    """A few lines for stdout: runs counted, best method per shot count by average accuracy."""
    name = f"suite {suite}: " if suite else ""
    lines = [
        f"{name}{len(runs)} runs, {runs['label'].nunique()} methods, {runs['dataset'].nunique()} datasets, "
        f"shots {sorted(int(k) for k in runs['shots'].dropna().unique())}, "
        f"seeds {sorted(int(k) for k in runs['seed'].dropna().unique())}"
    ]
    average = summary[summary["dataset"] == AVERAGE]
    for shots in sorted(summary["shots"].unique()):
        rows = average[average["shots"] == shots]
        if rows.empty:
            lines.append(f"  {_shots_text(shots):>8}: no method has every dataset yet")
            continue
        best = rows.loc[rows["mean"].idxmax()]
        lines.append(
            f"  {_shots_text(shots):>8}: best {method_title(best['label'])} "
            f"{format_mean_std(best['mean'], best['std'], 2)} % average over datasets"
        )
    return lines


def training_hours(runs: pd.DataFrame, profiles: pd.DataFrame) -> pd.DataFrame:
    """Per method: device-hours estimated from the profiled step times (:mod:`blocklora.costs`), and measured.

    The estimate is what the suite's training costs on the device that made the profiles; the
    measured hours are the runs' own ``train_seconds`` on whatever device ran them.
    """
    from blocklora.costs import device_hours, step_times

    estimates = device_hours(runs.to_dict("records"), step_times(profiles.to_dict("records")))
    rows = []
    for label, group in runs.groupby("label", sort=False):
        iterations = pd.to_numeric(group["iterations"], errors="coerce").fillna(0).sum()
        measured = pd.to_numeric(group.get("train_seconds"), errors="coerce").fillna(0).sum() / 3600
        rows.append({"label": label, "runs": len(group), "iterations": int(iterations),
                     "estimated_gpu_hours": estimates.get(label), "measured_hours": measured})  # fmt: skip
    return pd.DataFrame(rows)


def training_hours_lines(hours: pd.DataFrame, profiles: pd.DataFrame) -> list[str]:
    estimated = hours["estimated_gpu_hours"].dropna()
    device = next(
        (str(d) for d in profiles.get("device", pd.Series(dtype=object)).dropna()), "the profiling device"
    )
    lines = [
        f"training time: {hours['measured_hours'].sum():.2f} h measured over {int(hours['runs'].sum())} runs"
    ]
    if not estimated.empty:
        lines.append(
            f"  estimated from profiled step times on {device}: {estimated.sum():.2f} device-hours "
            f"({len(estimated)} of {len(hours)} methods have a training step)"
        )
    return lines


def select_runs(
    runs: pd.DataFrame,
    methods: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    shots: Sequence[int] | None = None,
) -> pd.DataFrame:
    """The runs of these method entries, datasets and shot counts (None = all); an empty result is an error."""
    keep = pd.Series(True, index=runs.index)
    for column, values in (("label", methods), ("dataset", datasets), ("shots", shots)):
        if values:
            keep &= runs[column].isin(list(values)) | (column == "shots") & runs[column].isna()
    if not keep.any():
        raise ValueError(
            f"no run records of methods {methods}, datasets {datasets}, shots {shots}; "
            f"the records have methods {sorted(runs['label'].unique())}, datasets {sorted(runs['dataset'].unique())}"
        )
    return runs[keep]


def _average_note(datasets: Sequence[str], left_out: Sequence[str]) -> str:
    """Which datasets the Average column is taken over."""
    over = ", ".join(dataset_title(d) for d in datasets)
    count = "the dataset" if len(datasets) == 1 else f"the {len(datasets)} datasets"
    note = f"Average: over {count} {over}."
    if left_out:
        note += f" Left out: {', '.join(dataset_title(d) for d in left_out)} (see Left out)."
    return note + "\n"


def _left_out_lines(left_out: Sequence[str]) -> list[str]:
    """One line per dataset the config leaves out, with the step that would add it."""
    from blocklora.data.registry import builtin_spec

    lines = []
    for name in left_out:
        spec = builtin_spec(name)
        how = spec.manual if spec is not None and spec.manual else "prepare it (blocklora prepare)"
        lines.append(
            f"- **{dataset_title(name)}** (`{name}`): left out by `without:` in the config. To add it: {how} "
            f"Then drop it from `without:` and run the same command again."
        )
    return lines


def write_report(
    runs: pd.DataFrame,
    profiles: pd.DataFrame,
    out_dir: str | Path,
    *,
    suite: str | None = None,
    methods: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    shots: Sequence[int] | None = None,
    note: str | None = None,
    left_out: Sequence[str] = (),
    average_over: Sequence[str] | None = None,
    reference: str = REFERENCE,
    published: Sequence[PublishedEntry] = (),
) -> WrittenReport:
    """Write every file of :data:`REPORT_FILES` into ``out_dir``; returns them and the summary lines.

    ``left_out``: datasets the suite names but this report lacks (config ``without:``); the report
    says which, and what would add them. ``average_over``: the datasets the Average column is taken
    over (default: all of the table; a transfer suite averages its targets). ``reference``: the entry
    every other one is compared with, pair by pair. ``published``: other papers' numbers, shown
    beside the measured ones.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = select_runs(runs, methods, datasets, shots)
    measured = sorted(int(k) for k in runs["shots"].dropna().unique()) or [0]
    shots = [int(k) for k in shots] if shots else measured
    columns = in_every_shot_column(runs, shots)
    methods, datasets = _order(columns["label"], methods), _order(columns["dataset"], datasets)
    shots = _order(columns["shots"], shots)
    average_over = [d for d in average_over if d in datasets] if average_over else datasets
    summary = accuracy_summary(columns, average_over)
    title = f"suite {suite}" if suite else "benchmark"

    write_text(out / "runs.csv", runs.to_csv(index=False))
    write_text(out / "accuracy.csv", summary.round(4).to_csv(index=False))
    shown = [] if is_transfer(runs) else list(published)
    md, tex, with_published = [], [], []
    average_note = _average_note(average_over, left_out)
    for k in shots:
        table = accuracy_table(summary, k, methods, datasets)
        md += [f"### {_shots_text(k)}\n", to_markdown(table), average_note]
        with_published += [f"### {_shots_text(k)}\n", to_markdown(table), average_note]
        others = published_table(shown, k, datasets)
        if not others.empty:
            with_published += [
                f"Published (not run here), {_shots_text(k)}:\n",
                to_markdown(others),
                _published_sources([e for e in shown if e.title in others.index], k),
            ]
        tex.append(
            to_latex(
                table,
                caption=f"Top-1 accuracy (%) with {_shots_text(k)} per class, mean ± std over seeds ({title}).",
                label=f"tab:accuracy-{suite or 'all'}-{k}shot",
            )
        )
    write_text(out / "accuracy.md", "\n".join(md))
    write_text(out / "accuracy.tex", "\n".join(tex))

    published_md = _write_published(out, published, shown, runs, shots, datasets, average_over)
    paired_md = _write_paired(out, columns, reference, methods, shots, average_over, title, suite)

    costs = _with_unprofiled(profiles, runs)
    efficiency = efficiency_table(costs, methods)
    efficiency_note = unprofiled_note(costs, methods)
    write_text(out / "efficiency.csv", costs.to_csv(index=False))
    write_text(
        out / "efficiency.md", "\n".join([to_markdown(efficiency), efficiency_note]).rstrip("\n") + "\n"
    )
    write_text(
        out / "efficiency.tex",
        to_latex(
            efficiency,
            caption=f"Training and inference cost per method ({title})."
            + (" Not profiled: made by code of its own, outside the library." if efficiency_note else ""),
            label=f"tab:efficiency-{suite or 'all'}",
        ),
    )

    drawn = comparable_published(shown, runs, average_over)
    save_figure(plot_accuracy_vs_shots(summary, methods, datasets, drawn), out / "accuracy_vs_shots")
    save_figure(
        plot_accuracy_vs_params(summary, trainable_params(columns, profiles), methods),
        out / "accuracy_vs_params",
    )
    save_figure(plot_efficiency(costs, methods), out / "efficiency")

    hours = training_hours(runs, profiles)
    lines = summary_lines(summary, runs, suite) + training_hours_lines(hours, profiles)
    report = [f"# Report: {title}\n"]
    if note:
        report.append(f"> {note}\n")
    report += ["```", *lines, "```\n"]
    if left_out:
        report += ["## Left out\n", *_left_out_lines(left_out), ""]
    report += ["## Accuracy\n"]
    if published and (not shown or any(not published_table(shown, k, datasets).empty for k in shots)):
        report.append(published_md[0])
    report += [*with_published, f"\n## Paired comparison with {method_title(reference)}\n", *paired_md]
    report += ["\n## Efficiency\n", to_markdown(efficiency)]
    if efficiency_note:
        report.append(efficiency_note)
    report += [
        "\n## Figures\n",
        "![accuracy vs shots](accuracy_vs_shots.png)\n",
        "![accuracy vs trainable parameters](accuracy_vs_params.png)\n",
        "![efficiency](efficiency.png)\n",
    ]
    write_text(out / "report.md", "\n".join(report))
    return WrittenReport({name: out / name for name in REPORT_FILES}, lines)


def _write_paired(
    out: Path,
    columns: pd.DataFrame,
    reference: str,
    methods: Sequence[str],
    shots: Sequence[int],
    average_over: Sequence[str],
    title: str,
    suite: str | None,
) -> list[str]:
    """paired.csv, paired.md and paired.tex; returns the Markdown for report.md."""
    others = [m for m in methods if m != reference]
    if reference not in set(columns["label"]):
        summary = pd.DataFrame(columns=list(PAIRED_COLUMNS))
        text = [f"No paired comparison: this report has no runs of the reference, `{reference}`.\n"]
        tex = f"% {text[0]}"
    elif not others:
        summary = pd.DataFrame(columns=list(PAIRED_COLUMNS))
        text = [f"No paired comparison: this report has no method besides the reference, `{reference}`.\n"]
        tex = f"% {text[0]}"
    else:
        pairs = paired_differences(columns, reference, shots, others, average_over)
        summary = paired_summary(pairs, others, shots, reference)
        table = paired_table(summary)
        text = [_paired_text(reference, average_over), to_markdown(table)]
        tex = to_latex(
            table,
            caption=(
                f"Accuracy minus {method_title(reference)}'s (points) over paired (dataset, seed) runs: mean "
                f"[{100 * CONFIDENCE:.0f} % confidence interval], pairs won ({title})."
            ),
            label=f"tab:paired-{suite or 'all'}",
        )
    write_text(out / "paired.csv", summary.round(4).to_csv(index=False))
    write_text(out / "paired.md", "\n".join(text))
    write_text(out / "paired.tex", tex)
    return text


def _write_published(
    out: Path,
    published: Sequence[PublishedEntry],
    shown: Sequence[PublishedEntry],
    runs: pd.DataFrame,
    shots: Sequence[int],
    datasets: Sequence[str],
    average_over: Sequence[str],
) -> list[str]:
    """published.csv (every number given) and published.md (the tables beside this report's); returns
    the Markdown, its first item the sentence on what the rows are."""
    write_text(out / "published.csv", published_frame(published).round(4).to_csv(index=False))
    if not published:
        text = ["No published numbers were given (config `published:` is null).\n"]
    elif not shown:
        text = [
            "Published few-shot numbers are not shown: each was trained and tested on one dataset, while "
            "this suite tests on datasets it did not train on (published.csv lists them).\n"
        ]
    else:
        text = [_published_context(shown, runs, average_over)]
        for k in shots:
            table = published_table(shown, k, datasets)
            if not table.empty:
                text += [f"### {_shots_text(k)}\n", to_markdown(table)]
        text.append(_published_sources(shown))
        text += [f"- {e.title}: {e.note}" for e in shown if e.note]
    write_text(out / "published.md", "\n".join(text) + "\n")
    return text


# ------------------------------------------------------------------ everything `blocklora report` does


def build_report(
    records: Sequence[str | Path],
    profiles: Sequence[str | Path],
    out_dir: str | Path,
    *,
    suite: str | None = None,
    methods: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    shots: Sequence[int] | None = None,
    note: str | None = None,
    allow_mixed: bool = False,
    left_out: Sequence[str] = (),
    average_over: Sequence[str] | None = None,
    reference: str = REFERENCE,
    published: str | Path | None = None,
) -> list[str]:
    """Everything ``blocklora report`` does: write the report and return its summary lines.

    ``published``: a YAML file of other papers' numbers (:func:`blocklora.published.load_published`).
    """
    entries = load_published(published) if published else []
    runs = load_runs(records, allow_mixed=allow_mixed)
    profile_table = load_profiles(profiles) if profiles else pd.DataFrame(columns=["label", *PROFILE_FIELDS])
    written = write_report(
        runs,
        profile_table,
        out_dir,
        suite=suite,
        methods=methods,
        datasets=datasets,
        shots=shots,
        note=note,
        left_out=left_out,
        average_over=average_over,
        reference=reference,
        published=entries,
    )
    return [*written.lines, f"report written to {written.files['report.md']}"]
