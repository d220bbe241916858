"""The miniatures of the real datasets go through the real download and prepare code, and keep
each dataset's class count, class names and layout; ImageNet's ILSVRC archives are unpacked by class."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from scipy.io import savemat

from blocklora.data.errors import ChecksumError, ExtractionError
from blocklora.data.extract import unpack_ilsvrc2012
from blocklora.data.fewshot import sample_fewshot
from blocklora.data.fixtures import MINIATURES, TESTED_OF_1000, class_list, write_fixtures
from blocklora.data.prepare import fetch_dataset, prepare_dataset
from blocklora.data.registry import clean_classname, get_dataset
from blocklora.data.splits import imagenet_classes, imagenet_wnid_index, read_split


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Every miniature written, then fetched and prepared offline as the workflow would."""
    archives = tmp_path_factory.mktemp("fixtures")
    sources = write_fixtures(archives)
    root = tmp_path_factory.mktemp("data")
    splits = {}
    for name in MINIATURES:
        fetch_dataset(name, root, archives_dir=archives, sources=sources, download=False)
        splits[name] = read_split(
            prepare_dataset(name, root, archives_dir=archives, sources=sources, download=False)
        )
    return archives, root, splits


def names_by_label(split: dict) -> dict[int, str]:
    return {e[1]: e[2] for key in ("train", "val", "test") for e in split[key]}


@pytest.mark.parametrize("name", sorted(MINIATURES))
def test_each_miniature_has_its_datasets_class_count_and_every_image_exists(prepared, name):
    _, root, splits = prepared
    spec, split = get_dataset(name), splits[name]
    labels = names_by_label(split)
    if name in ("imagenet_v2", "imagenet_sketch"):  # test-only: a hundred of ImageNet's classes, spread
        assert sorted(labels) == TESTED_OF_1000 and {0, 999} <= set(labels)
        imagenet = dict(enumerate(name for _, name in imagenet_classes()))
        assert all(labels[label] == imagenet[label] for label in labels)
    else:
        assert len(labels) == spec.num_classes
    if name == "imagenet":  # every class trains; a hundred are tested
        assert sorted({e[1] for e in split["test"]}) == TESTED_OF_1000
    image_root = root / name / spec.image_dir
    for key in ("train", "val", "test"):
        assert all((image_root / e[0]).is_file() for e in split[key])


