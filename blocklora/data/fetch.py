"""Get a dataset's files onto disk, verified: HTTP with resume and retries, Google Drive, checksums.

Downloads stream into ``<file>.part``, resume with an HTTP Range request after an interruption, retry
transient failures (connection resets, timeouts, HTTP 5xx/429) with exponential back-off, and are
checked against their md5/sha256 (hashing by pooch). Google Drive files go through gdown (which
resumes and retries by itself) and are staged under another name. Either way a file is renamed to its
final name only once verified: a partial or corrupt file never sits at the final path.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import pooch
import requests
from tqdm.auto import tqdm

from blocklora.data.errors import ChecksumError, DownloadError, ManualDownloadRequired
from blocklora.data.registry import DatasetSpec, Source

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


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


def _fallback(url: str, dest: Path, manual: str | None) -> str:
    what = manual or f"download {url} yourself (browser, curl, wget) and place it at {dest}"
    return f"Manual fallback: {what}"


def _who(dataset: str | None) -> str:
    return f"dataset {dataset!r}: " if dataset else ""


# ---------------------------------------------------------------------------------------------
# HTTP with resume and retries; Google Drive.


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
                    f"{_who(dataset)}could not download {url}: {err}. {_fallback(url, dest, manual)}"
                ) from None
            return _install(part, dest, url, md5=md5, sha256=sha256, dataset=dataset, manual=manual)
    kept = (
        f" The {part.stat().st_size} bytes received are kept in {part} and resume next time."
        if part.exists()
        else ""
    )
    raise DownloadError(
        f"{_who(dataset)}could not download {url} after {retries + 1} attempts (last error: {last}).{kept} "
        f"{_fallback(url, dest, manual)}"
    )


def _check_existing(
    dest: Path, url: str, *, md5: str | None, sha256: str | None, dataset: str | None, manual: str | None
) -> Path:
    problem = checksum_problem(dest, md5=md5, sha256=sha256)
    if problem:
        raise ChecksumError(
            f"{_who(dataset)}{problem}. The file at the final path does not match: delete it and rerun to "
            f"download {url} again. {_fallback(url, dest, manual)}"
        )
    return dest


def _install(
    staged: Path,
    dest: Path,
    url: str,
    *,
    md5: str | None,
    sha256: str | None,
    dataset: str | None,
    manual: str | None,
) -> Path:
    """Check a finished download and rename it to ``dest``; a mismatch deletes it instead.

    Without a published checksum, the sha256 of what arrived is written beside the file, for the record.
    """
    problem = checksum_problem(staged, md5=md5, sha256=sha256)
    if problem:
        staged.unlink(missing_ok=True)
        raise ChecksumError(
            f"{_who(dataset)}downloaded {url} but its {problem.replace(str(staged), 'content')}; "
            f"the download was deleted (the server may hold another version, or the transfer was "
            f"corrupted: rerun once). {_fallback(url, dest, manual)}"
        )
    if not md5 and not sha256:
        digest = file_hash(staged, "sha256")
        dest.with_name(dest.name + ".sha256").write_text(f"{digest}  {dest.name}\n")
    os.replace(staged, dest)
    return dest


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
            f"beside {staged} for resuming. {_fallback(url, dest, manual)}"
        ) from None
    if out is None or not staged.exists():
        raise DownloadError(
            f"{_who(dataset)}could not download {url} (Google Drive returned nothing). "
            f"{_fallback(url, dest, manual)}"
        )
    return _install(staged, dest, url, md5=md5, sha256=sha256, dataset=dataset, manual=manual)


# ---------------------------------------------------------------------------------------------
# A dataset's files: found locally, else downloaded.


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
    download: bool,
    progress: bool | None = None,
) -> Path:
    """A verified local copy of ``source``: found in ``search`` or (``download``) downloaded into ``download_dir``."""
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
