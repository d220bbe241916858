import json

import pytest
import torch
import torch.nn.functional as F

from blocklora import features as features_module
from blocklora.methods import get_method
from blocklora.methods.tip_adapter import TipAdapter, search_grid

FAST = {"augment_passes": 3, "search_step": [40, 10]}


def test_tip_adapter_trains_nothing_and_beats_chance(run_method):
    record = run_method("tip_adapter", FAST)
    assert record["trainable_params"] == 0 and record["iterations"] == 0
    stats = record["train_stats"]
    assert stats["searched"] and stats["alpha"] in search_grid(3, 10) and stats["beta"] in search_grid(7, 40)
    assert (stats["init_alpha"], stats["init_beta"]) == (1.0, 1.0)  # the default for unlisted datasets
    assert record["accuracy"] >= 0.75


def test_tip_adapter_f_learns_the_keys(run_method, make_method, tmp_path):
    from blocklora.io import read_tensors

    record = run_method("tip_adapter_f", {**FAST, "epochs": 4})
    assert record["trainable_params"] == 12 * 4 * 32  # shots × classes × dim
    stats = record["train_stats"]
    assert record["iterations"] == 4  # 48 images, batch 256: one step per epoch
    assert 1 <= stats["best_epoch"] <= 4 and "alpha" in stats and "beta" in stats
    assert record["accuracy"] > 0.25
    # the keys moved away from Tip-Adapter's cache ...
    run_method("tip_adapter", FAST)
    learned, _ = read_tensors(tmp_path / "tip_adapter_f.safetensors")
    cached, _ = read_tensors(tmp_path / "tip_adapter.safetensors")
    assert (learned["keys"] - cached["keys"]).abs().max() > 1e-3
    # ... and what that bought, on the validation split it chose its epoch on, at the initial alpha, beta
    assert stats["best_epoch_val_accuracy"] >= stats["init_val_accuracy"]


def test_the_search_and_the_epoch_choice_never_see_the_test_split(run_method, toy_dataset, monkeypatch):
    seen: list[tuple[bool, set[str]]] = []
    evaluating = {"now": False}
    original_key, original_prepare = features_module.feature_key, TipAdapter.prepare_eval

    def recording_key(backbone, entries, *args, **kwargs):
        seen.append((evaluating["now"], {str(e[0]) for e in entries}))
        return original_key(backbone, entries, *args, **kwargs)

    def prepare_eval(self):
        evaluating["now"] = True
        original_prepare(self)

    monkeypatch.setattr(features_module, "feature_key", recording_key)
    monkeypatch.setattr(TipAdapter, "prepare_eval", prepare_eval)
    run_method("tip_adapter_f", {**FAST, "epochs": 2})
    test_paths = {str(e[0]) for e in json.loads(toy_dataset[1].read_text())["test"]}
    before = [paths for during_eval, paths in seen if not during_eval]
    after = [paths for during_eval, paths in seen if during_eval]
    assert before and not any(paths & test_paths for paths in before)
    assert after == [test_paths]


def test_the_search_keeps_the_first_best_of_the_reference_grid(make_method):
    method, run = make_method("tip_adapter", {**FAST, "search": False})
    method.fit(run)
    val, labels = method.features(method.task.val, run)[0], method.labels(method.task.val)
    val = val + 0.3 * torch.randn(val.shape, generator=torch.Generator().manual_seed(0))  # make it hard
    val = F.normalize(val, dim=-1)
    best, choice = -1.0, None
    for beta in [i * (7 - 0.1) / 40 + 0.1 for i in range(40)]:  # the reference's loops
        for alpha in [j * (3 - 0.1) / 10 + 0.1 for j in range(10)]:
            acc = float((method.logits(val, alpha, beta).argmax(-1) == labels).float().mean())
            if acc > best:
                best, choice = acc, (alpha, beta)
    stats = method.search(val, labels)
    assert (method.alpha, method.beta) == pytest.approx(choice)
    assert stats["val_accuracy"] == pytest.approx(best)


def test_keys_are_the_normalized_mean_of_raw_augmented_views(make_method):
    method, run = make_method("tip_adapter", FAST)
    method.build_cache(run)
    raw = method.features(method.task.train, run, augment=True, passes=3, normalize=False)
    torch.testing.assert_close(method.keys, F.normalize(raw.mean(0), dim=-1))
    assert method.values.shape == (48, 4) and torch.equal(method.values.sum(0), torch.full((4,), 12.0))


@pytest.mark.parametrize(
    ("dataset", "alpha", "scales", "epochs"),
    [("imagenet", 1.17, [7, 3], 20), ("eurosat", 2.0, [12, 10], 100), ("oxford_flowers", 10.0, [50, 50], 20),
     ("fgvc_aircraft", 5.0, [30, 30], 20), ("demo_shapes", 1.0, [7, 3], 20)],
)  # fmt: skip
def test_per_dataset_settings_come_from_the_reference_configs(make_method, dataset, alpha, scales, epochs):
    method, _ = make_method("tip_adapter_f")
    method.task.dataset = dataset
    assert method.setting("init_alpha") == alpha and method.setting("search_scale") == scales
    assert method.epochs() == epochs
    method.hp = {**method.hp, "init_alpha": 0.5}
    assert method.setting("init_alpha") == 0.5


def test_defaults_are_tip_adapter_fs():
    hp = get_method("tip_adapter_f").all_defaults()
    assert (hp["optimizer"], hp["lr"], hp["eps"], hp["batch_size"]) == ("adamw", 1e-3, 1e-4, 256)
    assert (hp["augment_passes"], hp["crop_scale"], hp["search_step"]) == (10, [0.5, 1.0], [200, 20])


def test_grid_matches_the_reference_formula():
    grid = search_grid(7, 200)
    assert len(grid) == 200 and grid[0] == pytest.approx(0.1) and grid[1] == pytest.approx(0.1 + 6.9 / 200)


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f"])
def test_state_round_trip_reproduces_the_logits(assert_round_trip, name):
    assert_round_trip(name, {**FAST, "epochs": 2} if name == "tip_adapter_f" else FAST)
