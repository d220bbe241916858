"""The procedural demo data: deterministic, held out from the corpus, written in the CoOp split format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blocklora.data import synthetic


def test_corpus_is_deterministic_for_a_seed():
    images_a, captions_a, _ = synthetic.make_corpus(16, seed=3)
    images_b, captions_b, _ = synthetic.make_corpus(16, seed=3)
    images_c, _, _ = synthetic.make_corpus(16, seed=4)
    assert images_a.dtype == np.uint8
    assert images_a.shape == (16, synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE, 3)
    assert np.array_equal(images_a, images_b)
    assert captions_a == captions_b
    assert not np.array_equal(images_a, images_c)


def test_corpus_captions_name_the_attributes_and_never_a_held_out_combination():
    _, captions, attributes = synthetic.make_corpus(300, seed=0)
    for text, attrs in zip(captions, attributes, strict=True):
        assert text.endswith(".")
        words = text.rstrip(".").split()
        named = {attrs.shape, attrs.color, attrs.pattern, synthetic.PATTERN_NOUNS[attrs.pattern].split()[-1]}
        assert named & set(words), text
        assert not synthetic.held_out_combo(attrs.color, attrs.shape)
        assert attrs.style in synthetic.CORPUS_STYLES
    assert len(set(captions)) > 100


def test_write_corpus_round_trips(tmp_path):
    path = synthetic.write_corpus(tmp_path / "corpus", n_images=8, seed=1)
    images, captions = synthetic.load_corpus(tmp_path / "corpus")
    assert path.name == synthetic.CORPUS_FILE
    assert images.shape[0] == len(captions) == 8
    assert not list((tmp_path / "corpus").glob("*.tmp"))


def test_load_corpus_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_corpus"):
        synthetic.load_corpus(tmp_path)


def test_every_shape_pattern_and_style_renders():
    rng = np.random.default_rng(0)
    for shape in synthetic.SHAPES:
        for pattern in synthetic.PATTERNS:
            for style in synthetic.CORPUS_STYLES + synthetic.SHIFTED_STYLES:
                image = synthetic.render(synthetic.Attributes(shape, "red", pattern, style), rng)
                assert image.shape == (32, 32, 3)
                assert image.std() > 0


def test_held_out_combinations_cover_every_shape_and_colour_twice():
    combos = synthetic.HELD_OUT_COMBOS
    assert len(combos) == 2 * len(synthetic.SHAPES)
    for shape in synthetic.SHAPES:
        assert sum(s == shape for _, s in combos) == 2
    for color in synthetic.COLORS:
        assert sum(c == color for c, _ in combos) == 2


@pytest.mark.parametrize("name", sorted(synthetic.DATASETS))
def test_write_dataset_writes_a_coop_split_with_every_class(tmp_path, name):
    spec = synthetic.DATASETS[name]
    path = synthetic.write_dataset(name, tmp_path, seed=0)
    assert path == tmp_path / name / "split.json"
    split = json.loads(path.read_text())
    assert set(split) == {"train", "val", "test"}
    for part, per_class in zip(("train", "val", "test"), spec.per_class, strict=True):
        entries = split[part]
        assert len(entries) == per_class * len(spec.classnames)
        for rel, label, classname in entries:
            assert isinstance(label, int)
            assert spec.classnames[label] == classname
            assert (tmp_path / name / spec.image_dir / rel).is_file()
        labels = [label for _, label, _ in entries]
        assert sorted(set(labels)) == list(range(len(spec.classnames)))
    all_paths = [rel for part in split.values() for rel, _, _ in part]
    assert len(all_paths) == len(set(all_paths))


def test_write_dataset_is_deterministic_and_seeded(tmp_path):
    a = synthetic.write_dataset("demo_colors", tmp_path / "a", seed=0)
    b = synthetic.write_dataset("demo_colors", tmp_path / "b", seed=0)
    c = synthetic.write_dataset("demo_colors", tmp_path / "c", seed=1)
    assert a.read_bytes() == b.read_bytes()
    rel = json.loads(a.read_text())["test"][0][0]
    image = lambda root: (root.parent / "images" / rel).read_bytes()  # noqa: E731
    assert image(a) == image(b)
    assert image(a) != image(c)


def test_combos_are_held_out_of_the_corpus():
    spec = synthetic.DATASETS["demo_combos"]
    for classname in spec.classnames:
        color, shape = classname.split()
        assert synthetic.held_out_combo(color, shape)


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="demo_shapes"):
        synthetic.write_dataset("demo_nope", tmp_path)
