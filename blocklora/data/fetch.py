"""Get a dataset's files onto disk, verified: HTTP with resume and retries, Google Drive, checksums.

Downloads stream into ``<file>.part``, hashed as they are written, and resume with an HTTP Range
request after an interruption (with ``If-Range``, so a file that changed on the server restarts
instead of being spliced), retry transient failures (connection resets, timeouts, HTTP 5xx/429) with
exponential back-off, and are checked against their md5/sha256. One process at a time downloads a
given file (a lock beside it), so two pipelines sharing an archives folder never write the same
``.part``. Google Drive files go through gdown (which resumes and retries by itself) and are staged
under another name. Either way a file is renamed to its final name only once verified: a partial or
corrupt file never sits at the final path.

Every file is checked against a checksum. Where nobody publishes one, the sha256 of the first copy
is recorded in ``checksums.json`` beside the registry (trust on first use, as pip's hash-checking
mode and pooch allow; commit the file), and every later copy must match it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pooch
import requests
from tqdm.auto import tqdm

from blocklora.data.errors import ChecksumError, DataError, DownloadError, ManualDownloadRequired
from blocklora.data.registry import DatasetSpec, Source
from blocklora.io import exclusive, write_json, write_text

log = logging.getLogger("blocklora")

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class _Transient(Exception):
    """A failure worth retrying (the partial file is kept for resuming)."""


# ---------------------------------------------------------------------------------------------
# Checksums.

ALGORITHMS = ("md5", "sha256")
# Sources whose checksum nobody publishes: the sha256 of the first copy, keyed by URL.
CHECKSUMS_FILE = Path(__file__).with_name("checksums.json")
CHECKSUMS_ENV = "BLOCKLORA_CHECKSUMS"
CHECKSUMS_FORMAT = "blocklora-checksums/1"


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


def _digest_problem(digests: dict[str, str], what: str, *, md5: str | None, sha256: str | None) -> str | None:
    for alg, expected in (("md5", md5), ("sha256", sha256)):
        if expected and digests[alg] != expected.lower():
            return f"{alg} of {what} is {digests[alg]}, expected {expected}"
    return None


class ChecksumLock:
    """The sha256 recorded on first use of each source without a published checksum.

    ``{"format": "blocklora-checksums/1", "files": {url: {"filename": ..., "sha256": ...}}}``, in
    ``blocklora/data/checksums.json`` (or ``$BLOCKLORA_CHECKSUMS``). An entry is written once, by the
    first download (or the first copy found locally), and never changed by the pipeline: a later copy
    that differs is refused. Commit the file so that every checkout verifies against the same bytes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(
                f"cannot read the checksum lock file {self.path} ({exc}); restore it from git"
            ) from None
        if data.get("format") != CHECKSUMS_FORMAT or not isinstance(data.get("files"), dict):
            raise DataError(
                f"{self.path} is not a checksum lock file (format {CHECKSUMS_FORMAT!r}); restore it"
            )
        return data["files"]

    def sha256(self, key: str) -> str | None:
        entry = self._read().get(key)
        return entry["sha256"] if entry else None

    def record(self, key: str, filename: str, sha256: str) -> None:
        """Record ``sha256`` for ``key`` (once: a different value already there is an error)."""
        try:
            with exclusive(self.path, timeout=60):
                files = self._read()
                known = files.get(key, {}).get("sha256")
                if known and known != sha256:
                    raise ChecksumError(
                        f"{filename}: sha256 {sha256} differs from the one recorded on first use in "
                        f"{self.path} ({known}); the file changed at its source, or this copy is not it"
                    )
                files[key] = {"filename": filename, "sha256": sha256}
                write_json(self.path, {"format": CHECKSUMS_FORMAT, "files": dict(sorted(files.items()))})
        except OSError as exc:
            raise DownloadError(
                f"cannot record the sha256 of {filename} in {self.path} ({exc}): make that file writable, "
                f"or point ${CHECKSUMS_ENV} at one you can write"
            ) from None
        log.warning(
            "%s has no published checksum: recorded its sha256 %s in %s on first use (commit that file)",
            filename,
            sha256,
            self.path,
        )


def checksum_lock() -> ChecksumLock:
    """The lock file of first-use checksums: ``$BLOCKLORA_CHECKSUMS``, else the package's own."""
    return ChecksumLock(os.environ.get(CHECKSUMS_ENV) or CHECKSUMS_FILE)


