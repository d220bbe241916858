import logging

import pytest
import torch
import torch.nn.functional as F

from blocklora import evaluate as evaluate_module
from blocklora.clip import Backbone, load_backbone
from blocklora.data import loading
from blocklora.data.splits import read_split
from blocklora.evaluate import evaluate
from blocklora.features import image_features
from blocklora.methods.linear_probe import LinearProbe
from blocklora.runtime import RunContext


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """Number of images through ``Backbone.encode_image``, one entry per call."""
    calls: list[int] = []
    original = Backbone.encode_image

    def counting(self, images, normalize=True):
        calls.append(len(images))
        return original(self, images, normalize)

    monkeypatch.setattr(Backbone, "encode_image", counting)
    return calls


@pytest.fixture
def tiny(tiny_config, tiny_checkpoint, toy_dataset):
    images, fewshot = toy_dataset
    return load_backbone(tiny_config, str(tiny_checkpoint)), read_split(fewshot), images


def cpu_run(cache_dir=None, seed: int = 1, threads: int = 1) -> RunContext:
    return RunContext(
        device=torch.device("cpu"), seed=seed, progress=False, cache_dir=cache_dir, threads=threads
    )


def test_test_features_are_encoded_once_for_every_run_and_method_of_a_dataset(
    run_method, toy_dataset, tmp_path, encoded, subset
):
    _, fewshot = toy_dataset
    splits = read_split(fewshot)
    cache = tmp_path / "cache"
    six = subset(fewshot, 6, tmp_path / "six.json")

    run_method("linear_probe", cache_dir=cache)
    assert sum(encoded) == len(splits["train"]) + len(splits["val"]) + len(splits["test"])

    encoded.clear()
    run_method("linear_probe", shots=6, seed=2, fewshot=six, cache_dir=cache, folder=tmp_path / "b")
    assert sum(encoded) == 6 * 4  # only the new training subset; val and test come from the cache

    encoded.clear()
    run_method("tip_adapter", {"augment_passes": 2}, cache_dir=cache, folder=tmp_path / "c")
    assert sum(encoded) == 2 * len(splits["train"])  # its augmented views; test features shared

    encoded.clear()
    run_method("tip_adapter", {"augment_passes": 2}, cache_dir=cache, folder=tmp_path / "d")
    assert sum(encoded) == 0


def test_augmented_views_are_seeded_per_image_and_cached(tiny, tmp_path, encoded):
    backbone, splits, images = tiny
    entries = splits["train"][:6]
    run = cpu_run(tmp_path / "cache")
    state = torch.get_rng_state()

    first = image_features(backbone, entries, images, augment=True, passes=2, seed=1, run=run)
    assert first.shape == (2, 6, 32)
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is untouched
    assert not torch.allclose(first[0], first[1])  # two different views
    assert sum(encoded) == 12

    again = image_features(backbone, entries, images, augment=True, passes=2, seed=1, run=run)
    torch.testing.assert_close(again, first)
    assert sum(encoded) == 12  # from the cache

    reversed_uncached = image_features(
        backbone,
        entries[::-1],
        images,
        augment=True,
        passes=2,
        seed=1,
        run=cpu_run(threads=2),  # two loader workers
        batch_size=4,
    )
    torch.testing.assert_close(
        reversed_uncached.flip(1), first
    )  # per image: not per position, batch or worker

    second_view = image_features(backbone, entries, images, augment=True, first_pass=1, seed=1, run=run)
    torch.testing.assert_close(second_view[0], first[1])

    other_seed = image_features(backbone, entries, images, augment=True, passes=1, seed=2, run=run)
    assert not torch.allclose(other_seed[0], first[0])


def test_unaugmented_features_are_the_normalized_test_view_and_ignore_the_seed(tiny, tmp_path, encoded):
    backbone, splits, images = tiny
    entries = splits["test"]
    run = cpu_run(tmp_path / "cache")
    features = image_features(backbone, entries, images, augment=False, seed=1, run=run)
    transform = loading.eval_transform(backbone.image_size, backbone.mean, backbone.std)
    decoded = torch.stack([transform(loading.read_image(images / e[0])) for e in entries])
    with torch.no_grad():
        expected = backbone.model.encode_image(decoded)
    torch.testing.assert_close(features[0], F.normalize(expected, dim=-1))
    encoded.clear()
    raw = image_features(backbone, entries, images, augment=False, seed=5, run=run, normalize=False)
    assert sum(encoded) == 0
    torch.testing.assert_close(F.normalize(raw[0], dim=-1), features[0])
    with pytest.raises(ValueError, match="one pass"):
        image_features(backbone, entries, images, augment=False, passes=2, run=run)


def test_the_cache_misses_when_the_weights_change_and_survives_a_corrupt_file(
    tiny, tmp_path, encoded, caplog
):
    backbone, splits, images = tiny
    entries = splits["val"]
    run = cpu_run(tmp_path / "cache")
    image_features(backbone, entries, images, augment=False, run=run)
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="blocklora"):
        image_features(backbone, entries, images, augment=False, run=run)
    assert "unreadable" in caplog.text and sum(encoded) == 2 * len(entries)
    with torch.no_grad():
        backbone.model.visual.proj.mul_(2)
    image_features(backbone, entries, images, augment=False, run=run)
    assert sum(encoded) == 3 * len(entries)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_evaluation_on_cached_features_matches_evaluation_on_images(make_method, monkeypatch):
    method, run = make_method("linear_probe")
    method.fit(run)
    on_features = evaluate(method, method.task.test, method.task.image_root, run)
    monkeypatch.setattr(LinearProbe, "eval_on_features", False)
    on_images = evaluate(method, method.task.test, method.task.image_root, run)
    assert on_features["accuracy"] == on_images["accuracy"]
    assert on_features["test_size"] == len(method.task.test)
    assert evaluate_module.image_features is image_features
