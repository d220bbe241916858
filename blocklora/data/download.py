"""Fetch, verify, extract and split a dataset, so that a researcher can trust what lands on disk.

Downloads stream into ``<file>.part``, resume with an HTTP Range request after an interruption, retry
transient failures (connection resets, timeouts, HTTP 5xx/429) with exponential back-off, are checked
against their md5/sha256 (hashing by pooch), and are renamed to their final name only once verified:
a partial or corrupt file never sits at the final path. Google Drive files go through gdown (which
resumes and retries by itself); they are staged under another name and verified the same way.
Archives are extracted safely (no member may land outside the target folder), the layout is checked,
and ``split.json`` is written last and atomically: its presence means the dataset is complete.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import time
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import pooch
import requests
from tqdm.auto import tqdm

from blocklora.data.registry import DatasetSpec, Source, get_dataset
from blocklora.data.splits import (
    IMAGE_EXTENSIONS,
    Split,
    SplitError,
    eval_split,
    fgvc_split,
    imagenet_split,
    missing_images,
    read_split,
    validate_split,
    write_split,
)
from blocklora.io import write_json

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MARKER_DIR = ".extracted"
SPLIT_FILE = "split.json"
DOWNLOADS_DIR = "downloads"


class DataError(RuntimeError):
    """Base class of the data layer's errors; messages say what failed and what to do."""


class DownloadError(DataError):
    """A download failed (HTTP error, too many transient failures, Google Drive refusal)."""


class ChecksumError(DownloadError):
    """A file's md5/sha256 differs from the published one."""


class ManualDownloadRequired(DataError):
    """A file cannot be fetched automatically (licence, dead link) and was not found locally."""


class ExtractionError(DataError):
    """An archive is unreadable or holds a member that would land outside the target folder."""


class LayoutError(DataError):
    """Extracted data lack expected paths or images."""


class _Transient(Exception):
    """A failure worth retrying (the partial file is kept for resuming)."""


# ---------------------------------------------------------------------------------------------
# Checksums.


def file_hash(path: str | Path, alg: str = "sha256") -> str:
    """Hex digest of a file (pooch's chunked hashing)."""
    return pooch.file_hash(str(path), alg=alg)


def checksum_problem(path: str | Path, *, md5: str | None = None, sha256: str | None = None) -> str | None:
    """A sentence describing a checksum mismatch of ``path``, or None when it matches (or none is known)."""
    for alg, expected in (("md5", md5), ("sha256", sha256)):
        if expected:
            got = file_hash(path, alg)
            if got.lower() != expected.lower():
                return f"{alg} of {path} is {got}, expected {expected}"
    return None


def _fallback(dataset: str | None, url: str, dest: Path, manual: str | None) -> str:
    what = manual or f"download {url} yourself (browser, curl, wget) and place it at {dest}"
    return f"Manual fallback: {what}"


def _who(dataset: str | None) -> str:
    return f"dataset {dataset!r}: " if dataset else ""


# ---------------------------------------------------------------------------------------------
# HTTP with resume and retries.


def _content_total(response: requests.Response, start: int) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    match = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", content_range)
    if match and match.group(3) != "*":
        return int(match.group(3))
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit():
        return int(length) + (start if response.status_code == 206 else 0)
    return None


