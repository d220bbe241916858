"""Archives to folders, and the checks of what landed: safe extraction, layout and image counts.

Archives are extracted safely: only regular files and folders, never through a symlink, each
archive hashed while it is extracted and capped in what it may expand to (:func:`safe_extract`). The layout check says what is missing or short, and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from blocklora.data.errors import ChecksumError, ExtractionError, LayoutError
from blocklora.data.registry import DatasetSpec
from blocklora.data.splits import IMAGE_EXTENSIONS, Split, missing_images
from blocklora.io import exclusive

# <dataset>/.extracted/<archive name>: written once an archive is extracted there.
MARKER_DIR = ".extracted"
# An archive may expand to at most this many times its own size (plus EXPANSION_SLACK): image
# archives hardly compress, a decompression bomb does. safe_extract's max_bytes overrides it.
MAX_EXPANSION = 4
EXPANSION_SLACK = 64 << 20
STAGING_PREFIX = ".extracting-"
_CHUNK = 1 << 20


def _member_parts(name: str, archive: Path) -> tuple[str, ...]:
    """The path components of a member's name, or ExtractionError naming what is wrong with it."""
    problem = None
    norm = name.replace("\\", "/")
    if not name or "\0" in name:
        problem = "has an empty or NUL-containing name"
    elif norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        problem = "has an absolute path"
    elif ".." in PurePosixPath(norm).parts:
        problem = "contains '..'"
    if problem:
        raise ExtractionError(f"refusing to extract {archive}: member {name!r} {problem}")
    return tuple(part for part in norm.split("/") if part not in ("", "."))


def _refuse_type(archive: Path, name: str, what: str) -> None:
    raise ExtractionError(
        f"refusing to extract {archive}: member {name!r} {what}; no dataset needs one, so an archive "
        "holding one is not extracted at all (delete it and fetch it again from the official source)"
    )


class _Hashing(io.RawIOBase):
    """A file read through this object is hashed on the way (md5 and sha256): the bytes extracted
    are the bytes verified, with no second opening of the archive in between."""

    def __init__(self, file, algorithms: tuple[str, ...]) -> None:
        self.file = file
        self.hashes = {alg: hashlib.new(alg) for alg in algorithms}

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.file.readinto(buffer)
        if n and self.hashes:
            view = memoryview(buffer)[:n]
            for digest in self.hashes.values():
                digest.update(view)
        return n

    def drain(self) -> None:
        """Read (and hash) whatever the extraction left unread: trailing blocks, padding."""
        buffer = bytearray(_CHUNK)
        while self.readinto(buffer):
            pass


