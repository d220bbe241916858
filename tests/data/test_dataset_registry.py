"""The dataset registry: the specs of PROTOCOL §3/§4/§6, lookup errors, lazily registered demo specs."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from blocklora.data import registry
from blocklora.data.registry import SPLIT_SOURCES, DatasetSpec, dataset_names, get_dataset, register

BUILTIN = {
    "imagenet": ("ImageNet", 1000, "a photo of a {}."),
    "caltech101": ("Caltech101", 100, "a photo of a {}."),
    "oxford_pets": ("OxfordPets", 37, "a photo of a {}, a type of pet."),
    "stanford_cars": ("StanfordCars", 196, "a photo of a {}."),
    "oxford_flowers": ("Flowers102", 102, "a photo of a {}, a type of flower."),
    "food101": ("Food101", 101, "a photo of {}, a type of food."),
    "fgvc_aircraft": ("FGVCAircraft", 100, "a photo of a {}, a type of aircraft."),
    "sun397": ("SUN397", 397, "a photo of a {}."),
    "dtd": ("DTD", 47, "{} texture."),
    "eurosat": ("EuroSAT", 10, "a centered satellite photo of {}."),
    "ucf101": ("UCF101", 101, "a photo of a person doing {}."),
    "imagenet_v2": ("ImageNet-V2", 1000, "a photo of a {}."),
    "imagenet_sketch": ("ImageNet-Sketch", 1000, "a photo of a {}."),
    "imagenet_a": ("ImageNet-A", 200, "a photo of a {}."),
    "imagenet_r": ("ImageNet-R", 200, "a photo of a {}."),
}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_spec(name):
    spec = get_dataset(name)
    title, num_classes, template = BUILTIN[name]
    assert (spec.name, spec.title, spec.num_classes, spec.template) == (name, title, num_classes, template)
    assert spec.template.count("{}") == 1 and not spec.synthetic
    assert spec.split_source in SPLIT_SOURCES
    assert (spec.split_file_source() is not None) == (spec.split_source == "split_zhou")
    if spec.split_source == "eval_only":
        assert spec.imagenet_labels and spec.label_folders in ("index", "wnid")
        assert spec.split_sizes["train"] == spec.split_sizes["val"] == 0
    for source in spec.sources:
        for digest, length in ((source.md5, 32), (source.sha256, 64)):
            assert digest is None or len(digest) == length
        if source.remote is None:
            assert spec.manual, f"{name}: a file without a URL needs manual instructions"


def test_known_protocol_facts():
    assert get_dataset("oxford_pets").sources[0].md5 == "5c4f3ee8e5d25df40f4fd59a7f44e54c"
    assert get_dataset("ucf101").split_file_source().gdrive_id == "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"
    assert get_dataset("eurosat").split_sizes == {"train": 13500, "val": 5400, "test": 8100}
    assert "image-net.org" in get_dataset("imagenet").manual
    assert "404" in get_dataset("sun397").manual


def test_all_builtins_listed_in_order():
    assert dataset_names()[: len(BUILTIN)] == list(BUILTIN)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'oxford_pet'.*oxford_pets.*imagenet_r"):
        get_dataset("oxford_pet")


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_plugins_loaded", False)


def test_missing_plugin_module_is_tolerated(fresh_registry, monkeypatch):
    monkeypatch.setattr(registry, "_PLUGINS", ("blocklora.data._no_such_plugin",))
    assert "dtd" in dataset_names()


def test_plugin_registers_specs_lazily(fresh_registry, monkeypatch, tmp_path):
    (tmp_path / "toy_demo_plugin.py").write_text(
        "from blocklora.data.registry import DatasetSpec, register\n"
        "register(DatasetSpec(name='demo_toy', title='Demo', template='a photo of a {}.', image_dir='images',"
        " num_classes=4, synthetic=True))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_PLUGINS", ("toy_demo_plugin",))
    monkeypatch.delitem(sys.modules, "toy_demo_plugin", raising=False)
    assert get_dataset("demo_toy").synthetic
    assert "demo_toy" in dataset_names() and "demo_toy" not in dataset_names(include_synthetic=False)


def test_plugin_with_a_broken_import_is_not_hidden(fresh_registry, monkeypatch, tmp_path):
    (tmp_path / "broken_demo_plugin.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_PLUGINS", ("broken_demo_plugin",))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        dataset_names()


def test_register_is_idempotent_but_refuses_conflicts(fresh_registry):
    spec = DatasetSpec(name="demo_x", title="X", template="{}", image_dir=".", num_classes=2, synthetic=True)
    register(spec)
    register(dataclasses.replace(spec))
    with pytest.raises(ValueError, match="demo_x"):
        register(dataclasses.replace(spec, num_classes=3))


# Files nobody publishes a checksum for (TensorFlow Datasets has no record of them either): their
# sha256 is recorded on first download in blocklora/data/checksums.json and checked after.
FIRST_USE = {"UCF-101-midframes.zip", "split_zhou_Food101.json", "split_zhou_SUN397.json"}


def test_every_downloaded_file_has_a_checksum_or_is_pinned_on_first_use():
    unchecked = {
        source.filename
        for name in registry.builtin_names()
        for source in get_dataset(name).sources
        if source.remote and not (source.md5 or source.sha256)
    }
    assert unchecked == FIRST_USE


def test_a_hugging_face_url_names_a_commit_or_its_sha256_pins_the_bytes():
    import re

    for name in registry.builtin_names():
        for source in get_dataset(name).sources:
            if source.url and "huggingface.co" in source.url:
                revision = re.search(r"/resolve/([^/]+)/", source.url)[1]
                assert re.fullmatch(r"[0-9a-f]{40}", revision) or source.sha256, (name, source.url)


def test_the_first_use_lock_file_is_well_formed_and_names_only_those_files():
    import json

    from blocklora.data.fetch import CHECKSUMS_FILE, CHECKSUMS_FORMAT

    data = json.loads(CHECKSUMS_FILE.read_text())
    assert data["format"] == CHECKSUMS_FORMAT
    for entry in data["files"].values():
        assert entry["filename"] in FIRST_USE and len(entry["sha256"]) == 64