def _attempt(
    session: requests.Session,
    url: str,
    part: Path,
    *,
    timeout: float,
    chunk_size: int,
    progress: bool | None,
    desc: str,
) -> None:
    """One request: append to (or restart) ``part``; raise _Transient for failures worth retrying."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as r:
            if r.status_code == 416 and start:
                match = re.match(r"bytes \*/(\d+)", r.headers.get("Content-Range", ""))
                if match and int(match.group(1)) == start:
                    return  # the part file already holds the whole file; the checksum decides
                part.unlink()
                raise _Transient(f"HTTP 416: the partial file ({start} bytes) does not fit; restarting")
            if r.status_code in TRANSIENT_STATUS:
                raise _Transient(f"HTTP {r.status_code} {r.reason}")
            if r.status_code >= 400:
                raise DownloadError(f"HTTP {r.status_code} {r.reason}")
            resumed = r.status_code == 206 and r.headers.get("Content-Range", "").startswith(
                f"bytes {start}-"
            )
            if r.status_code == 206 and not resumed:
                part.unlink(missing_ok=True)
                raise _Transient("the server answered another byte range than asked; restarting")
            if not resumed:
                start = 0
            total = _content_total(r, start)
            with (
                open(part, "ab" if resumed else "wb") as f,
                tqdm(
                    total=total,
                    initial=start,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=desc,
                    disable=None if progress is None else not progress,
                    leave=False,
                ) as bar,
            ):
                for chunk in r.iter_content(chunk_size=chunk_size):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        raise _Transient(f"{type(err).__name__}: {err}") from err
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Transient(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        part.unlink()
        raise _Transient(f"received {size} bytes, more than the announced {total}; restarting")


def download_url(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    dataset: str | None = None,
    manual: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    chunk_size: int = 1 << 16,
    progress: bool | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, retried, verified); return ``dest``.

    An existing ``dest`` is checked, not fetched again. A checksum mismatch deletes the partial file and
    raises ChecksumError; HTTP errors and exhausted retries raise DownloadError. Their messages name the
    dataset, the URL and the manual fallback.
    """
    dest = Path(dest)
    if dest.exists():
        return _check_existing(dest, url, md5=md5, sha256=sha256, dataset=dataset, manual=manual)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last = ""
    with requests.Session() as session:
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
            try:
                _attempt(
                    session,
                    url,
                    part,
                    timeout=timeout,
                    chunk_size=chunk_size,
                    progress=progress,
                    desc=dest.name,
                )
            except _Transient as err:
                last = str(err)
                continue
            except DownloadError as err:
                raise DownloadError(
                    f"{_who(dataset)}could not download {url}: {err}. {_fallback(dataset, url, dest, manual)}"
                ) from None
            problem = checksum_problem(part, md5=md5, sha256=sha256)
            if problem:
                part.unlink(missing_ok=True)
                raise ChecksumError(
                    f"{_who(dataset)}downloaded {url} but its {problem.replace(str(part), 'content')}; "
                    f"the download was deleted (the server may hold another version, or the transfer was "
                    f"corrupted: rerun once). {_fallback(dataset, url, dest, manual)}"
                )
            _record_unverified(part, dest, md5=md5, sha256=sha256)
            os.replace(part, dest)
            return dest
    kept = (
        f" The {part.stat().st_size} bytes received are kept in {part} and resume next time."
        if part.exists()
        else ""
    )
    raise DownloadError(
        f"{_who(dataset)}could not download {url} after {retries + 1} attempts (last error: {last}).{kept} "
        f"{_fallback(dataset, url, dest, manual)}"
    )


def _check_existing(
    dest: Path, url: str, *, md5: str | None, sha256: str | None, dataset: str | None, manual: str | None
) -> Path:
    problem = checksum_problem(dest, md5=md5, sha256=sha256)
    if problem:
        raise ChecksumError(
            f"{_who(dataset)}{problem}. The file at the final path does not match: delete it and rerun to "
            f"download {url} again. {_fallback(dataset, url, dest, manual)}"
        )
    return dest


def _record_unverified(staged: Path, dest: Path, *, md5: str | None, sha256: str | None) -> None:
    """Without a published checksum, write the sha256 of what we got beside the file, for the record."""
    if not md5 and not sha256:
        digest = file_hash(staged, "sha256")
        dest.with_name(dest.name + ".sha256").write_text(f"{digest}  {dest.name}\n")