@dataclass(frozen=True)
class Expected:
    """What a source's bytes must hash to: published checksums, else the sha256 recorded on first use,
    else nothing yet (``first_use`` then names the lock entry the first copy's sha256 goes into)."""

    filename: str
    md5: str | None = None
    sha256: str | None = None
    first_use: str | None = None
    lock: ChecksumLock | None = None

    @classmethod
    def of(cls, source: Source, lock: ChecksumLock | None = None) -> Expected:
        if source.md5 or source.sha256:
            return cls(source.filename, source.md5, source.sha256)
        lock = lock or checksum_lock()
        key = source.remote or f"file:{source.filename}"
        recorded = lock.sha256(key)
        return cls(source.filename, sha256=recorded, first_use=None if recorded else key, lock=lock)

    def sums(self) -> dict[str, str | None]:
        return {"md5": self.md5, "sha256": self.sha256}

    def confirm(self, sha256: str) -> None:
        """After a copy was read whole: record its sha256 if this is the first use."""
        if self.first_use and self.lock is not None:
            self.lock.record(self.first_use, self.filename, sha256)

    def problem_with(self, path: Path) -> str | None:
        """A copy on disk, hashed whole: on first use its sha256 is recorded and it is accepted;
        otherwise what differs from the pinned checksums, or None when it matches."""
        if self.first_use:
            self.confirm(file_hash(path, "sha256"))
            return None
        return checksum_problem(path, **self.sums())


def _fallback(url: str, dest: Path, manual: str | None) -> str:
    what = manual or f"download {url} yourself (browser, curl, wget) and place it at {dest}"
    return f"Manual fallback: {what}"


def _who(dataset: str | None) -> str:
    return f"dataset {dataset!r}: " if dataset else ""


# ---------------------------------------------------------------------------------------------
# HTTP with resume and retries; Google Drive.


