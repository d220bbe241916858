"""Archives to folders, and the checks of what landed: safe extraction, layout and image counts.

Archives are extracted safely (no member may land outside the target folder, no link may point out of
it, no device file is created). The layout check says what is missing or short, and what to do.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from blocklora.data.errors import ExtractionError, LayoutError
from blocklora.data.registry import DatasetSpec
from blocklora.data.splits import IMAGE_EXTENSIONS, Split, missing_images

# <dataset>/.extracted/<archive name>: written once an archive is extracted there.
MARKER_DIR = ".extracted"


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


def ilsvrc_val_classes(devkit: str | Path) -> list[str]:
    """The wnid of each validation image, in file order (ILSVRC2012_val_00000001 first), from the devkit:
    the ground truth holds ILSVRC2012_IDs, which meta.mat's ``synsets`` map to wnids."""
    import io

    from scipy.io import loadmat

    devkit = Path(devkit)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(devkit, "r:*") as tar:
            for member in tar:
                for wanted in (ILSVRC_GROUND_TRUTH, ILSVRC_META):
                    if member.isfile() and member.name.endswith(wanted):
                        found[wanted] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as err:
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


def unpack_ilsvrc2012(
    root: str | Path, train_tar: str | Path, val_tar: str | Path, devkit: str | Path
) -> None:
    """ILSVRC-2012's archives into ``root/images/train/<wnid>/`` and ``root/images/val/<wnid>/``.

    The train tar holds one ``<wnid>.tar`` per class, each of flat images; the val tar holds the
    50,000 images flat (``ILSVRC2012_val_00000001.JPEG`` …), which go into the classes the devkit's
    ground truth gives them, line n for image n (:func:`ilsvrc_val_classes`).
    Both are read as streams (the train tar is 138 GB): each member is written where it belongs and
    nothing else, and a member that is not a plain file name stops the extraction.
    """
    root, train_tar, val_tar = Path(root), Path(train_tar), Path(val_tar)
    classes = ilsvrc_val_classes(devkit)
    images = root / "images"
    try:
        with tarfile.open(train_tar, "r|*") as outer:
            for member in outer:
                if not member.isfile():
                    continue
                wnid = Path(_plain_file_name(member.name, train_tar)).stem
                folder = images / "train" / wnid
                folder.mkdir(parents=True, exist_ok=True)
                with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as inner:
                    for image in inner:
                        if image.isfile():
                            name = _plain_file_name(image.name, train_tar)
                            (folder / name).write_bytes(inner.extractfile(image).read())
        with tarfile.open(val_tar, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = _plain_file_name(member.name, val_tar)
                match = re.fullmatch(r"ILSVRC2012_val_(\d{8})\.JPEG", name)
                if match is None or not 1 <= int(match[1]) <= len(classes):
                    raise ExtractionError(
                        f"{val_tar}: {name!r} is not one of the {len(classes)} images ILSVRC2012_val_NNNNNNNN.JPEG "
                        "the devkit labels; are they the ILSVRC-2012 val tar and devkit_t12?"
                    )
                folder = images / "val" / classes[int(match[1]) - 1]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError) as err:
        raise ExtractionError(
            f"cannot extract ImageNet's archives ({err}); delete them and fetch them again"
        ) from None