def download_gdrive(
    file_id: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    dataset: str | None = None,
    manual: str | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Download a Google Drive file through gdown, staged under another name, verified, then renamed."""
    import gdown
    from gdown.exceptions import DownloadError as GdownDownloadError
    from gdown.exceptions import FileURLRetrievalError

    dest = Path(dest)
    url = f"https://drive.google.com/uc?id={file_id}"
    if dest.exists():
        return _check_existing(dest, url, md5=md5, sha256=sha256, dataset=dataset, manual=manual)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = dest.with_name(dest.name + ".gdown")
    try:
        out = gdown.download(
            id=file_id,
            output=str(staged),
            quiet=progress is False,
            resume=True,
            retries=retries,
            timeout=timeout,
        )
    except (FileURLRetrievalError, GdownDownloadError, requests.RequestException, OSError) as err:
        raise DownloadError(
            f"{_who(dataset)}could not download {url} (Google Drive): {err}. Partial data, if any, are kept "
            f"beside {staged} for resuming. {_fallback(dataset, url, dest, manual)}"
        ) from None
    if out is None or not staged.exists():
        raise DownloadError(
            f"{_who(dataset)}could not download {url} (Google Drive returned nothing). "
            f"{_fallback(dataset, url, dest, manual)}"
        )
    problem = checksum_problem(staged, md5=md5, sha256=sha256)
    if problem:
        staged.unlink(missing_ok=True)
        raise ChecksumError(
            f"{_who(dataset)}downloaded {url} but its {problem.replace(str(staged), 'content')}; the download "
            f"was deleted. {_fallback(dataset, url, dest, manual)}"
        )
    _record_unverified(staged, dest, md5=md5, sha256=sha256)
    os.replace(staged, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Safe extraction.


def _unsafe_name(name: str) -> str | None:
    if not name:
        return "has an empty name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return "has an absolute path"
    if ".." in PurePosixPath(norm).parts:
        return "contains '..'"
    return None


def _inside(dest: Path, relative: str) -> bool:
    target = os.path.normpath(os.path.join(dest, relative.replace("\\", "/")))
    return target == str(dest) or target.startswith(str(dest) + os.sep)


def _check_tar(tar: tarfile.TarFile, dest: Path, archive: Path) -> None:
    for m in tar.getmembers():
        problem = _unsafe_name(m.name)
        if problem is None and not _inside(dest, m.name):
            problem = "would land outside the target folder"
        if problem is None and m.issym():
            link = m.linkname.replace("\\", "/")
            if link.startswith("/") or not _inside(dest, os.path.join(os.path.dirname(m.name), link)):
                problem = f"is a symlink to {m.linkname!r}, outside the target folder"
        if problem is None and m.islnk():
            link = m.linkname
            if _unsafe_name(link) or not _inside(dest, link):
                problem = f"is a hard link to {m.linkname!r}, outside the target folder"
        if problem is None and (m.isdev() or m.isfifo()):
            problem = "is a device or FIFO"
        if problem:
            raise ExtractionError(f"refusing to extract {archive}: member {m.name!r} {problem}")


def _check_zip(zf: zipfile.ZipFile, dest: Path, archive: Path) -> None:
    for info in zf.infolist():
        problem = _unsafe_name(info.filename)
        if problem is None and not _inside(dest, info.filename):
            problem = "would land outside the target folder"
        if problem is None and stat.S_ISLNK(info.external_attr >> 16):
            link = zf.read(info).decode("utf-8", "replace").replace("\\", "/")
            if link.startswith("/") or not _inside(dest, os.path.join(os.path.dirname(info.filename), link)):
                problem = f"is a symlink to {link!r}, outside the target folder"
        if problem:
            raise ExtractionError(f"refusing to extract {archive}: member {info.filename!r} {problem}")


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a tar (any compression) or zip archive into ``dest``, refusing members that escape it."""
    archive = Path(archive)
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _check_zip(zf, dest, archive)
                zf.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tar:
                _check_tar(tar, dest, archive)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(dest, filter="data")
                else:  # pragma: no cover - Python < 3.11.4
                    tar.extractall(dest)
        else:
            raise ExtractionError(
                f"{archive} is neither a tar nor a zip archive (truncated or not an archive?)"
            )
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise ExtractionError(
            f"cannot extract {archive}: {err}. Delete it and rerun to fetch it again."
        ) from None
    return dest


# ---------------------------------------------------------------------------------------------
# Layout checks.


def count_images(folder: str | Path) -> int:
    """Number of image files below ``folder`` (recursively; hidden files skipped)."""
    n = 0
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        n += sum(
            1 for f in files if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    return n


def layout_problems(spec: DatasetSpec, root: str | Path, split: Split | None = None) -> list[str]:
    """What is missing or short in ``root`` (the dataset folder); an empty list means the layout is fine."""
    root = Path(root)
    problems = [f"missing {root / p}" for p in spec.layout if not (root / p).exists()]
    image_root = root / spec.image_dir
    if not problems and spec.min_images is not None:
        n = count_images(image_root)
        if n < spec.min_images:
            problems.append(f"found {n} images under {image_root}, expected at least {spec.min_images}")
    if not problems and spec.split_source == "imagenet_folders":
        for sub in ("train", "val"):
            n = sum(1 for p in (image_root / sub).iterdir() if p.is_dir() and not p.name.startswith("."))
            if n != spec.num_classes:
                problems.append(f"{image_root / sub} has {n} class folders, expected {spec.num_classes}")
    if not problems and spec.split_source == "eval_only":
        n = sum(1 for p in image_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if n != spec.num_classes:
            problems.append(f"{image_root} has {n} class folders, expected {spec.num_classes}")
    if not problems and split is not None:
        missing = missing_images(split, image_root)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            problems.append(
                f"{len(missing)} images named by the split are missing under {image_root}: {shown}"
            )
    return problems


def verify_layout(spec: DatasetSpec, root: str | Path, split: Split | None = None) -> None:
    """Raise LayoutError (what is missing, what to do) unless ``root`` holds the dataset's expected layout."""
    problems = layout_problems(spec, root, split)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise LayoutError(
            f"{spec.title} ({spec.name}) at {root} is incomplete:\n{listing}\n"
            f"What to do: {spec.manual or 'rerun the data preparation.'} If an extraction was interrupted, "
            f"delete {Path(root) / MARKER_DIR} and rerun to extract the archives again."
        )


# ---------------------------------------------------------------------------------------------
# Preparing a dataset.


def _search_dirs(root: Path, archives_dir: str | Path | None) -> list[Path]:
    dirs = [Path(archives_dir)] if archives_dir is not None else []
    return [*dirs, root, root / DOWNLOADS_DIR]


def _candidates(source: Source) -> list[tuple[str, str | None, str | None]]:
    return [(source.filename, source.md5, source.sha256), *((n, m, None) for n, m in source.alternatives)]


def locate_source(source: Source, search: Iterable[Path]) -> tuple[Path, str | None, str | None] | None:
    """The first local copy of ``source`` (or of one of its alternatives): (path, md5, sha256), or None."""
    for folder in search:
        for name, md5, sha256 in _candidates(source):
            if (folder / name).is_file():
                return folder / name, md5, sha256
    return None


def fetch_source(
    spec: DatasetSpec,
    source: Source,
    search: list[Path],
    download_dir: Path,
    *,
    download: bool = True,
    progress: bool | None = None,
) -> Path:
    """A verified local copy of ``source``: found in ``search`` or downloaded into ``download_dir``."""
    where = ", ".join(str(d) for d in search)
    manual = f"{spec.manual} (Folders searched for {source.filename}: {where}.)"
    found = locate_source(source, search)
    if found is not None:
        path, md5, sha256 = found
        problem = checksum_problem(path, md5=md5, sha256=sha256)
        if problem:
            raise ChecksumError(
                f"dataset {spec.name!r}: {problem}. The file is corrupt or another version: replace it "
                f"(or delete it to download it again). {manual}"
            )
        return path
    if source.remote is None or not download:
        reason = (
            "has no automatic download" if source.remote is None else "was not found and downloads are off"
        )
        raise ManualDownloadRequired(
            f"{spec.title} ({spec.name}): {source.filename} {reason}. {spec.manual} Folders searched: {where}."
        )
    dest = download_dir / source.filename
    if source.gdrive_id:
        return download_gdrive(
            source.gdrive_id,
            dest,
            md5=source.md5,
            sha256=source.sha256,
            dataset=spec.name,
            manual=manual,
            progress=progress,
        )
    assert source.url is not None
    return download_url(
        source.url,
        dest,
        md5=source.md5,
        sha256=source.sha256,
        dataset=spec.name,
        manual=manual,
        progress=progress,
    )


def _build_split(
    spec: DatasetSpec,
    root: Path,
    search: list[Path],
    download_dir: Path,
    *,
    download: bool,
    progress: bool | None,
) -> Split:
    image_root = root / spec.image_dir
    if spec.split_source == "split_zhou":
        source = spec.split_file_source()
        if source is None:
            raise DataError(f"dataset {spec.name!r}: split_source is split_zhou but no split file is listed")
        path = fetch_source(spec, source, search, download_dir, download=download, progress=progress)
        split = read_split(path)
    elif spec.split_source == "fgvc_official":
        split = fgvc_split(image_root.parent)
    elif spec.split_source == "imagenet_folders":
        split = imagenet_split(image_root)
    elif spec.split_source == "eval_only":
        split = eval_split(image_root, spec.label_folders or "wnid")
    else:
        raise DataError(f"dataset {spec.name!r}: unknown split_source {spec.split_source!r}")
    validate_split(split, source=f"{spec.name} split", num_classes=spec.num_classes)
    if spec.split_sizes is not None:
        try:
            validate_split(split, source=f"{spec.name} split", expected_sizes=spec.split_sizes)
        except SplitError as err:
            if spec.split_sizes_verified:
                raise
            warnings.warn(f"{err} (these expected sizes were derived, never checked)", stacklevel=3)
    return split


def _extract_sources(
    spec: DatasetSpec,
    root: Path,
    search: list[Path],
    download_dir: Path,
    *,
    download: bool,
    progress: bool | None,
) -> None:
    markers = root / MARKER_DIR
    for source in spec.sources:
        if source.kind == "split" or (markers / source.filename).exists():
            continue
        path = fetch_source(spec, source, search, download_dir, download=download, progress=progress)
        if source.kind == "archive":
            safe_extract(path, root)
        elif path.resolve() != (root / source.filename).resolve():
            shutil.copy2(path, root / source.filename)
        markers.mkdir(exist_ok=True)
        (markers / source.filename).write_text(f"{path}\n")
    for nested in spec.nested_archives:
        if (root / nested).is_file() and not (markers / Path(nested).name).exists():
            safe_extract(root / nested, root)
            markers.mkdir(exist_ok=True)
            (markers / Path(nested).name).write_text(f"{root / nested}\n")


MANIFEST_FILE = "downloads.json"


def fetch_dataset(
    name: str,
    data_root: str | Path,
    *,
    archives_dir: str | Path | None = None,
    download: bool = True,
    progress: bool | None = None,
) -> Path:
    """Download (or find) and verify every file of one dataset, without extracting anything.

    Writes ``<data_root>/<name>/downloads.json`` (atomically, last) naming the verified copy of each
    file; archives whose contents are already extracted in place are not fetched again.
    """
    spec = get_dataset(name)
    if spec.synthetic:
        raise DataError(f"{name!r} is a synthetic demo dataset; it is generated, not downloaded")
    root = Path(data_root) / name
    root.mkdir(parents=True, exist_ok=True)
    search = _search_dirs(root, archives_dir)
    download_dir = Path(archives_dir) if archives_dir is not None else root / DOWNLOADS_DIR
    extracted = not layout_problems(spec, root)
    files: dict[str, str] = {}
    for source in spec.sources:
        if source.kind != "split" and (extracted or (root / MARKER_DIR / source.filename).exists()):
            files[source.filename] = "already extracted"
            continue
        path = fetch_source(spec, source, search, download_dir, download=download, progress=progress)
        files[source.filename] = str(path)
    return write_json(root / MANIFEST_FILE, {"dataset": name, "files": files})


def prepare_dataset(
    name: str,
    data_root: str | Path,
    *,
    archives_dir: str | Path | None = None,
    download: bool = True,
    progress: bool | None = None,
) -> Path:
    """Fetch (or find in ``archives_dir`` / the dataset folder), verify, extract and split one dataset.

    Returns ``<data_root>/<name>/split.json``, which is written last and atomically. Archives already in
    ``archives_dir``, in ``<data_root>/<name>/`` or in its ``downloads/`` folder are used without network;
    new downloads go to ``archives_dir`` if given, else to ``<data_root>/<name>/downloads/``.
    """
    spec = get_dataset(name)
    if spec.synthetic:
        raise DataError(f"{name!r} is a synthetic demo dataset; it is generated, not downloaded")
    root = Path(data_root) / name
    split_path = root / SPLIT_FILE
    if split_path.exists():
        return split_path
    root.mkdir(parents=True, exist_ok=True)
    search = _search_dirs(root, archives_dir)
    download_dir = Path(archives_dir) if archives_dir is not None else root / DOWNLOADS_DIR
    if layout_problems(spec, root):
        _extract_sources(spec, root, search, download_dir, download=download, progress=progress)
    verify_layout(spec, root)
    split = _build_split(spec, root, search, download_dir, download=download, progress=progress)
    verify_layout(spec, root, split)
    write_split(split, split_path)
    return split_path
