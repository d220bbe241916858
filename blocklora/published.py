"""Published accuracies of other papers, from a YAML file a user can extend, checked on load.

    entries = load_published("workflow/published/few_shot.yaml")
    entries[0].average(16)        # the published Average, or the mean of the 11 datasets

The numbers are context beside a report's measured tables: they never enter its runs, tables,
averages or paired comparison. Light to import (no torch, no pandas): the plan checks the file
when the workflow's DAG is built.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The 11 datasets of the few-shot benchmark, by this project's names.
FEW_SHOT_DATASETS = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
AVERAGE_KEY = "average"  # an entry's Average over the 11 datasets, as published
TEXT_FIELDS = ("method", "backbone", "source", "url")
REQUIRED = (*TEXT_FIELDS, "accuracy")
OPTIONAL = ("note",)


@dataclass(frozen=True)
class PublishedEntry:
    """One method's published accuracies (%) by dataset (or ``average``) and shot count."""

    method: str
    backbone: str
    source: str
    url: str
    accuracy: dict[str, dict[int, float]] = field(hash=False)
    note: str | None = None

    @property
    def title(self) -> str:
        """The row label: ``PLOT++ (published)``."""
        return f"{self.method} (published)"

    def value(self, dataset: str, shots: int) -> float | None:
        return self.accuracy.get(dataset, {}).get(shots)

    def average(self, shots: int) -> float | None:
        """The published Average, else the mean of the 11 datasets when the entry has all of them."""
        published = self.value(AVERAGE_KEY, shots)
        if published is not None:
            return published
        values = [self.value(d, shots) for d in FEW_SHOT_DATASETS]
        if any(v is None for v in values):
            return None
        return math.fsum(values) / len(values)  # type: ignore[arg-type]

    def average_is_computed(self, shots: int) -> bool:
        """True when :meth:`average` is the mean of the 11 datasets rather than a published number."""
        return self.value(AVERAGE_KEY, shots) is None and self.average(shots) is not None

    def shot_counts(self) -> list[int]:
        return sorted({k for values in self.accuracy.values() for k in values})


def normalize_backbone(name: str) -> str:
    """``ViT-B/16``, ``ViT-B-16`` and ``vit_b_16`` alike: lower case, letters and digits only,
    open_clip's ``-quickgelu`` suffix dropped."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return key.removesuffix("quickgelu")


def same_backbone(a: str, b: str) -> bool:
    return normalize_backbone(a) == normalize_backbone(b)


class PublishedError(ValueError):
    """A mistake in a file of published numbers, named with the file, the entry and the field."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_entry(raw: Any, number: int, where: str) -> PublishedEntry:
    title = raw.get("method") if isinstance(raw, dict) and isinstance(raw.get("method"), str) else None
    entry = f"{where}, entry {number}" + (f" ({title})" if title else "")
    if not isinstance(raw, dict):
        raise PublishedError(f"{entry}: expected a mapping with {', '.join(REQUIRED)}, got {raw!r}")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise PublishedError(
            f"{entry}: unknown field(s) {unknown}; an entry has {', '.join(REQUIRED)} and optionally note"
        )
    for key in (*TEXT_FIELDS, *OPTIONAL):
        value = raw.get(key)
        if key in OPTIONAL and value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            what = {
                "method": "the method's name, e.g. PLOT++",
                "backbone": "the backbone the numbers were measured with, e.g. ViT-B/16",
                "source": "the citation the numbers come from (authors, title or venue, year)",
                "url": "where the numbers are published (paper or repository)",
                "note": "a sentence of text, or leave it out",
            }[key]
            problem = "missing" if value is None else f"must be text, got {value!r}"
            raise PublishedError(f"{entry}, field `{key}`: {problem}; give {what}")
    accuracy = raw.get("accuracy")
    if not isinstance(accuracy, dict) or not accuracy:
        problem = "missing" if accuracy is None else f"must map datasets to accuracies, got {accuracy!r}"
        raise PublishedError(
            f"{entry}, field `accuracy`: {problem}; write `accuracy: {{dtd: {{1: 54.6, 16: 71.4}}}}` "
            f"with datasets among {', '.join(FEW_SHOT_DATASETS)} or `{AVERAGE_KEY}`"
        )
    checked: dict[str, dict[int, float]] = {}
    for dataset, by_shots in accuracy.items():
        at = f"{entry}, field `accuracy.{dataset}`"
        if dataset not in (*FEW_SHOT_DATASETS, AVERAGE_KEY):
            raise PublishedError(
                f"{at}: unknown dataset {dataset!r}; use this project's names: "
                f"{', '.join(FEW_SHOT_DATASETS)}, or `{AVERAGE_KEY}` for the average over the 11"
            )
        if not isinstance(by_shots, dict) or not by_shots:
            raise PublishedError(f"{at}: expected accuracies by shot count, e.g. {{1: 54.6, 16: 71.4}}")
        checked[dataset] = {}
        for shots, value in by_shots.items():
            if not isinstance(shots, int) or isinstance(shots, bool) or shots < 1:
                raise PublishedError(
                    f"{at}: shot count {shots!r} is not a positive integer; write it unquoted, e.g. 16"
                )
            if not _is_number(value) or not 0 <= value <= 100:
                raise PublishedError(
                    f"{entry}, field `accuracy.{dataset}.{shots}`: accuracy {value!r} is not a percentage "
                    "between 0 and 100"
                )
            checked[dataset][shots] = float(value)
    return PublishedEntry(
        method=raw["method"].strip(),
        backbone=raw["backbone"].strip(),
        source=raw["source"].strip(),
        url=raw["url"].strip(),
        accuracy=checked,
        note=raw["note"].strip() if raw.get("note") else None,
    )


def load_published(path: str | Path) -> list[PublishedEntry]:
    """The entries of a YAML list of published numbers, each checked; errors name file, entry and field."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PublishedError(
            f"cannot read published numbers {path} ({exc.strerror or exc}); "
            "name an existing file, or set `published: null` in the config to show none"
        ) from exc
    except yaml.YAMLError as exc:
        raise PublishedError(f"published numbers {path} are not valid YAML: {exc}") from exc
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PublishedError(
            f"published numbers {path}: expected a YAML list of entries (`- method: ...`), "
            f"got {type(raw).__name__}"
        )
    entries = [_check_entry(item, number, str(path)) for number, item in enumerate(raw, 1)]
    seen: dict[str, int] = {}
    for number, entry in enumerate(entries, 1):
        if entry.method in seen:
            raise PublishedError(
                f"{path}, entry {number} ({entry.method}), field `method`: entry {seen[entry.method]} "
                "has the same name; give each entry its own (e.g. add the backbone or the paper)"
            )
        seen[entry.method] = number
    return entries
