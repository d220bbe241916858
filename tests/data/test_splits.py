"""Split files: the reference CoOp files parse to PROTOCOL §3.1's sizes; malformed files are named."""

from __future__ import annotations

import hashlib
import json

import pytest

from blocklora.data.registry import clean_classname, get_dataset, prompt_classname
from blocklora.data.splits import (
    SplitError,
    class_subset,
    classnames,
    fgvc_split,
    imagenet_classes,
    imagenet_split,
    read_split,
    write_split,
)

REFERENCE = {
    "split_zhou_Caltech101.json": "caltech101",
    "split_zhou_DescribableTextures.json": "dtd",
    "split_zhou_EuroSAT.json": "eurosat",
    "split_zhou_OxfordFlowers.json": "oxford_flowers",
    "split_zhou_OxfordPets.json": "oxford_pets",
    "split_zhou_StanfordCars.json": "stanford_cars",
    "split_zhou_UCF101.json": "ucf101",
}


@pytest.mark.parametrize("filename", sorted(REFERENCE))
def test_reference_split_matches_protocol_counts(reference_split, filename):
    spec = get_dataset(REFERENCE[filename])
    split = read_split(
        reference_split(filename), expected_sizes=spec.split_sizes, num_classes=spec.num_classes
    )
    assert class_subset(split) == list(range(spec.num_classes))


@pytest.mark.parametrize(
    ("filename", "folder_of"),
    [
        ("split_zhou_Caltech101.json", lambda p: p.split("/")[0]),
        ("split_zhou_EuroSAT.json", lambda p: p.split("/")[0]),
        # UCF101's classInd.txt names are CamelCase ("ApplyEyeMakeup"); CoOp's folders are the cleaned names
        ("split_zhou_UCF101.json", lambda p: p.split("/")[0].replace("_", "")),
    ],
)
def test_classname_cleanup_reproduces_the_reference_names(reference_split, filename, folder_of):
    spec = get_dataset(REFERENCE[filename])
    split = read_split(reference_split(filename))
    for path, _, name in split["train"] + split["test"]:
        assert clean_classname(spec, folder_of(path)) == name


def test_caltech_labels_follow_sorted_folders_without_the_dropped_ones(reference_split):
    split = read_split(reference_split("split_zhou_Caltech101.json"))
    folders = sorted({p.split("/")[0] for p, _, _ in split["train"]})
    assert "BACKGROUND_Google" not in folders and "Faces_easy" not in folders
    label_of = {p.split("/")[0]: label for p, label, _ in split["train"]}
    assert [label_of[f] for f in folders] == list(range(100))


def test_sun397_and_prompt_names():
    spec = get_dataset("sun397")
    assert clean_classname(spec, "/a/abbey") == "abbey"
    assert clean_classname(spec, "/a/apartment_building/outdoor") == "outdoor apartment_building"
    assert prompt_classname("Apply_Eye_Makeup") == "Apply Eye Makeup"
    assert clean_classname(get_dataset("dtd"), "banded") == "banded"


def _write(tmp_path, obj) -> str:
    path = tmp_path / "split_bad.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ([], "expected a JSON object"),
        ({"train": [], "val": []}, "missing key"),
        ({"train": {}, "val": [], "test": []}, "'train' must be a list"),
        ({"train": [["a.jpg", 0]], "val": [], "test": []}, r"train\[0\] must be \[relative_path"),
        ({"train": [["a.jpg", "0", "x"]], "val": [], "test": []}, "label must be a non-negative integer"),
        ({"train": [["a.jpg", True, "x"]], "val": [], "test": []}, "label must be a non-negative integer"),
        ({"train": [["/abs/a.jpg", 0, "x"]], "val": [], "test": []}, "must be relative"),
        ({"train": [["../a.jpg", 0, "x"]], "val": [], "test": []}, "must be relative"),
        ({"train": [["a.jpg", 0, ""]], "val": [], "test": []}, "classname must be"),
        ({"train": [["a.jpg", 0, "x"]], "val": [], "test": [["b.jpg", 0, "y"]]}, "label 0 is named 'y'"),
    ],
)
def test_malformed_split_names_file_and_problem(tmp_path, content, problem):
    path = _write(tmp_path, content)
    with pytest.raises(SplitError, match=problem) as err:
        read_split(path)
    assert path in str(err.value)


def test_missing_split_file_is_named(tmp_path):
    with pytest.raises(SplitError, match="split file not found"):
        read_split(tmp_path / "nope.json")


def test_wrong_sizes_and_class_count_are_reported(tmp_path):
    path = _write(tmp_path, {"train": [["a.jpg", 0, "x"]], "val": [], "test": [["b.jpg", 1, "y"]]})
    with pytest.raises(SplitError, match="train has 1 entries, expected 2"):
        read_split(path, expected_sizes={"train": 2, "val": 0, "test": 1})
    with pytest.raises(SplitError, match="2 classes, expected 3"):
        read_split(path, num_classes=3)


def test_write_split_is_atomic_and_refuses_invalid(tmp_path):
    good = {"train": [["a.jpg", 0, "x"]], "val": [], "test": [["b.jpg", 0, "x"]]}
    path = write_split(good, tmp_path / "split.json")
    assert read_split(path) == good
    with pytest.raises(SplitError):
        write_split({"train": []}, tmp_path / "other.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.json"]


def test_imagenet_classnames_are_clip_names_in_sorted_wnid_order():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    rows = imagenet_classes()
    wnids = [w for w, _ in rows]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert [n for _, n in rows] == list(IMAGENET_CLASSNAMES)
    assert rows[0] == ("n01440764", "tench")


def test_imagenet_split_from_class_folders(tmp_path):
    for sub, count in (("train", 3), ("val", 2)):
        for wnid in ("n01443537", "n01440764"):
            for i in range(count):
                (tmp_path / sub / wnid).mkdir(parents=True, exist_ok=True)
                (tmp_path / sub / wnid / f"img_{i}.JPEG").write_bytes(b"x")
        (tmp_path / sub / "n01440764" / "notes.txt").write_text("not an image")
    split = imagenet_split(tmp_path)
    assert split["train"][0] == ["train/n01440764/img_0.JPEG", 0, "tench"]
    assert split["train"][-1] == ["train/n01443537/img_2.JPEG", 1, "goldfish"]
    assert split["val"] == [] and len(split["test"]) == 4  # no val of its own: test images are not val
    assert classnames(split) == {0: "tench", 1: "goldfish"}


def test_imagenet_unknown_wnid_folder_is_an_error(tmp_path):
    (tmp_path / "train/n99999999").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(SplitError, match="n99999999"):
        imagenet_split(tmp_path)


def test_fgvc_unknown_variant_is_an_error(tmp_path):
    (tmp_path / "variants.txt").write_text("A300B4\n")
    for key in ("train", "val", "test"):
        (tmp_path / f"images_variant_{key}.txt").write_text("0001 A300B4\n")
    (tmp_path / "images_variant_test.txt").write_text("0001 A300B4\n0002 F/A-18\n")
    with pytest.raises(SplitError, match=r"images_variant_test.txt:2: variant 'F/A-18'"):
        fgvc_split(tmp_path)


def test_the_shipped_reference_splits_are_the_published_files(reference_split):
    from tests.data.conftest import REFERENCE_SHA256

    for name, digest in REFERENCE_SHA256.items():
        assert hashlib.sha256(reference_split(name).read_bytes()).hexdigest() == digest, name
