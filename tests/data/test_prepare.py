"""prepare_dataset: local archives without network, loopback downloads, layout and split checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from blocklora.data import registry
from blocklora.data.errors import ChecksumError, LayoutError, ManualDownloadRequired
from blocklora.data.extract import verify_layout
from blocklora.data.prepare import fetch_dataset, prepare_dataset
from blocklora.data.registry import Source, get_dataset
from blocklora.data.splits import imagenet_wnid_index, read_split

CLASSES = ["banded", "dotted", "zigzagged"]


def _images(per_class: int = 3) -> dict[str, bytes]:
    return {f"dtd/images/{c}/{c}_{i:04d}.jpg": f"{c}{i}".encode() for c in CLASSES for i in range(per_class)}


def _split(per_class: int = 3) -> dict:
    split: dict = {"train": [], "val": [], "test": []}
    for label, c in enumerate(CLASSES):
        names = [f"{c}/{c}_{i:04d}.jpg" for i in range(per_class)]
        split["train"].append([names[0], label, c])
        split["val"].append([names[1], label, c])
        split["test"].append([names[2], label, c])
    return split


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def toy(tmp_path, make_tar, monkeypatch):
    """A DTD-shaped dataset 'toy_dtd' whose archive and split file sit in tmp_path/archives."""
    archives = tmp_path / "archives"
    archives.mkdir()
    archive = make_tar(archives / "toy.tar.gz", _images())
    (archives / "split_zhou_Toy.json").write_text(json.dumps(_split()))
    spec = dataclasses.replace(
        get_dataset("dtd"),
        name="toy_dtd",
        title="ToyDTD",
        num_classes=3,
        sources=(
            Source(filename="toy.tar.gz", url="http://127.0.0.1:9/toy.tar.gz", md5=_md5(archive)),
            Source(filename="split_zhou_Toy.json", gdrive_id="TOYID", kind="split"),
        ),
        layout=("dtd/images/banded",),
        split_sizes={"train": 3, "val": 3, "test": 3},
        min_images=9,
        manual="Put toy.tar.gz in the archives folder.",
    )
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    return spec, archives


def test_prepare_from_local_archives_needs_no_network(toy, tmp_path, no_network):
    _, archives = toy
    split_path = prepare_dataset("toy_dtd", tmp_path / "data", archives_dir=archives, progress=False)
    assert split_path == tmp_path / "data/toy_dtd/split.json"
    assert read_split(split_path) == _split()
    assert (tmp_path / "data/toy_dtd/dtd/images/banded/banded_0000.jpg").is_file()
    assert prepare_dataset("toy_dtd", tmp_path / "data", archives_dir=archives) == split_path


def test_download_step_fetches_and_verifies_then_prepare_runs_offline(
    toy, tmp_path, file_server, monkeypatch, request
):
    spec, archives = toy
    file_server.files["toy.tar.gz"] = (archives / "toy.tar.gz").read_bytes()
    (archives / "toy.tar.gz").unlink()
    sources = (dataclasses.replace(spec.sources[0], url=file_server.url("toy.tar.gz")), spec.sources[1])
    monkeypatch.setitem(registry._REGISTRY, spec.name, dataclasses.replace(spec, sources=sources))
    manifest = fetch_dataset("toy_dtd", tmp_path / "data", archives_dir=archives, progress=False)
    files = json.loads(manifest.read_text())["files"]
    assert files == {
        "toy.tar.gz": str(archives / "toy.tar.gz"),
        "split_zhou_Toy.json": str(archives / "split_zhou_Toy.json"),
    }
    assert not (tmp_path / "data/toy_dtd/dtd").exists(), "downloading extracts nothing"
    request.getfixturevalue("no_network")  # from here on, any download attempt fails the test
    split_path = prepare_dataset("toy_dtd", tmp_path / "data", archives_dir=archives, download=False)
    assert read_split(split_path) == _split()


def test_prepare_finds_archives_in_the_dataset_folder(toy, tmp_path, no_network):
    _, archives = toy
    root = tmp_path / "data/toy_dtd"
    root.mkdir(parents=True)
    for f in archives.iterdir():
        f.rename(root / f.name)
    assert prepare_dataset("toy_dtd", tmp_path / "data").is_file()


def test_prepare_downloads_from_the_server(toy, tmp_path, file_server, monkeypatch):
    spec, archives = toy
    url = file_server.url("toy.tar.gz")
    file_server.files["toy.tar.gz"] = (archives / "toy.tar.gz").read_bytes()
    (archives / "toy.tar.gz").unlink()
    sources = (dataclasses.replace(spec.sources[0], url=url), spec.sources[1])
    monkeypatch.setitem(registry._REGISTRY, spec.name, dataclasses.replace(spec, sources=sources))
    prepare_dataset("toy_dtd", tmp_path / "data", archives_dir=archives, progress=False)
    assert (archives / "toy.tar.gz").is_file(), "downloads go to the archives folder"
    assert file_server.log == [("toy.tar.gz", None)]


def test_incomplete_archive_fails_layout_check_and_writes_no_split(toy, tmp_path, make_tar, no_network):
    spec, archives = toy
    images = {k: v for k, v in _images().items() if "zigzagged" not in k}
    archive = make_tar(archives / "toy.tar.gz", images)
    sources = (dataclasses.replace(spec.sources[0], md5=_md5(archive)), spec.sources[1])
    registry._REGISTRY[spec.name] = dataclasses.replace(spec, sources=sources)
    with pytest.raises(LayoutError) as err:
        prepare_dataset("toy_dtd", tmp_path / "data", archives_dir=archives)
    message = str(err.value)
    assert "found 6 images" in message and "at least 9" in message
    assert "Put toy.tar.gz in the archives folder." in message
    assert not (tmp_path / "data/toy_dtd/split.json").exists()


def test_split_naming_missing_images_is_refused(toy, tmp_path, no_network):
    _, archives = toy
    split = _split()
    split["test"][0][0] = "banded/not_there.jpg"
    (archives / "split_zhou_Toy.json").write_text(json.dumps(split))
    with pytest.raises(LayoutError, match=r"1 images named by the split are missing.*not_there\.jpg"):
        prepare_dataset("toy_dtd", tmp_path / "data", archives_dir=archives)
    assert not (tmp_path / "data/toy_dtd/split.json").exists()


def test_user_archive_with_wrong_checksum_is_reported(toy, tmp_path, no_network):
    _, archives = toy
    with open(archives / "toy.tar.gz", "ab") as f:
        f.write(b"tail")
    with pytest.raises(ChecksumError, match=r"toy\.tar\.gz.*replace it"):
        prepare_dataset("toy_dtd", tmp_path / "data", archives_dir=archives)


def test_layout_already_present_skips_archives(toy, tmp_path, make_tar, no_network):
    _, archives = toy
    root = tmp_path / "data/toy_dtd"
    for rel, content in _images().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    (archives / "toy.tar.gz").unlink()
    assert prepare_dataset("toy_dtd", tmp_path / "data", archives_dir=archives).is_file()


def test_missing_sun397_says_where_to_put_what(tmp_path, no_network):
    with pytest.raises(ManualDownloadRequired) as err:
        prepare_dataset("sun397", tmp_path / "data", archives_dir=tmp_path / "arch")
    message = str(err.value)
    for expected in ("SUN397.tar.gz", "8ca2778205c41d23104230ba66911c7a", "404", str(tmp_path / "arch")):
        assert expected in message


def test_missing_manual_dataset_says_where_to_put_what(tmp_path, no_network):
    with pytest.raises(ManualDownloadRequired) as err:
        prepare_dataset("stanford_cars", tmp_path / "data", archives_dir=tmp_path / "arch")
    message = str(err.value)
    for expected in ("cars_train.tgz", "jessicali9530/stanford-cars-dataset", str(tmp_path / "arch")):
        assert expected in message


def test_missing_imagenet_is_a_manual_download_that_explains_the_licence(tmp_path, no_network):
    with pytest.raises(ManualDownloadRequired) as err:
        prepare_dataset("imagenet", tmp_path / "data")
    assert "image-net.org" in str(err.value) and "images/train/nXXXXXXXX" in str(err.value)
    assert "ILSVRC2012_devkit_t12.tar.gz" in str(err.value) and "archives folder" in str(err.value)


def test_downloads_off_and_file_absent_is_manual(toy, tmp_path, no_network):
    _, archives = toy
    (archives / "toy.tar.gz").unlink()
    with pytest.raises(ManualDownloadRequired, match="downloads are off"):
        prepare_dataset("toy_dtd", tmp_path / "data", archives_dir=archives, download=False)


def test_fgvc_split_is_built_from_official_files(tmp_path, make_tar, monkeypatch, no_network):
    data = "fgvc-aircraft-2013b/data"
    members = {f"{data}/images/{i:07d}.jpg": b"x" for i in range(6)}
    members[f"{data}/variants.txt"] = b"707-320\nBoeing 717\n"
    members[f"{data}/images_variant_train.txt"] = b"0000000 707-320\n0000001 Boeing 717\n"
    members[f"{data}/images_variant_val.txt"] = b"0000002 707-320\n0000003 Boeing 717\n"
    members[f"{data}/images_variant_test.txt"] = b"0000004 Boeing 717\n0000005 707-320\n"
    archive = make_tar(tmp_path / "fgvc-aircraft-2013b.tar.gz", members)
    spec = dataclasses.replace(
        get_dataset("fgvc_aircraft"),
        num_classes=2,
        sources=(
            dataclasses.replace(get_dataset("fgvc_aircraft").sources[0], md5=_md5(archive), sha256=None),
        ),
        split_sizes={"train": 2, "val": 2, "test": 2},
        min_images=6,
    )
    monkeypatch.setitem(registry._REGISTRY, "fgvc_aircraft", spec)
    split = read_split(prepare_dataset("fgvc_aircraft", tmp_path / "data", archives_dir=tmp_path))
    assert split["test"] == [["0000004.jpg", 1, "Boeing 717"], ["0000005.jpg", 0, "707-320"]]


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_v2"])
def test_eval_only_sets_keep_imagenet_labels(tmp_path, make_tar, monkeypatch, no_network, name):
    base = get_dataset(name)
    wnids = ["n01443537", "n01530575", "n09472597"]  # goldfish, brambling, volcano
    index = imagenet_wnid_index()
    folders = wnids if base.label_folders == "wnid" else [str(index[w]) for w in wnids]
    members = {f"{base.image_dir}/{f}/{k}.jpg": b"x" for f in folders for k in range(2)}
    archive = make_tar(tmp_path / base.sources[0].filename, members)
    spec = dataclasses.replace(
        base,
        num_classes=3,
        sources=(dataclasses.replace(base.sources[0], md5=_md5(archive), sha256=None),),
        layout=(base.image_dir,),
        split_sizes={"train": 0, "val": 0, "test": 6},
        min_images=6,
    )
    monkeypatch.setitem(registry._REGISTRY, name, spec)
    split = read_split(prepare_dataset(name, tmp_path / "data", archives_dir=tmp_path))
    assert split["train"] == [] and split["val"] == []
    assert sorted({e[1] for e in split["test"]}) == [1, 10, 980]
    assert {e[2] for e in split["test"]} == {"goldfish", "brambling", "volcano"}


def test_verify_layout_passes_on_a_good_tree_and_names_what_is_missing(tmp_path):
    from dataclasses import replace

    spec = replace(get_dataset("oxford_pets"), min_images=3)
    with pytest.raises(LayoutError, match=r"missing .*images"):
        verify_layout(spec, tmp_path)
    (tmp_path / "images").mkdir()
    for name in ("Abyssinian_1.jpg", "Abyssinian_2.jpg"):
        (tmp_path / "images" / name).write_bytes(b"jpeg")
    with pytest.raises(LayoutError, match=r"found 2 images .*expected at least 3"):
        verify_layout(spec, tmp_path)
    (tmp_path / "images" / "Bengal_1.jpg").write_bytes(b"jpeg")
    verify_layout(spec, tmp_path)  # a good tree passes
    split = {
        "train": [["Abyssinian_1.jpg", 0, "abyssinian"]],
        "val": [],
        "test": [["Bengal_9.jpg", 1, "bengal"]],
    }
    with pytest.raises(LayoutError, match=r"1 images named by the split are missing .*Bengal_9.jpg"):
        verify_layout(spec, tmp_path, split)


def test_an_archive_replaced_after_it_was_first_read_is_not_what_gets_extracted(
    toy, tmp_path, make_tar, monkeypatch, no_network
):
    """A shared archives folder: someone swaps the archive right after it was read once (checked).
    What is extracted must be the bytes that were verified, so the archive is read only once."""
    import builtins
    import os
    import tarfile
    from pathlib import Path

    _, archives = toy
    archive = archives / "toy.tar.gz"
    evil = make_tar(tmp_path / "evil.tar.gz", {**_images(), "dtd/images/banded/planted.jpg": b"x"})
    real_open, reads = builtins.open, []

    def open_then_swap(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and Path(file) == archive:
            reads.append(file)
            if len(reads) == 2:
                os.replace(evil, archive)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_then_swap)
    monkeypatch.setattr(tarfile, "bltn_open", open_then_swap)
    prepare_dataset("toy_dtd", tmp_path / "data", archives_dir=archives)
    assert not (tmp_path / "data/toy_dtd/dtd/images/banded/planted.jpg").exists()
    assert len(reads) == 1
