"""Few-shot sampling as docs/protocol.md §4 (Dassl generate_fewshot_dataset under CoOp)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from blocklora.data.fewshot import sample_fewshot, val_is_test, write_fewshot
from blocklora.data.splits import read_split


@pytest.fixture(scope="module")
def pets(reference_split):
    return read_split(reference_split("split_zhou_OxfordPets.json"))


@pytest.fixture(scope="module")
def flowers(reference_split):
    return read_split(reference_split("split_zhou_OxfordFlowers.json"))


def _dassl(split: dict, shots: int, seed: int) -> dict:
    """An independent transcription of Dassl's generate_fewshot_dataset as CoOp calls it."""
    rng = random.Random(seed)  # same Mersenne Twister stream as random.seed(seed) + random.sample

    def generate(data_source, num_shots):
        tracker: dict = {}
        for item in data_source:
            if item[1] not in tracker:
                tracker[item[1]] = []
            tracker[item[1]].append(item)
        dataset = []
        for _label, items in tracker.items():
            sampled = rng.sample(items, num_shots) if len(items) >= num_shots else items
            dataset.extend(sampled)
        return dataset

    train = generate(split["train"], shots)
    val = generate(split["val"], min(shots, 4))
    return {"train": train, "val": val, "test": split["test"]}


def test_pinned_pets_1shot_seed1_matches_an_independent_dassl(pets):
    subset = sample_fewshot(pets, shots=1, seed=1)
    expected = ["Abyssinian_141.jpg", "american_bulldog_200.jpg", "american_pit_bull_terrier_118.jpg"]
    assert [e[0] for e in subset["train"][:3]] == expected
    assert [e[0] for e in subset["val"][:3]] == ["Abyssinian_109.jpg", "american_bulldog_122.jpg",
                                                  "american_pit_bull_terrier_172.jpg"]  # fmt: skip
    assert subset == _dassl(pets, 1, 1)


@pytest.mark.parametrize(("shots", "seed"), [(2, 1), (4, 2), (16, 3)])
def test_matches_independent_dassl_on_shuffled_labels(flowers, shots, seed):
    assert sample_fewshot(flowers, shots, seed) == _dassl(flowers, shots, seed)


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_counts_per_class(pets, shots):
    subset = sample_fewshot(pets, shots, seed=1)
    assert set(Counter(e[1] for e in subset["train"]).values()) == {shots}
    assert set(Counter(e[1] for e in subset["val"]).values()) == {min(shots, 4)}
    assert subset["test"] == pets["test"]
    for key in ("train", "val"):
        assert len({e[0] for e in subset[key]}) == len(subset[key]), "no repeats"
        assert all(e in pets[key] for e in subset[key])


def test_same_seed_same_subset_different_seeds_differ(pets):
    a = sample_fewshot(pets, 4, seed=1)
    random.random()  # global state in between must not matter
    assert sample_fewshot(pets, 4, seed=1) == a
    assert sample_fewshot(pets, 4, seed=2)["train"] != a["train"]


def test_order_is_label_first_appearance(flowers):
    first_seen = list(dict.fromkeys(e[1] for e in flowers["train"]))
    assert first_seen[:2] != sorted(first_seen)[:2], "the flowers file is not label-sorted"
    subset = sample_fewshot(flowers, 2, seed=1)
    assert list(dict.fromkeys(e[1] for e in subset["train"])) == first_seen
    labels = [e[1] for e in subset["train"]]
    assert labels == [lab for lab in first_seen for _ in range(2)]


def test_fewer_items_than_shots_takes_all_without_repeats():
    split = {
        "train": [
            ["a1.jpg", 0, "a"],
            ["b1.jpg", 1, "b"],
            ["a2.jpg", 0, "a"],
            ["b2.jpg", 1, "b"],
            ["b3.jpg", 1, "b"],
        ],
        "val": [["a3.jpg", 0, "a"]],
        "test": [["t.jpg", 0, "a"]],
    }
    subset = sample_fewshot(split, shots=3, seed=1)
    assert [e[0] for e in subset["train"] if e[1] == 0] == ["a1.jpg", "a2.jpg"]
    assert sorted(e[0] for e in subset["train"] if e[1] == 1) == ["b1.jpg", "b2.jpg", "b3.jpg"]
    assert subset["val"] == split["val"]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_a_class_with_exactly_shots_items_is_shuffled_as_dassl_does(seed):
    """Dassl samples when len(items) >= K: a class of exactly K items comes out permuted and draws."""
    train = [
        [f"{c}{i}.jpg", label, c]
        for label, (c, n) in enumerate([("a", 3), ("b", 4), ("c", 5)])
        for i in range(n)
    ]
    split = {"train": train, "val": [["v.jpg", 0, "a"]], "test": [["t.jpg", 0, "a"]]}
    assert sample_fewshot(split, shots=4, seed=seed) == _dassl(split, 4, seed)


def test_two_classes_sharing_a_name_are_sampled_apart():
    """ImageNet has such names ("crane" the bird and the machine): grouping is by label."""
    train = [[f"{label}_{i}.jpg", label, "crane"] for label in (0, 1) for i in range(5)]
    subset = sample_fewshot({"train": train, "val": [], "test": [["t.jpg", 0, "crane"]]}, shots=2, seed=1)
    assert Counter(e[1] for e in subset["train"]) == {0: 2, 1: 2}


def _classes(per_class: int, prefix: str) -> list[list]:
    return [
        [f"{prefix}/{name}_{i}.jpg", label, name]
        for label, name in enumerate(["cat", "dog"])
        for i in range(per_class)
    ]


@pytest.mark.parametrize("val", ["empty", "overlaps test"])
def test_a_val_that_cannot_select_models_is_drawn_from_the_train_images_left(val):
    train, test = _classes(5, "train"), _classes(3, "test")
    split = {"train": train, "val": [] if val == "empty" else test[:2] + test[3:5], "test": test}
    assert val_is_test(split)
    subset = sample_fewshot(split, shots=4, seed=1)
    paths = {key: [e[0] for e in subset[key]] for key in ("train", "val")}
    assert not set(paths["train"]) & set(paths["val"])  # 5 per class, 4 trained on: 1 left each
    assert set(paths["val"]) <= {e[0] for e in train}
    assert Counter(e[1] for e in subset["val"]) == {0: 1, 1: 1}
    assert sample_fewshot(split, shots=4, seed=1) == subset


def test_a_val_of_its_own_is_kept_and_sampled():
    split = {"train": _classes(5, "train"), "val": _classes(6, "val"), "test": _classes(3, "test")}
    assert not val_is_test(split)
    subset = sample_fewshot(split, shots=2, seed=1)
    assert all(e in split["val"] for e in subset["val"]) and len(subset["val"]) == 4
    assert subset == _dassl(split, 2, 1)


@pytest.mark.parametrize("shots", [0, -1, 1.5, True])
def test_invalid_shots_is_a_value_error(shots):
    with pytest.raises(ValueError, match="shots"):
        sample_fewshot({"train": [], "val": [], "test": []}, shots, seed=1)


def test_write_fewshot_writes_the_sampled_subset(pets, tmp_path, reference_split):
    out = write_fewshot(
        reference_split("split_zhou_OxfordPets.json"), 2, 3, tmp_path / "fs/shots2_seed3.json"
    )
    assert json.loads(out.read_text()) == sample_fewshot(pets, 2, 3)
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_write_fewshot_rejects_bad_shots_without_writing(tmp_path, reference_split):
    with pytest.raises(ValueError, match="shots"):
        write_fewshot(reference_split("split_zhou_OxfordPets.json"), 0, 1, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
