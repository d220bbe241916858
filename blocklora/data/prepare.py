"""Prepare a dataset: fetch its files, extract them, check the layout and write its split.

``fetch_dataset`` (the workflow's ``download`` rule, network) gets and verifies every file of one
dataset and writes ``downloads.json``; ``prepare_dataset`` (the ``prepare`` rule, offline) extracts
the archives, checks the layout and image counts, and writes ``split.json`` last and atomically: its
presence means the dataset is complete.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from blocklora.data.errors import DataError
from blocklora.data.extract import MARKER_DIR, layout_problems, safe_extract, unpack_ilsvrc2012, verify_layout
from blocklora.data.fetch import fetch_source, fetch_unverified
from blocklora.data.registry import DatasetSpec, get_dataset
from blocklora.data.splits import (
    Split,
    SplitError,
    eval_split,
    fgvc_split,
    imagenet_split,
    read_split,
    validate_split,
    write_split,
)
from blocklora.io import write_json

SOURCES_FORMAT = "blocklora-sources/1"
SPLIT_FILE = "split.json"
DOWNLOADS_DIR = "downloads"
MANIFEST_FILE = "downloads.json"


@dataclass(frozen=True)
class Places:
    """Where one dataset's files are looked for, downloaded to and extracted into."""

    spec: DatasetSpec
    root: Path  # <data_root>/<name>/: archives are extracted here
    search: list[Path]  # folders searched for files already downloaded, in order
    download_dir: Path  # where new downloads go


