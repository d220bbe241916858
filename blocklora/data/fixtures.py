"""Miniatures of the real datasets, for rehearsing the real suites offline (``--config rehearse=true``).

A miniature keeps everything the pipeline depends on and nothing else: the dataset's real class
count and class names (``blocklora/data/classes/``, ``imagenet_classnames.txt``), its real archives
(their names; the folders, file-name patterns and nested archives inside them; the CoOp split file
where the real dataset has one; ImageNet's ILSVRC-2012 train tar of per-class tars, flat val tar and
devkit with ``meta.mat``), and only a few tiny images per class. :func:`write_fixtures` writes the
archives into a folder together with ``sources.json``: each file's sha256, and the split sizes and
image counts of the miniatures, which ``blocklora download`` and ``blocklora prepare`` then check
in place of the real ones (:func:`blocklora.data.prepare.with_sources`).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import string
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from blocklora.data.prepare import SOURCES_FORMAT
from blocklora.data.registry import clean_classname, get_dataset
from blocklora.data.splits import imagenet_classes
from blocklora.io import write_json

CLASSES_DIR = Path(__file__).with_name("classes")
TRAIN, VAL, TEST = 2, 1, 1  # images per class in each split (ImageNet: TRAIN + VAL train images)
# Test images of the 1000-class miniatures (ImageNet, -V2, -Sketch): one for each of a hundred
# classes spread over the 1000, first and last included (all 1000 are in ImageNet's train split),
# so that a method whose test-time cost grows with images × classes (CoCoOp's per-image prompts)
# stays cheap to rehearse.
TEST_OF_1000 = 100
TESTED_OF_1000 = [round(i * 999 / (TEST_OF_1000 - 1)) for i in range(TEST_OF_1000)]
HEIGHT, WIDTH = 24, 32


def class_list(name: str) -> list[str]:
    """One of the shipped class lists (raw folder names, file prefixes or class names, in label order)."""
    return [line for line in (CLASSES_DIR / f"{name}.txt").read_text().splitlines() if line.strip()]


def _jpeg(rng: np.random.Generator, label: int, fmt: str = "JPEG") -> bytes:
    """A tiny image: a colour per class, with noise."""
    base = np.array([(label * 67) % 256, (label * 131) % 256, (label * 29) % 256])
    pixels = np.clip(base + rng.normal(0, 30, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


class _Archive:
    """Members added from bytes to a tar (any compression) or zip being written."""

    def __init__(self, handle: tarfile.TarFile | zipfile.ZipFile) -> None:
        self.handle = handle

    def add(self, name: str, data: bytes) -> None:
        if isinstance(self.handle, zipfile.ZipFile):
            self.handle.writestr(name, data)
            return
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self.handle.addfile(info, io.BytesIO(data))


@contextmanager
def _archive(path: Path, kind: str = "w:gz") -> Iterator[_Archive]:
    """``kind``: a tarfile mode (``w``, ``w:gz``) or ``zip``."""
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as handle:
            yield _Archive(handle)
    else:
        with tarfile.open(path, kind) as handle:
            yield _Archive(handle)


def _tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        archive = _Archive(tar)
        for name, data in members.items():
            archive.add(name, data)
    return buffer.getvalue()


@dataclass
class Miniature:
    """What one dataset's fixture wrote: its files, and the split sizes and image count to expect."""

    files: list[Path] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    images: int = 0
    test_folders: int | None = None  # class folders of the test images, where not the class count


Entries = list[list]


def _split_file(out: Path, coop_name: str, split: dict[str, Entries], mini: Miniature) -> None:
    path = out / f"split_zhou_{coop_name}.json"
    path.write_text(json.dumps(split, indent=4))
    mini.files.append(path)
    mini.split_sizes = {key: len(split[key]) for key in ("train", "val", "test")}