EXPECTED_NAMES = {
    "caltech101": lambda: [
        clean_classname(get_dataset("caltech101"), f)
        for f in sorted(class_list("caltech101"))
        if f not in ("BACKGROUND_Google", "Faces_easy")
    ],
    "oxford_pets": lambda: [p.lower() for p in class_list("oxford_pets")],
    "sun397": lambda: [clean_classname(get_dataset("sun397"), c) for c in class_list("sun397")],
    "eurosat": lambda: [clean_classname(get_dataset("eurosat"), c) for c in class_list("eurosat")],
    "ucf101": lambda: [clean_classname(get_dataset("ucf101"), c) for c in class_list("ucf101")],
    "fgvc_aircraft": lambda: class_list("fgvc_aircraft"),
    "food101": lambda: sorted(class_list("food101")),
    "imagenet": lambda: [name for _, name in imagenet_classes()],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_class_names_are_the_real_ones_in_label_order(prepared, name):
    names = names_by_label(prepared[2][name])
    assert [names[i] for i in range(len(names))] == EXPECTED_NAMES[name]()
    if name == "caltech101":
        assert names[0] == "face" and "BACKGROUND_Google" not in names.values()


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_a_and_r_hold_their_200_classes_under_imagenet_labels(prepared, name):
    labels = {e[1] for e in prepared[2][name]["test"]}
    index = imagenet_wnid_index()
    assert labels == {index[wnid] for wnid in class_list(name)} and len(labels) == 200


def test_no_validation_image_is_a_test_image(prepared, reference_split):
    """Model selection (linear probe C, Tip-Adapter's alpha/beta and epoch) never sees test images."""
    splits = dict(prepared[2])
    for file in ("Caltech101", "DescribableTextures", "EuroSAT", "OxfordFlowers", "OxfordPets", "StanfordCars",
                 "UCF101"):  # fmt: skip
        splits[file] = read_split(reference_split(f"split_zhou_{file}.json"))
    for name, split in splits.items():
        if not split["train"]:
            continue  # test-only sets
        test = {e[0] for e in split["test"]}
        for shots, seed in ((1, 1), (2, 2)):  # the miniatures hold 2 train images per class
            subset = sample_fewshot(split, shots, seed)
            assert not test & {e[0] for e in subset["val"]}, name
            assert not {e[0] for e in subset["train"]} & {e[0] for e in subset["val"]}, name
            assert subset["val"], name


def test_imagenet_val_is_drawn_from_train_images_left_over_deterministically(prepared):
    split = prepared[2]["imagenet"]
    assert split["val"] == []
    first, again = sample_fewshot(split, 2, 1), sample_fewshot(split, 2, 1)
    assert first == again and len(first["train"]) == 2000 and len(first["val"]) == 1000
    assert {e[0] for e in first["val"]} <= {e[0] for e in split["train"]}
    assert first["val"] != sample_fewshot(split, 2, 2)["val"]


def test_a_file_that_does_not_match_its_sources_checksum_is_refused(prepared, tmp_path):
    archives = prepared[0]
    sources = json.loads((archives / "sources.json").read_text())
    sources["datasets"]["dtd"]["files"]["dtd-r1.0.1.tar.gz"]["sha256"] = "0" * 64
    (tmp_path / "sources.json").write_text(json.dumps(sources))
    with pytest.raises(ChecksumError, match=r"sha256 of .*dtd-r1.0.1.tar.gz is .*, expected 0000"):
        fetch_dataset("dtd", tmp_path / "data", archives_dir=archives, sources=tmp_path / "sources.json")


# ---------------------------------------------------------------------------------------------
# ILSVRC-2012 unpacking, on three classes whose ILSVRC ids are not their sorted-wnid order.


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def ilsvrc(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    ids = {"n01440764": 3, "n01443537": 1, "n01484850": 2}  # ILSVRC2012_ID, not the sorted order
    fields = [("ILSVRC2012_ID", object), ("WNID", object), ("words", object), ("gloss", object),
              ("num_children", object)]  # fmt: skip
    synsets = np.zeros((4, 1), dtype=fields)
    for row, wnid in enumerate(wnids):
        synsets[row, 0] = (ids[wnid], wnid, wnid, "", 0)
    synsets[3, 0] = (1001, "n99999999", "an inner node", "", 3)
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    val_classes = ["n01484850", "n01440764", "n01443537", "n01440764"]  # image k's class
    truth = "\n".join(str(ids[w]) for w in val_classes).encode()
    (tmp_path / "devkit.tar.gz").write_bytes(_tar({"ILSVRC2012_devkit_t12/data/meta.mat": meta.getvalue(),
                                                   "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
                                                   truth}, "w:gz"))  # fmt: skip
    inner = {w: _tar({f"{w}_{i}.JPEG": f"{w} train {i}".encode() for i in range(2)}) for w in wnids}
    (tmp_path / "train.tar").write_bytes(_tar({f"{w}.tar": data for w, data in inner.items()}))
    val = {f"ILSVRC2012_val_{k:08d}.JPEG": f"val {k} {w}".encode() for k, w in enumerate(val_classes, 1)}
    (tmp_path / "val.tar").write_bytes(_tar(val))
    return tmp_path, val_classes


def test_ilsvrc_archives_unpack_into_one_folder_per_class(ilsvrc):
    folder, val_classes = ilsvrc
    unpack_ilsvrc2012(folder / "out", folder / "train.tar", folder / "val.tar", folder / "devkit.tar.gz")
    images = folder / "out" / "images"
    assert sorted(p.name for p in (images / "train" / "n01443537").iterdir()) == [
        "n01443537_0.JPEG",
        "n01443537_1.JPEG",
    ]
    for k, wnid in enumerate(val_classes, 1):
        path = images / "val" / wnid / f"ILSVRC2012_val_{k:08d}.JPEG"
        assert path.read_bytes() == f"val {k} {wnid}".encode()  # each image in its ground-truth class


def test_an_ilsvrc_member_outside_its_folder_is_refused(ilsvrc):
    folder, _ = ilsvrc
    (folder / "evil.tar").write_bytes(_tar({"n01440764.tar": _tar({"../../escape.JPEG": b"x"})}))
    with pytest.raises(ExtractionError, match="not a plain file name"):
        unpack_ilsvrc2012(folder / "out", folder / "evil.tar", folder / "val.tar", folder / "devkit.tar.gz")
    assert not (folder / "escape.JPEG").exists()


def _md5(path) -> dict:
    import hashlib

    return {"md5": hashlib.md5(path.read_bytes()).hexdigest()}


def test_ilsvrc_archives_are_verified_as_they_are_read_and_a_mismatch_leaves_nothing(ilsvrc):
    """The 138 GB train tar is read once: hashed while unpacked, not checked first and read again."""
    folder, _ = ilsvrc
    archives = [folder / "train.tar", folder / "val.tar", folder / "devkit.tar.gz"]
    sums = tuple(_md5(path) for path in archives)
    damaged = bytearray((folder / "val.tar").read_bytes())
    damaged[512] ^= 1  # one bit of the first image
    (folder / "val.tar").write_bytes(damaged)
    with pytest.raises(ChecksumError, match=r"md5 of .*val\.tar is [0-9a-f]{32}, expected .*replace it"):
        unpack_ilsvrc2012(folder / "out", *archives, checksums=sums)
    assert [p.name for p in (folder / "out").iterdir()] == [".extracting.lock"]  # no half-unpacked ImageNet
    sums = tuple(_md5(path) for path in archives)
    unpack_ilsvrc2012(folder / "out", *archives, checksums=sums)
    assert len(list((folder / "out" / "images" / "train").rglob("*.JPEG"))) == 6


def test_ilsvrc_unpacking_never_writes_through_a_symlink_planted_in_the_data_folder(ilsvrc):
    """The data folder sits in a shared results folder: a link planted at images/ is refused."""
    folder, _ = ilsvrc
    victim = folder / "victim"
    victim.mkdir()
    (folder / "out").mkdir()
    (folder / "out" / "images").symlink_to(victim)
    with pytest.raises(ExtractionError, match=r"out/images: it is a symlink"):
        unpack_ilsvrc2012(folder / "out", folder / "train.tar", folder / "val.tar", folder / "devkit.tar.gz")
    assert list(victim.iterdir()) == []