def read_sources(path: str | Path) -> dict[str, dict[str, Any]]:
    """A sources file: other URLs and checksums of datasets' files (a mirror, the rehearsal's fixtures).

    ``{"format": "blocklora-sources/1", "datasets": {name: {"files": {filename: {"url"?, "md5"?,
    "sha256"?}}, "split_sizes"?: {...}, "min_images"?: n, "test_folders"?: n}}}``. A file listed there is fetched from its
    URL (or found locally) and verified against those checksums instead of the registry's.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the sources file {path} ({exc})") from None
    if data.get("format") != SOURCES_FORMAT or not isinstance(data.get("datasets"), dict):
        raise DataError(f"{path} is not a sources file (expected format {SOURCES_FORMAT!r})")
    return data["datasets"]


def with_sources(
    spec: DatasetSpec, sources: dict[str, Any] | None, origin: str = "sources file"
) -> DatasetSpec:
    """``spec`` with the files, expected split sizes and image count that ``sources`` gives for it."""
    if not sources:
        return spec
    files = sources.get("files", {})
    unknown = sorted(set(files) - {source.filename for source in spec.sources})
    if unknown:
        raise DataError(
            f"{origin} lists {unknown} for dataset {spec.name!r}, which has only "
            f"{[source.filename for source in spec.sources]}"
        )
    replaced = tuple(
        replace(
            source,
            url=files[source.filename].get("url"),
            gdrive_id=None,
            md5=files[source.filename].get("md5"),
            sha256=files[source.filename].get("sha256"),
            alternatives=(),
        )
        if source.filename in files
        else source
        for source in spec.sources
    )
    return replace(
        spec,
        sources=replaced,
        split_sizes=sources.get("split_sizes", spec.split_sizes),
        split_sizes_verified=True if "split_sizes" in sources else spec.split_sizes_verified,
        min_images=sources.get("min_images", spec.min_images),
        test_folders=sources.get("test_folders", spec.test_folders),
    )


def places(
    name: str, data_root: str | Path, archives_dir: str | Path | None, sources: str | Path | None = None
) -> Places:
    """The folders of dataset ``name`` (with the files of ``sources``, if given); a synthetic dataset
    is an error (it is generated, not fetched)."""
    spec = get_dataset(name)
    if spec.synthetic:
        raise DataError(f"{name!r} is a synthetic demo dataset; it is generated, not downloaded")
    if sources is not None:
        spec = with_sources(spec, read_sources(sources).get(name), str(sources))
    root = Path(data_root) / name
    archives = [Path(archives_dir)] if archives_dir is not None else []
    return Places(
        spec=spec,
        root=root,
        search=[*archives, root, root / DOWNLOADS_DIR],
        download_dir=archives[0] if archives else root / DOWNLOADS_DIR,
    )


def _fetch(where: Places, source, *, download: bool, progress: bool | None) -> Path:
    return fetch_source(
        where.spec, source, where.search, where.download_dir, download=download, progress=progress
    )


def _build_split(where: Places, *, download: bool, progress: bool | None) -> Split:
    spec = where.spec
    image_root = where.root / spec.image_dir
    if spec.split_source == "split_zhou":
        source = spec.split_file_source()
        if source is None:
            raise DataError(f"dataset {spec.name!r}: split_source is split_zhou but no split file is listed")
        split = read_split(_fetch(where, source, download=download, progress=progress))
    elif spec.split_source == "fgvc_official":
        split = fgvc_split(image_root.parent)
    elif spec.split_source == "imagenet_folders":
        split = imagenet_split(image_root)
    elif spec.split_source == "eval_only":
        split = eval_split(image_root, spec.label_folders or "wnid")
    else:
        raise DataError(f"dataset {spec.name!r}: unknown split_source {spec.split_source!r}")
    present = (
        spec.test_folders if spec.split_source == "eval_only" and spec.test_folders else spec.num_classes
    )
    validate_split(split, source=f"{spec.name} split", num_classes=present)
    if spec.split_sizes is not None:
        try:
            validate_split(split, source=f"{spec.name} split", expected_sizes=spec.split_sizes)
        except SplitError as err:
            if spec.split_sizes_verified:
                raise
            warnings.warn(f"{err} (these expected sizes were derived, never checked)", stacklevel=3)
    return split


def _extract_sources(where: Places, *, download: bool, progress: bool | None) -> None:
    """Extract each archive, verified by the bytes the extraction reads (never checked, then opened
    again: a copy replaced in between could slip through)."""
    root, markers = where.root, where.root / MARKER_DIR

    def unverified(source):
        return fetch_unverified(
            where.spec, source, where.search, where.download_dir, download=download, progress=progress
        )

    if where.spec.unpack == "ilsvrc2012":
        if not (markers / "ilsvrc2012").exists():
            found = [unverified(source) for source in where.spec.sources]
            unpack_ilsvrc2012(
                root, *(path for path, _ in found), checksums=tuple(expected.sums() for _, expected in found)
            )
            markers.mkdir(exist_ok=True)
            (markers / "ilsvrc2012").write_text("".join(f"{path}\n" for path, _ in found))
        return
    for source in where.spec.sources:
        if source.kind == "split" or (markers / source.filename).exists():
            continue
        if source.kind == "archive":
            path, expected = unverified(source)
            expected.confirm(safe_extract(path, root, **expected.sums())["sha256"])
        else:
            path = _fetch(where, source, download=download, progress=progress)
            if path.resolve() != (root / source.filename).resolve():
                shutil.copy2(path, root / source.filename)
        markers.mkdir(exist_ok=True)
        (markers / source.filename).write_text(f"{path}\n")
    for nested in where.spec.nested_archives:
        if (root / nested).is_file() and not (markers / Path(nested).name).exists():
            safe_extract(root / nested, root)
            markers.mkdir(exist_ok=True)
            (markers / Path(nested).name).write_text(f"{root / nested}\n")


def fetch_dataset(
    name: str,
    data_root: str | Path,
    *,
    archives_dir: str | Path | None = None,
    download: bool = True,
    progress: bool | None = None,
    sources: str | Path | None = None,
) -> Path:
    """Download (or find) and verify every file of one dataset, without extracting anything.

    Writes ``<data_root>/<name>/downloads.json`` (atomically, last) naming the verified copy of each
    file; archives whose contents are already extracted in place are not fetched again.
    """
    where = places(name, data_root, archives_dir, sources)
    where.root.mkdir(parents=True, exist_ok=True)
    extracted = not layout_problems(where.spec, where.root)
    files: dict[str, str] = {}
    for source in where.spec.sources:
        if source.kind != "split" and (extracted or (where.root / MARKER_DIR / source.filename).exists()):
            files[source.filename] = "already extracted"
            continue
        files[source.filename] = str(_fetch(where, source, download=download, progress=progress))
    return write_json(where.root / MANIFEST_FILE, {"dataset": name, "files": files})


def prepare_dataset(
    name: str,
    data_root: str | Path,
    *,
    archives_dir: str | Path | None = None,
    download: bool = True,
    progress: bool | None = None,
    sources: str | Path | None = None,
) -> Path:
    """Fetch (or find in ``archives_dir`` / the dataset folder), verify, extract and split one dataset.

    Returns ``<data_root>/<name>/split.json``, which is written last and atomically. Archives already in
    ``archives_dir``, in ``<data_root>/<name>/`` or in its ``downloads/`` folder are used without network;
    new downloads go to ``archives_dir`` if given, else to ``<data_root>/<name>/downloads/``.
    """
    where = places(name, data_root, archives_dir, sources)
    split_path = where.root / SPLIT_FILE
    if split_path.exists():
        return split_path
    where.root.mkdir(parents=True, exist_ok=True)
    if layout_problems(where.spec, where.root):
        _extract_sources(where, download=download, progress=progress)
    verify_layout(where.spec, where.root)
    split = _build_split(where, download=download, progress=progress)
    verify_layout(where.spec, where.root, split)
    write_split(split, split_path)
    return split_path