def _three_way(label: int, name: str, paths: list[str], split: dict[str, Entries]) -> None:
    """The first TRAIN paths to train, then VAL to val, then TEST to test."""
    for key, chunk in (
        ("train", paths[:TRAIN]),
        ("val", paths[TRAIN : TRAIN + VAL]),
        ("test", paths[TRAIN + VAL :]),
    ):
        split[key].extend([path, label, name] for path in chunk)


def _empty_split() -> dict[str, Entries]:
    return {"train": [], "val": [], "test": []}


PER_CLASS = TRAIN + VAL + TEST


# ------------------------------------------------------------------ the datasets with a CoOp split file


def _caltech101(out: Path, rng: np.random.Generator) -> Miniature:
    mini, split, members = Miniature(), _empty_split(), {}
    spec = get_dataset("caltech101")
    folders = class_list("caltech101")
    kept = sorted(f for f in folders if f not in ("BACKGROUND_Google", "Faces_easy"))
    for folder in folders:
        label = kept.index(folder) if folder in kept else -1
        count = PER_CLASS if label >= 0 else 2
        paths = [f"{folder}/image_{i:04d}.jpg" for i in range(1, count + 1)]
        for path in paths:
            members[f"101_ObjectCategories/{path}"] = _jpeg(rng, max(label, 0))
        if label >= 0:
            _three_way(label, clean_classname(spec, folder), paths, split)
    mini.images = len(members)
    inner = _tar_bytes(members, "w:gz")
    with _archive(out / "caltech-101.zip", "zip") as zipped:
        zipped.add("caltech-101/101_ObjectCategories.tar.gz", inner)
    mini.files.append(out / "caltech-101.zip")
    _split_file(out, "Caltech101", split, mini)
    return mini


def _class_archive(
    out: Path,
    rng: np.random.Generator,
    *,
    archive: str,
    coop_name: str,
    prefix: str,
    entries: list[str],
    paths_of: Callable[[str], list[str]],
    name_of: Callable[[str], str] = lambda entry: entry,
    kind: str = "w:gz",
    extra: dict[str, bytes] | None = None,
) -> Miniature:
    """The common shape: one archive holding ``extra`` files and PER_CLASS images per class under
    ``prefix`` (``paths_of(entry)`` relative to it), and the CoOp split file that names them."""
    mini, split = Miniature(), _empty_split()
    with _archive(out / archive, kind) as handle:
        for name, data in (extra or {}).items():
            handle.add(name, data)
        for label, entry in enumerate(entries):
            paths = paths_of(entry)
            for path in paths:
                handle.add(f"{prefix}{path}", _jpeg(rng, label))
            _three_way(label, name_of(entry), paths, split)
    mini.images = len(entries) * PER_CLASS
    mini.files.append(out / archive)
    _split_file(out, coop_name, split, mini)
    return mini


def _oxford_pets(out: Path, rng: np.random.Generator) -> Miniature:
    return _class_archive(
        out, rng, archive="images.tar.gz", coop_name="OxfordPets", prefix="images/",
        entries=class_list("oxford_pets"),
        paths_of=lambda breed: [f"{breed}_{n}.jpg" for n in range(1, PER_CLASS + 1)],
        name_of=str.lower,
    )  # fmt: skip


def _stanford_cars(out: Path, rng: np.random.Generator) -> Miniature:
    mini, split = Miniature(), _empty_split()
    names = class_list("stanford_cars")
    with _archive(out / "cars_train.tgz") as train_tar, _archive(out / "cars_test.tgz") as test_tar:
        number = {"cars_train": 0, "cars_test": 0}
        for label, name in enumerate(names):
            for key, count in (("train", TRAIN), ("val", VAL), ("test", TEST)):
                folder = "cars_test" if key == "test" else "cars_train"
                for _ in range(count):
                    number[folder] += 1
                    path = f"{folder}/{number[folder]:05d}.jpg"
                    (test_tar if folder == "cars_test" else train_tar).add(path, _jpeg(rng, label))
                    split[key].append([path, label, name])
    mini.images = len(names) * PER_CLASS
    mini.files += [out / "cars_train.tgz", out / "cars_test.tgz"]
    _split_file(out, "StanfordCars", split, mini)
    return mini