class _Target:
    """A folder into which files are created without ever following a symlink.

    Every component is opened relative to its parent's descriptor with ``O_NOFOLLOW``, so a link
    planted anywhere below the root (a shared results folder) is refused, not followed.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.folders: dict[tuple[str, ...], int] = {(): self.fd}

    def close(self) -> None:
        for fd in self.folders.values():
            os.close(fd)
        self.folders = {}

    def folder(self, parts: tuple[str, ...]) -> int:
        """The descriptor of the folder ``parts`` below the root, made if missing."""
        if parts in self.folders:
            return self.folders[parts]
        parent = self.folder(parts[:-1])
        with contextlib.suppress(FileExistsError):
            os.mkdir(parts[-1], 0o777, dir_fd=parent)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as exc:
            where = self.root.joinpath(*parts)
            kind = "a symlink" if os.path.islink(where) else "not a folder"
            raise ExtractionError(
                f"cannot extract into {where}: it is {kind} ({exc.strerror}); remove it and rerun"
            ) from None
        self.folders[parts] = fd
        return fd

    def create(self, parts: tuple[str, ...]) -> int:
        """A new file at ``parts`` (a regular file there is replaced), open for writing."""
        parent = self.folder(parts[:-1])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            return os.open(parts[-1], flags, 0o666, dir_fd=parent)
        except FileExistsError:
            if not stat.S_ISREG(os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode):
                raise ExtractionError(
                    f"cannot extract {self.root.joinpath(*parts)}: something other than a file is there"
                ) from None
            os.unlink(parts[-1], dir_fd=parent)  # a later member of the same name wins, as in tar
            return os.open(parts[-1], flags, 0o666, dir_fd=parent)


class _Budget:
    def __init__(self, archive: Path, limit: int) -> None:
        self.archive, self.limit, self.used = archive, limit, 0

    def spend(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise ExtractionError(
                f"refusing to extract {self.archive}: it expands to more than {self.limit / 2**20:.1f} MiB "
                f"({MAX_EXPANSION}x its size; a decompression bomb or the wrong file). If it is right, "
                "extract it by hand or raise safe_extract's max_bytes"
            )


def _write(target: _Target, parts: tuple[str, ...], source, budget: _Budget) -> None:
    fd = target.create(parts)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            budget.spend(len(chunk))
            out.write(chunk)


def _tar_members(reader, archive: Path, target: _Target, budget: _Budget) -> None:
    try:
        tar = tarfile.open(fileobj=reader, mode="r|*", bufsize=_CHUNK)  # noqa: SIM115 (closed below)
    except tarfile.ReadError:
        raise ExtractionError(
            f"{archive} is neither a tar nor a zip archive (truncated or not an archive?)"
        ) from None
    with tar:
        for member in tar:
            parts = _member_parts(member.name, archive)
            if member.issym():
                _refuse_type(archive, member.name, f"is a symlink (to {member.linkname!r})")
            if member.islnk():
                _refuse_type(archive, member.name, f"is a hard link (to {member.linkname!r})")
            if member.isfifo():
                _refuse_type(archive, member.name, "is a FIFO")
            if member.isdev():
                _refuse_type(archive, member.name, "is a device")
            if member.isdir():
                if parts:
                    target.folder(parts)
            elif member.isreg() and parts:
                _write(target, parts, tar.extractfile(member), budget)
            else:
                _refuse_type(archive, member.name, f"is of an unknown type {member.type!r}")


def _zip_members(file, archive: Path, target: _Target, budget: _Budget) -> None:
    with zipfile.ZipFile(file) as zf:
        for info in zf.infolist():
            parts = _member_parts(info.filename, archive)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                _refuse_type(archive, info.filename, "is a symlink")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                _refuse_type(archive, info.filename, "is a device or FIFO")
            if info.is_dir():
                if parts:
                    target.folder(parts)
            elif parts:
                with zf.open(info) as source:
                    _write(target, parts, source, budget)


def _merge(source_fd: int, target_fd: int, name: str, where: Path) -> None:
    """Move ``name`` from the staging folder into the target folder, merging folders that exist."""
    try:
        there = os.stat(name, dir_fd=target_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(name, name, src_dir_fd=source_fd, dst_dir_fd=target_fd)
        return
    here = os.stat(name, dir_fd=source_fd, follow_symlinks=False)
    if stat.S_ISDIR(here.st_mode) and stat.S_ISDIR(there.st_mode):
        inner_source = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=source_fd)
        try:
            inner_target = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=target_fd)
        except OSError:
            os.close(inner_source)
            raise
        try:
            for child in os.listdir(inner_source):
                _merge(inner_source, inner_target, child, where / name)
        finally:
            os.close(inner_source)
            os.close(inner_target)
    elif stat.S_ISREG(here.st_mode) and stat.S_ISREG(there.st_mode):
        os.replace(name, name, src_dir_fd=source_fd, dst_dir_fd=target_fd)
    else:
        kind = "a symlink" if stat.S_ISLNK(there.st_mode) else "in the way"
        raise ExtractionError(f"cannot extract into {where / name}: it is {kind}; remove it and rerun")


def _stage_and_merge(dest: Path, archive: Path, fill) -> None:
    """Run ``fill(target)`` into a private staging folder inside ``dest``; move what it made into
    ``dest`` only if it succeeds (a refused or corrupt archive leaves nothing behind)."""
    with exclusive(dest / STAGING_PREFIX.rstrip("-")):  # one extraction at a time into a folder
        for stale in dest.glob(f"{STAGING_PREFIX}*"):  # left by an extraction that was killed
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        _stage_and_merge_locked(dest, archive, fill)


def _stage_and_merge_locked(dest: Path, archive: Path, fill) -> None:
    dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest))
    try:
        target = _Target(staging)
        try:
            fill(target)
        finally:
            target.close()
        staging_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for name in os.listdir(staging_fd):
                _merge(staging_fd, dest_fd, name, dest)
        finally:
            os.close(staging_fd)
    except OSError as exc:
        raise ExtractionError(
            f"cannot extract {archive} into {dest} ({exc}); free space or fix the folder, then rerun"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(dest_fd)


def _verify(hashing: _Hashing, archive: Path, expected: dict[str, str | None]) -> None:
    for alg, want in expected.items():
        got = hashing.hashes[alg].hexdigest()
        if want and got != want.lower():
            raise ChecksumError(
                f"refusing to extract {archive}: {alg} of {archive} is {got}, expected {want} (taken from "
                "the very bytes read for extraction). It is corrupt, another version, or was replaced since "
                "it was fetched: replace it (or delete it to download it again)"
            )


def safe_extract(
    archive: str | Path,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    max_bytes: int | None = None,
) -> dict[str, str]:
    """Extract a tar (any compression) or zip archive into ``dest``; returns the archive's md5 and
    sha256, taken from the bytes that were extracted.

    Only regular files and folders are extracted: a symlink, hard link, device or FIFO member
    refuses the whole archive (no image dataset needs one), as does a name that is absolute or holds
    '..'. Members are written into a private staging folder without following any link, then moved
    into ``dest`` (never through a symlink found there). The archive is opened once and hashed as it
    is read: with ``md5``/``sha256`` given, a mismatch refuses it and nothing lands. What it expands
    to counts against ``max_bytes`` (default: MAX_EXPANSION times its size, plus EXPANSION_SLACK).
    Nothing here relies on tarfile's extraction filters, which let CVE-2025-4517 through on the
    Pythons before 3.11.13 (this project's 3.11.7 among them).
    """
    archive = Path(archive)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    expected = {"md5": md5, "sha256": sha256}
    try:
        with open(archive, "rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            limit = max_bytes if max_bytes is not None else MAX_EXPANSION * size + EXPANSION_SLACK
            budget = _Budget(archive, limit)
            hashing = _Hashing(file, ("md5", "sha256"))
            if zipfile.is_zipfile(file):
                file.seek(0)
                hashing.drain()  # a zip is read at random: hashed first, through this same handle
                _verify(hashing, archive, expected)
                file.seek(0)
                _stage_and_merge(dest, archive, lambda target: _zip_members(file, archive, target, budget))
            else:
                file.seek(0)
                reader = io.BufferedReader(hashing, _CHUNK)

                def fill(target: _Target) -> None:
                    _tar_members(reader, archive, target, budget)
                    hashing.drain()  # end-of-archive blocks and padding are hashed too
                    _verify(hashing, archive, expected)

                _stage_and_merge(dest, archive, fill)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise ExtractionError(
            f"cannot extract {archive}: {err}. Delete it and rerun to fetch it again."
        ) from None
    return {alg: h.hexdigest() for alg, h in hashing.hashes.items()}


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
    test_folders = spec.test_folders or spec.num_classes
    if not problems and spec.split_source == "imagenet_folders":
        for sub, expected in (("train", spec.num_classes), ("val", test_folders)):
            n = sum(1 for p in (image_root / sub).iterdir() if p.is_dir() and not p.name.startswith("."))
            if n != expected:
                problems.append(f"{image_root / sub} has {n} class folders, expected {expected}")
    if not problems and spec.split_source == "eval_only":
        n = sum(1 for p in image_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if n != test_folders:
            problems.append(f"{image_root} has {n} class folders, expected {test_folders}")
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
# ImageNet from its ILSVRC-2012 archives.

ILSVRC_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
ILSVRC_META = "data/meta.mat"


def _plain_file_name(name: str, archive: Path) -> str:
    """A member that must be a bare file name (no folder, no traversal)."""
    base = PurePosixPath(name.replace("\\", "/"))
    if len(base.parts) != 1 or base.name in ("", ".", ".."):
        raise ExtractionError(f"refusing to extract {archive}: member {name!r} is not a plain file name")
    return base.name


def ilsvrc_val_classes(devkit: str | Path, *, md5: str | None = None, sha256: str | None = None) -> list[str]:
    """The wnid of each validation image, in file order (ILSVRC2012_val_00000001 first), from the devkit:
    the ground truth holds ILSVRC2012_IDs, which meta.mat's ``synsets`` map to wnids. The devkit
    (2.5 MB) is read once, and checked against ``md5``/``sha256`` as read."""
    from scipy.io import loadmat

    devkit = Path(devkit)
    data = devkit.read_bytes()
    for alg, want in (("md5", md5), ("sha256", sha256)):
        got = hashlib.new(alg, data).hexdigest()
        if want and got != want.lower():
            raise ChecksumError(
                f"refusing to read {devkit}: {alg} of {devkit} is {got}, expected {want}; replace it (or "
                "delete it to download it again)"
            )
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                for wanted in (ILSVRC_GROUND_TRUTH, ILSVRC_META):
                    if member.isfile() and member.name.endswith(wanted):
                        found[wanted] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise ExtractionError(f"cannot read {devkit}: {err}. Delete it and fetch it again.") from None
    missing = [name for name in (ILSVRC_GROUND_TRUTH, ILSVRC_META) if name not in found]
    if missing:
        raise ExtractionError(f"{devkit} lacks {missing}: is it ILSVRC2012_devkit_t12.tar.gz?")
    synsets = loadmat(io.BytesIO(found[ILSVRC_META]), squeeze_me=True)["synsets"]
    wnid_of = {
        int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets if int(row["num_children"]) == 0
    }
    ids = [int(line) for line in found[ILSVRC_GROUND_TRUTH].decode().split()]
    unknown = sorted(set(ids) - set(wnid_of))
    if unknown:
        raise ExtractionError(f"{devkit}: ground-truth ids {unknown[:5]} are not leaf synsets of meta.mat")
    return [wnid_of[i] for i in ids]


Checksums = dict[str, str | None]  # {"md5": ..., "sha256": ...}: what an archive must hash to


def unpack_ilsvrc2012(
    root: str | Path,
    train_tar: str | Path,
    val_tar: str | Path,
    devkit: str | Path,
    *,
    checksums: tuple[Checksums, Checksums, Checksums] | None = None,
) -> None:
    """ILSVRC-2012's archives into ``root/images/train/<wnid>/`` and ``root/images/val/<wnid>/``.

    The train tar holds one ``<wnid>.tar`` per class, each of flat images; the val tar holds the
    50,000 images flat (``ILSVRC2012_val_00000001.JPEG`` …), which go into the classes the devkit's
    ground truth gives them, line n for image n (:func:`ilsvrc_val_classes`).
    Both are read once, as streams (the train tar is 138 GB), and hashed as they are read
    (``checksums``: those of the train tar, the val tar and the devkit): each member is written where
    it belongs and nothing else, into a staging folder that moves into ``root`` only once both
    archives are read and match; a member that is not a plain file name stops the extraction.
    """
    root, train_tar, val_tar = Path(root), Path(train_tar), Path(val_tar)
    train_sums, val_sums, devkit_sums = checksums or ({}, {}, {})
    classes = ilsvrc_val_classes(devkit, md5=devkit_sums.get("md5"), sha256=devkit_sums.get("sha256"))
    root.mkdir(parents=True, exist_ok=True)
    unlimited = _Budget(train_tar, 1 << 62)

    def stream(path: Path, sums: Checksums, each) -> None:
        with open(path, "rb", buffering=0) as file:
            hashing = _Hashing(file, tuple(alg for alg in ("md5", "sha256") if sums.get(alg)))
            with tarfile.open(fileobj=io.BufferedReader(hashing, _CHUNK), mode="r|*", bufsize=_CHUNK) as tar:
                for member in tar:
                    if member.isfile():
                        each(tar, member)
            hashing.drain()
            _verify(hashing, path, {alg: sums.get(alg) for alg in hashing.hashes})

    def train_member(target: _Target, outer: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        wnid = Path(_plain_file_name(member.name, train_tar)).stem
        with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as inner:
            for image in inner:
                if image.isfile():
                    name = _plain_file_name(image.name, train_tar)
                    _write(target, ("images", "train", wnid, name), inner.extractfile(image), unlimited)

    def val_member(target: _Target, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = _plain_file_name(member.name, val_tar)
        match = re.fullmatch(r"ILSVRC2012_val_(\d{8})\.JPEG", name)
        if match is None or not 1 <= int(match[1]) <= len(classes):
            raise ExtractionError(
                f"{val_tar}: {name!r} is not one of the {len(classes)} images ILSVRC2012_val_NNNNNNNN.JPEG "
                "the devkit labels; are they the ILSVRC-2012 val tar and devkit_t12?"
            )
        _write(
            target, ("images", "val", classes[int(match[1]) - 1], name), tar.extractfile(member), unlimited
        )

    def fill(target: _Target) -> None:
        stream(train_tar, train_sums, lambda tar, member: train_member(target, tar, member))
        stream(val_tar, val_sums, lambda tar, member: val_member(target, tar, member))

    try:
        _stage_and_merge(root, train_tar, fill)
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise ExtractionError(
            f"cannot extract ImageNet's archives ({err}); delete them and fetch them again"
        ) from None
