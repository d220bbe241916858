"""Split files in CoOp format: read and validate them, and build them where no split file exists.

A split is ``{"train": [...], "val": [...], "test": [...]}``, each entry ``[relative_path, label,
classname]`` with the path relative to the dataset's image folder.

ImageNet-A and ImageNet-R hold 200 of the 1000 ImageNet classes (the wnid folders present). Their
splits keep the ImageNet class indices as labels (so a classifier built for ImageNet applies as is);
``class_subset(split)`` gives the labels present, and an evaluator restricts its 1000-way logits to
them before the arg-max, the usual protocol for these two sets.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from blocklora.io import write_json

SPLIT_KEYS = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

IMAGENET_CLASSNAMES_FILE = Path(__file__).with_name("imagenet_classnames.txt")

Split = dict[str, list[list[Any]]]


class SplitError(ValueError):
    """A split file or split dict that does not have the CoOp shape."""


def validate_split(
    split: Any,
    *,
    source: str = "split",
    expected_sizes: dict[str, int] | None = None,
    num_classes: int | None = None,
) -> Split:
    """Check the CoOp shape (and, if given, sizes and class count); return the split, else SplitError."""

    def fail(problem: str) -> SplitError:
        return SplitError(f"{source}: {problem}")

    if not isinstance(split, dict):
        raise fail(f"expected a JSON object with keys {list(SPLIT_KEYS)}, got {type(split).__name__}")
    missing = [k for k in SPLIT_KEYS if k not in split]
    if missing:
        raise fail(f"missing key(s) {missing}; a split has keys {list(SPLIT_KEYS)}")
    names: dict[int, str] = {}
    for key in SPLIT_KEYS:
        entries = split[key]
        if not isinstance(entries, list):
            raise fail(f"{key!r} must be a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            where = f"{key}[{i}]"
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise fail(f"{where} must be [relative_path, int_label, classname], got {entry!r}")
            path, label, classname = entry
            if not isinstance(path, str) or not path:
                raise fail(f"{where}: path must be a non-empty string, got {path!r}")
            if path.startswith(("/", "\\")) or ".." in Path(path).parts:
                raise fail(f"{where}: path {path!r} must be relative to the image folder, without '..'")
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise fail(f"{where}: label must be a non-negative integer, got {label!r}")
            if not isinstance(classname, str) or not classname:
                raise fail(f"{where}: classname must be a non-empty string, got {classname!r}")
            if names.setdefault(label, classname) != classname:
                raise fail(f"{where}: label {label} is named {classname!r} here but {names[label]!r} earlier")
    if expected_sizes is not None:
        sizes = {k: len(split[k]) for k in SPLIT_KEYS}
        wrong = {k: (sizes[k], n) for k, n in expected_sizes.items() if sizes.get(k) != n}
        if wrong:
            detail = ", ".join(f"{k} has {got} entries, expected {n}" for k, (got, n) in wrong.items())
            raise fail(detail)
    if num_classes is not None and len(names) != num_classes:
        raise fail(f"{len(names)} classes, expected {num_classes}")
    return split


def read_split(
    path: str | Path,
    *,
    expected_sizes: dict[str, int] | None = None,
    num_classes: int | None = None,
) -> Split:
    """Read and validate a CoOp split file (split_zhou_*.json or split.json)."""
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SplitError(f"{path}: split file not found") from None
    except json.JSONDecodeError as err:
        raise SplitError(f"{path}: not valid JSON ({err})") from None
    return validate_split(data, source=str(path), expected_sizes=expected_sizes, num_classes=num_classes)


def write_split(split: Split, path: str | Path) -> Path:
    """Validate ``split`` and write it atomically."""
    validate_split(split, source=str(path))
    return write_json(path, {k: [list(e) for e in split[k]] for k in SPLIT_KEYS}, indent=None)


def missing_images(split: Split, image_root: str | Path) -> list[str]:
    """Relative paths named by the split that are not files under ``image_root``."""
    image_root = Path(image_root)
    seen: set[str] = set()
    missing = []
    for key in SPLIT_KEYS:
        for path, _, _ in split[key]:
            if path not in seen:
                seen.add(path)
                if not (image_root / path).is_file():
                    missing.append(path)
    return missing


def class_subset(split: Split) -> list[int]:
    """Sorted labels present in the split (the 200 ImageNet indices for ImageNet-A/-R)."""
    return sorted({e[1] for key in SPLIT_KEYS for e in split[key]})


def classnames(split: Split) -> dict[int, str]:
    """Label -> class name, as named by the split's entries."""
    return {e[1]: e[2] for key in SPLIT_KEYS for e in split[key]}