def _oxford_flowers(out: Path, rng: np.random.Generator) -> Miniature:
    numbers = itertools.count(1)  # one sequence across classes, as in the real archive
    return _class_archive(
        out, rng, archive="102flowers.tgz", coop_name="OxfordFlowers", prefix="jpg/",
        entries=class_list("oxford_flowers"),
        paths_of=lambda _: [f"image_{next(numbers):05d}.jpg" for _ in range(PER_CLASS)],
    )  # fmt: skip


def _food101(out: Path, rng: np.random.Generator) -> Miniature:
    names = class_list("food101")
    return _class_archive(
        out, rng, archive="food-101.tar.gz", coop_name="Food101", prefix="food-101/images/",
        entries=names,
        paths_of=lambda name: [f"{name}/{int(rng.integers(100_000, 4_000_000))}.jpg" for _ in range(PER_CLASS)],
        extra={"food-101/meta/classes.txt": ("\n".join(names) + "\n").encode()},
    )  # fmt: skip


def _sun397(out: Path, rng: np.random.Generator) -> Miniature:
    spec = get_dataset("sun397")
    raw = class_list("sun397")
    letters = np.array(list(string.ascii_lowercase))
    return _class_archive(
        out, rng, archive="SUN397.tar.gz", coop_name="SUN397", prefix="SUN397/",
        entries=raw,
        paths_of=lambda entry: [
            f"{entry.strip('/')}/sun_{''.join(rng.choice(letters, 16))}.jpg" for _ in range(PER_CLASS)
        ],
        name_of=lambda entry: clean_classname(spec, entry),
        extra={"SUN397/ClassName.txt": ("\n".join(raw) + "\n").encode()},
    )  # fmt: skip


def _dtd(out: Path, rng: np.random.Generator) -> Miniature:
    return _class_archive(
        out, rng, archive="dtd-r1.0.1.tar.gz", coop_name="DescribableTextures", prefix="dtd/images/",
        entries=class_list("dtd"),
        paths_of=lambda name: [f"{name}/{name}_{i:04d}.jpg" for i in range(1, PER_CLASS + 1)],
    )  # fmt: skip


def _eurosat(out: Path, rng: np.random.Generator) -> Miniature:
    spec = get_dataset("eurosat")
    return _class_archive(
        out, rng, archive="EuroSAT.zip", kind="zip", coop_name="EuroSAT", prefix="2750/",
        entries=class_list("eurosat"),
        paths_of=lambda folder: [f"{folder}/{folder}_{n}.jpg" for n in range(1, PER_CLASS + 1)],
        name_of=lambda folder: clean_classname(spec, folder),
    )  # fmt: skip


# In the real archive this one class's files spell its name otherwise than its folder.
UCF101_FILE_STEMS = {"HandstandPushups": "HandStandPushups"}


def _ucf101(out: Path, rng: np.random.Generator) -> Miniature:
    spec = get_dataset("ucf101")

    def paths_of(action: str) -> list[str]:
        folder, stem = clean_classname(spec, action), UCF101_FILE_STEMS.get(action, action)
        return [f"{folder}/v_{stem}_g{group:02d}_c01.jpg" for group in range(1, PER_CLASS + 1)]

    return _class_archive(
        out, rng, archive="UCF-101-midframes.zip", kind="zip", coop_name="UCF101", prefix="UCF-101-midframes/",
        entries=class_list("ucf101"), paths_of=paths_of, name_of=lambda action: clean_classname(spec, action),
    )  # fmt: skip


# ------------------------------------------------------------------ FGVCAircraft: the official split