class _Staged:
    """A ``.part`` file and the hashes of what it holds, kept up to date as bytes are appended (the
    file is never read back to verify it; only a part left by an earlier run is hashed once)."""

    def __init__(self, part: Path) -> None:
        self.part = part
        self.validator = part.with_name(part.name + ".validator")
        self.restart()

    def restart(self) -> None:
        self.hashes = {alg: hashlib.new(alg) for alg in ALGORITHMS}
        self.size = 0

    def catch_up(self) -> int:
        """Make the hashes those of the part file as it is on disk; its size."""
        size = self.part.stat().st_size if self.part.exists() else 0
        if size != self.size:
            self.restart()
            with open(self.part, "rb") as f:
                while chunk := f.read(1 << 20):
                    self.add(chunk)
        return size

    def add(self, chunk: bytes) -> None:
        for digest in self.hashes.values():
            digest.update(chunk)
        self.size += len(chunk)

    def digests(self) -> dict[str, str]:
        return {alg: h.hexdigest() for alg, h in self.hashes.items()}

    def if_range(self, url: str) -> str | None:
        """The validator (ETag or Last-Modified) the part file's bytes came with, for If-Range."""
        try:
            saved = json.loads(self.validator.read_text())
        except (OSError, ValueError):
            return None
        return saved.get("value") if saved.get("url") == url else None

    def remember(self, url: str, response: requests.Response) -> None:
        etag = response.headers.get("ETag")
        value = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
        if value:
            write_text(self.validator, json.dumps({"url": url, "value": value}))
        else:
            self.validator.unlink(missing_ok=True)

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.validator.unlink(missing_ok=True)
        self.restart()


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
    staged: _Staged,
    *,
    timeout: float,
    chunk_size: int,
    progress: bool | None,
    desc: str,
) -> None:
    """One request: append to (or restart) the part file; raise _Transient for failures worth retrying."""
    part = staged.part
    start = staged.catch_up()
    headers = {"Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
        validator = staged.if_range(url)
        if validator:
            headers["If-Range"] = validator  # changed on the server since: a 200 with the whole file
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as r:
            if r.status_code == 416 and start:
                match = re.match(r"bytes \*/(\d+)", r.headers.get("Content-Range", ""))
                if match and int(match.group(1)) == start:
                    return  # the part file already holds the whole file; the checksum decides
                staged.discard()
                raise _Transient(f"HTTP 416: the partial file ({start} bytes) does not fit; restarting")
            if r.status_code in TRANSIENT_STATUS:
                raise _Transient(f"HTTP {r.status_code} {r.reason}")
            if r.status_code >= 400:
                raise DownloadError(f"HTTP {r.status_code} {r.reason}")
            resumed = r.status_code == 206 and r.headers.get("Content-Range", "").startswith(
                f"bytes {start}-"
            )
            if r.status_code == 206 and not resumed:
                staged.discard()
                raise _Transient("the server answered another byte range than asked; restarting")
            if not resumed:
                start = 0
                staged.restart()
                staged.remember(url, r)
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
                    staged.add(chunk)
                    bar.update(len(chunk))
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        raise _Transient(f"{type(err).__name__}: {err}") from err
    size = staged.size
    if total is not None and size < total:
        raise _Transient(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        staged.discard()
        raise _Transient(f"received {size} bytes, more than the announced {total}; restarting")


def _need_checksum(url: str, md5: str | None, sha256: str | None, expected: Expected | None) -> Expected:
    if expected is not None:
        return expected
    if not md5 and not sha256:
        raise ValueError(
            f"refusing to download {url} without a checksum: give its md5 or sha256 (or an Expected "
            "that records the first copy's sha256)"
        )
    return Expected(Path(url).name, md5, sha256)


def download_url(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    expected: Expected | None = None,
    dataset: str | None = None,
    manual: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    chunk_size: int = 1 << 16,
    progress: bool | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, retried, verified); return ``dest``.

    A checksum is required: ``md5``/``sha256``, or ``expected`` (:class:`Expected`, which may record
    the first copy's sha256). An existing ``dest`` is checked, not fetched again. One process at a
    time downloads to ``dest`` (``<dest>.lock``); the others wait, then find it there. A checksum
    mismatch deletes the partial file and raises ChecksumError; HTTP errors and exhausted retries
    raise DownloadError. Their messages name the dataset, the URL and the manual fallback.
    """
    dest = Path(dest)
    expected = _need_checksum(url, md5, sha256, expected)
    if dest.exists():
        return _check_existing(dest, url, expected, dataset=dataset, manual=manual)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(dest):
        if dest.exists():  # another process downloaded it while this one waited
            return _check_existing(dest, url, expected, dataset=dataset, manual=manual)
        return _download_locked(
            url,
            dest,
            expected,
            dataset=dataset,
            manual=manual,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            chunk_size=chunk_size,
            progress=progress,
        )


def _download_locked(
    url: str,
    dest: Path,
    expected: Expected,
    *,
    dataset: str | None,
    manual: str | None,
    retries: int,
    backoff: float,
    timeout: float,
    chunk_size: int,
    progress: bool | None,
) -> Path:
    staged = _Staged(dest.with_name(dest.name + ".part"))
    last = ""
    with requests.Session() as session:
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
            try:
                _attempt(
                    session,
                    url,
                    staged,
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
            staged.catch_up()
            return _install(staged, dest, url, expected, dataset=dataset, manual=manual)
    part = staged.part
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
    dest: Path, url: str, expected: Expected, *, dataset: str | None, manual: str | None
) -> Path:
    problem = expected.problem_with(dest)
    if problem:
        raise ChecksumError(
            f"{_who(dataset)}{problem}. The file at the final path does not match: delete it and rerun to "
            f"download {url} again. {_fallback(url, dest, manual)}"
        )
    return dest


def _install(
    staged: _Staged,
    dest: Path,
    url: str,
    expected: Expected,
    *,
    dataset: str | None,
    manual: str | None,
) -> Path:
    """Check a finished download by the hashes taken while it was written, and rename it to ``dest``;
    a mismatch deletes it instead. A source without a known checksum has its sha256 recorded first."""
    digests = staged.digests()
    problem = _digest_problem(digests, "the content", **expected.sums())
    if problem:
        staged.discard()
        recorded = f" (recorded on first use in {expected.lock.path})" if expected.lock else ""
        raise ChecksumError(
            f"{_who(dataset)}downloaded {url} but its {problem}{recorded}; the download was deleted (the "
            f"server may hold another version, or the transfer was corrupted: rerun once). "
            f"{_fallback(url, dest, manual)}"
        )
    expected.confirm(digests["sha256"])
    os.replace(staged.part, dest)
    staged.validator.unlink(missing_ok=True)
    return dest


def download_gdrive(
    file_id: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    expected: Expected | None = None,
    dataset: str | None = None,
    manual: str | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Download a Google Drive file through gdown, staged under another name, verified, then renamed
    (one process at a time per destination, as :func:`download_url`)."""
    dest = Path(dest)
    url = f"https://drive.google.com/uc?id={file_id}"
    expected = _need_checksum(url, md5, sha256, expected)
    if dest.exists():
        return _check_existing(dest, url, expected, dataset=dataset, manual=manual)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(dest):
        if dest.exists():
            return _check_existing(dest, url, expected, dataset=dataset, manual=manual)
        return _gdrive_locked(
            file_id, dest, url, expected, dataset=dataset, manual=manual, retries=retries, timeout=timeout,
            progress=progress,
        )  # fmt: skip


def _gdrive_locked(
    file_id: str,
    dest: Path,
    url: str,
    expected: Expected,
    *,
    dataset: str | None,
    manual: str | None,
    retries: int,
    timeout: float,
    progress: bool | None,
) -> Path:
    import gdown
    from gdown.exceptions import DownloadError as GdownDownloadError
    from gdown.exceptions import FileURLRetrievalError

    staged = _Staged(dest.with_name(dest.name + ".gdown"))
    try:
        out = gdown.download(
            id=file_id,
            output=str(staged.part),
            quiet=progress is False,
            resume=True,
            retries=retries,
            timeout=timeout,
        )
    except (FileURLRetrievalError, GdownDownloadError, requests.RequestException, OSError) as err:
        raise DownloadError(
            f"{_who(dataset)}could not download {url} (Google Drive): {err}. Partial data, if any, are kept "
            f"beside {staged.part} for resuming. {_fallback(url, dest, manual)}"
        ) from None
    if out is None or not staged.part.exists():
        raise DownloadError(
            f"{_who(dataset)}could not download {url} (Google Drive returned nothing). "
            f"{_fallback(url, dest, manual)}"
        )
    staged.catch_up()  # gdown wrote it: hashed once, here
    return _install(staged, dest, url, expected, dataset=dataset, manual=manual)


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


def _locate(spec: DatasetSpec, source: Source, search: list[Path]) -> tuple[Path, Expected] | None:
    found = locate_source(source, search)
    if found is None:
        return None
    path, md5, sha256 = found
    if path.name != source.filename:  # an alternative: its own published checksum
        return path, Expected(path.name, md5, sha256)
    return path, Expected.of(source)


def _manual(spec: DatasetSpec, source: Source, search: list[Path]) -> str:
    where = ", ".join(str(d) for d in search)
    return f"{spec.manual} (Folders searched for {source.filename}: {where}.)"


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
    path, expected, verified = _obtain(
        spec, source, search, download_dir, download=download, progress=progress
    )
    if verified:  # hashed as it was downloaded
        return path
    problem = expected.problem_with(path)
    if problem:
        raise ChecksumError(
            f"dataset {spec.name!r}: {problem}. The file is corrupt or another version: replace it "
            f"(or delete it to download it again). {_manual(spec, source, search)}"
        )
    return path


def fetch_unverified(
    spec: DatasetSpec,
    source: Source,
    search: list[Path],
    download_dir: Path,
    *,
    download: bool,
    progress: bool | None = None,
) -> tuple[Path, Expected]:
    """A local copy of ``source`` and what it must hash to, for a reader that hashes what it reads
    (:func:`blocklora.data.extract.safe_extract`; then :meth:`Expected.confirm`): a copy found locally
    is not read here; a missing one is downloaded (and verified as it is written)."""
    path, expected, _ = _obtain(spec, source, search, download_dir, download=download, progress=progress)
    return path, expected


def _obtain(
    spec: DatasetSpec,
    source: Source,
    search: list[Path],
    download_dir: Path,
    *,
    download: bool,
    progress: bool | None,
) -> tuple[Path, Expected, bool]:
    """(path, what it must hash to, whether it was verified on the way here)."""
    found = _locate(spec, source, search)
    if found is not None:
        return (*found, False)
    where = ", ".join(str(d) for d in search)
    if source.remote is None or not download:
        reason = (
            "has no automatic download" if source.remote is None else "was not found and downloads are off"
        )
        raise ManualDownloadRequired(
            f"{spec.title} ({spec.name}): {source.filename} {reason}. {spec.manual} Folders searched: {where}."
        )
    manual = _manual(spec, source, search)
    dest = download_dir / source.filename
    expected = Expected.of(source)
    if source.gdrive_id:
        path = download_gdrive(
            source.gdrive_id, dest, expected=expected, dataset=spec.name, manual=manual, progress=progress
        )
    else:
        assert source.url is not None
        path = download_url(
            source.url, dest, expected=expected, dataset=spec.name, manual=manual, progress=progress
        )
    return path, Expected.of(source), True  # a first copy's sha256 is now recorded