# ---------------------------------------------------------------------------------------------
# ImageNet and its variants.


@cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(wnid, CLIP class name) for the 1000 ImageNet classes, in sorted-wnid order (= label)."""
    text = IMAGENET_CLASSNAMES_FILE.read_text()
    rows = tuple(tuple(line.split(" ", 1)) for line in text.splitlines() if line.strip())
    if len(rows) != 1000:
        raise RuntimeError(f"imagenet_classnames.txt has {len(rows)} rows, expected 1000")
    return rows  # type: ignore[return-value]


def imagenet_wnid_index() -> dict[str, int]:
    """wnid -> ImageNet class index (position among the sorted wnids)."""
    return {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}


def _images_in(folder: Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise SplitError(f"{root}: folder not found")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_entries(root: Path, prefix: str, label_folders: str) -> list[list[Any]]:
    """Entries for class folders under ``root``, named by wnid or by ImageNet index (0..999)."""
    names = imagenet_classes()
    index = imagenet_wnid_index()
    entries: list[list[Any]] = []
    labelled = []
    for folder in _class_folders(root):
        if label_folders == "wnid":
            if folder.name not in index:
                raise SplitError(f"{folder}: {folder.name!r} is not one of the 1000 ImageNet wnids")
            label = index[folder.name]
        elif label_folders == "index":
            if not folder.name.isdigit() or not 0 <= int(folder.name) < 1000:
                raise SplitError(f"{folder}: expected a class-index folder named 0..999")
            label = int(folder.name)
        else:
            raise ValueError(f"label_folders must be 'wnid' or 'index', got {label_folders!r}")
        labelled.append((label, folder))
    for label, folder in sorted(labelled, key=lambda t: t[0]):
        rel = f"{prefix}/{folder.name}" if prefix else folder.name
        entries.extend([f"{rel}/{name}", label, names[label][1]] for name in _images_in(folder))
    return entries


def imagenet_split(image_root: str | Path) -> Split:
    """ImageNet from ``image_root/{train,val}/nXXXXXXXX/``: ILSVRC's val images are the test split.

    The split has no val of its own: ILSVRC's only labelled held-out images are the test set (CoOp
    lists them as both val and test, so that model selection would see test images). The few-shot
    sampler draws ImageNet's validation images from the train images instead
    (:func:`blocklora.data.fewshot.sample_fewshot`).
    """
    image_root = Path(image_root)
    train = _folder_entries(image_root / "train", "train", "wnid")
    test = _folder_entries(image_root / "val", "val", "wnid")
    return {"train": train, "val": [], "test": test}


def eval_split(image_root: str | Path, label_folders: str) -> Split:
    """Test-only split (ImageNet-V2/-Sketch/-A/-R) from class folders; labels are ImageNet indices."""
    return {"train": [], "val": [], "test": _folder_entries(Path(image_root), "", label_folders)}


# ---------------------------------------------------------------------------------------------
# FGVCAircraft: the official variant split.


def fgvc_split(data_dir: str | Path) -> Split:
    """FGVCAircraft from ``fgvc-aircraft-2013b/data``: classes from variants.txt, CoOp's reading."""
    data_dir = Path(data_dir)
    variants_file = data_dir / "variants.txt"
    if not variants_file.is_file():
        raise SplitError(f"{variants_file}: not found (is this the data/ folder of fgvc-aircraft-2013b?)")
    classes = [line.strip() for line in variants_file.read_text().splitlines() if line.strip()]
    label_of = {name: i for i, name in enumerate(classes)}
    split: Split = {}
    for key in SPLIT_KEYS:
        path = data_dir / f"images_variant_{key}.txt"
        if not path.is_file():
            raise SplitError(f"{path}: not found")
        entries = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, classname = line.strip().partition(" ")
            if classname not in label_of:
                raise SplitError(f"{path}:{n}: variant {classname!r} is not in variants.txt")
            entries.append([f"{image_id}.jpg", label_of[classname], classname])
        split[key] = entries
    return split