def _fgvc_aircraft(out: Path, rng: np.random.Generator) -> Miniature:
    mini = Miniature()
    variants = class_list("fgvc_aircraft")
    data = "fgvc-aircraft-2013b/data"
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    with _archive(out / "fgvc-aircraft-2013b.tar.gz") as tar:
        tar.add(f"{data}/variants.txt", ("\n".join(variants) + "\n").encode())
        number = 1_000_000
        for label, variant in enumerate(variants):
            for key, count in (("train", TRAIN), ("val", VAL), ("test", TEST)):
                for _ in range(count):
                    number += 1
                    tar.add(f"{data}/images/{number:07d}.jpg", _jpeg(rng, label))
                    lines[key].append(f"{number:07d} {variant}")
        for key, rows in lines.items():
            tar.add(f"{data}/images_variant_{key}.txt", ("\n".join(rows) + "\n").encode())
    mini.images = len(variants) * PER_CLASS
    mini.files.append(out / "fgvc-aircraft-2013b.tar.gz")
    mini.split_sizes = {key: len(rows) for key, rows in lines.items()}
    return mini


# ------------------------------------------------------------------ ImageNet and its variants


def _devkit(ilsvrc_ids: dict[str, int], ground_truth: list[int]) -> bytes:
    """ILSVRC2012_devkit_t12.tar.gz: meta.mat's ``synsets`` (fields in the devkit's order, leaves
    first, then a few inner nodes) and the validation ground truth."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]  # fmt: skip
    names = dict(imagenet_classes())
    rows = sorted((index, wnid) for wnid, index in ilsvrc_ids.items())
    inner = [(1001 + i, f"n{90000000 + i:08d}") for i in range(3)]
    synsets = np.zeros((len(rows) + len(inner), 1), dtype=[(f, object) for f in fields])
    for position, (index, wnid) in enumerate(rows + inner):
        leaf = position < len(rows)
        synsets[position, 0] = (
            index, wnid, names.get(wnid, "an inner node"), "", 0 if leaf else 2,
            np.zeros((1, 0)) if leaf else np.array([[1, 2]]), 0 if leaf else 1, TRAIN + VAL if leaf else 0,
        )  # fmt: skip
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    return _tar_bytes(
        {
            "ILSVRC2012_devkit_t12/data/meta.mat": meta.getvalue(),
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": (
                "\n".join(map(str, ground_truth)) + "\n"
            ).encode(),
        },
        "w:gz",
    )


def _imagenet(out: Path, rng: np.random.Generator) -> Miniature:
    """ILSVRC-2012's three archives. The ILSVRC2012_IDs are a shuffle of the sorted-wnid order, and the
    val images come in a shuffled class order, as in the real devkit, so that the unpacking must map them."""
    mini = Miniature()
    wnids = [wnid for wnid, _ in imagenet_classes()]
    ilsvrc_ids = dict(zip(wnids, (rng.permutation(len(wnids)) + 1).tolist(), strict=True))
    with _archive(out / "ILSVRC2012_img_train.tar", "w") as outer:
        for label, wnid in enumerate(wnids):
            images = {
                f"{wnid}_{int(rng.integers(1, 99_999))}{i}.JPEG": _jpeg(rng, label)
                for i in range(TRAIN + VAL)
            }
            outer.add(f"{wnid}.tar", _tar_bytes(images))
    val_order = rng.permutation(TESTED_OF_1000)
    with _archive(out / "ILSVRC2012_img_val.tar", "w") as val:
        for number, label in enumerate(val_order, start=1):
            val.add(f"ILSVRC2012_val_{number:08d}.JPEG", _jpeg(rng, int(label)))
    (out / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(
        _devkit(ilsvrc_ids, [ilsvrc_ids[wnids[label]] for label in val_order])
    )
    mini.files += [out / name for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                                           "ILSVRC2012_devkit_t12.tar.gz")]  # fmt: skip
    mini.split_sizes = {"train": len(wnids) * (TRAIN + VAL), "val": 0, "test": TEST_OF_1000}
    mini.images = len(wnids) * (TRAIN + VAL) + TEST_OF_1000
    mini.test_folders = TEST_OF_1000
    return mini


def _imagenet_v2(out: Path, rng: np.random.Generator) -> Miniature:
    with _archive(out / "imagenetv2-matched-frequency.tar.gz") as tar:
        for label in TESTED_OF_1000:
            digest = hashlib.sha1(f"{label}".encode()).hexdigest()
            tar.add(f"imagenetv2-matched-frequency-format-val/{label}/{digest}.jpeg", _jpeg(rng, label))
    return Miniature(
        [out / "imagenetv2-matched-frequency.tar.gz"],
        {"train": 0, "val": 0, "test": TEST_OF_1000},
        TEST_OF_1000,
        TEST_OF_1000,
    )


def _imagenet_sketch(out: Path, rng: np.random.Generator) -> Miniature:
    with _archive(out / "ImageNet-Sketch.zip", "zip") as zipped:
        for label in TESTED_OF_1000:
            wnid = imagenet_classes()[label][0]
            zipped.add(f"sketch/{wnid}/sketch_{label % 50}.JPEG", _jpeg(rng, label))
    return Miniature(
        [out / "ImageNet-Sketch.zip"],
        {"train": 0, "val": 0, "test": TEST_OF_1000},
        TEST_OF_1000,
        TEST_OF_1000,
    )


def _renditions(name: str, archive: str, file_name: Callable[[int], str], readme: bool):
    def write(out: Path, rng: np.random.Generator) -> Miniature:
        wnids = class_list(name)
        index = {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}
        with _archive(out / archive, "w") as tar:
            if readme:
                tar.add(f"{name.replace('_', '-')}/README.txt", b"A miniature made by blocklora fixtures.\n")
            for wnid in wnids:
                tar.add(f"{name.replace('_', '-')}/{wnid}/{file_name(index[wnid])}", _jpeg(rng, index[wnid]))
        return Miniature([out / archive], {"train": 0, "val": 0, "test": len(wnids)}, len(wnids))

    return write


MINIATURES: dict[str, Callable[[Path, np.random.Generator], Miniature]] = {
    "imagenet": _imagenet,
    "caltech101": _caltech101,
    "oxford_pets": _oxford_pets,
    "stanford_cars": _stanford_cars,
    "oxford_flowers": _oxford_flowers,
    "food101": _food101,
    "fgvc_aircraft": _fgvc_aircraft,
    "sun397": _sun397,
    "dtd": _dtd,
    "eurosat": _eurosat,
    "ucf101": _ucf101,
    "imagenet_v2": _imagenet_v2,
    "imagenet_sketch": _imagenet_sketch,
    # file names as in the real archives: scores and class guesses (A), the rendition type (R)
    "imagenet_a": _renditions(
        "imagenet_a", "imagenet-a.tar", lambda i: f"0.{i:06d}_guess _ guess_0.5.jpg", True
    ),
    "imagenet_r": _renditions("imagenet_r", "imagenet-r.tar", lambda i: f"art_{i}.jpg", False),
}


def write_fixtures(out: str | Path, datasets: list[str] | None = None, *, seed: int = 0) -> Path:
    """Write the miniatures of ``datasets`` (default: all 15) into ``out``; returns ``out/sources.json``.

    ``sources.json`` is written last (atomically): its presence means the fixtures are complete.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(datasets or MINIATURES)
    unknown = [name for name in names if name not in MINIATURES]
    if unknown:
        raise ValueError(f"no miniature for {unknown}; miniatures exist for {', '.join(MINIATURES)}")
    entries = {}
    for name in names:
        rng = np.random.default_rng([seed, list(MINIATURES).index(name)])
        mini = MINIATURES[name](out, rng)
        entries[name] = {
            "files": {path.name: {"sha256": _sha256(path)} for path in mini.files},
            "split_sizes": mini.split_sizes,
            "min_images": mini.images,
            **({"test_folders": mini.test_folders} if mini.test_folders else {}),
        }
    return write_json(out / "sources.json", {"format": SOURCES_FORMAT, "datasets": entries})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
