import pytest
import torch

from blocklora.data.splits import read_split


def test_linear_probe_fits_a_head_and_beats_chance(run_method):
    record = run_method("linear_probe")
    assert record["trainable_params"] == 4 * 32 + 4  # classes × dim weights + classes biases
    assert record["iterations"] == 0
    stats = record["train_stats"]
    assert len(stats["search"]) == 7 + 2 + 8  # coarse grid, bracket ends, bisections
    assert [stats["C"], stats["val_accuracy"]] in stats["search"]
    assert stats["val_accuracy"] == max(acc for _, acc in stats["search"])
    assert record["accuracy"] >= 0.75


def test_a_given_c_skips_the_search(make_method):
    method, run = make_method("linear_probe", {"C": 0.5})
    stats = method.fit(run)
    assert stats["C"] == 0.5 and "search" not in stats


def test_no_validation_split_and_no_c_is_an_error(make_method):
    method, run = make_method("linear_probe")
    method.task.val = []
    with pytest.raises(ValueError, match="give C"):
        method.fit(run)


def test_head_matches_scikit_learn(make_method, toy_dataset):
    method, run = make_method("linear_probe", {"C": 1.0})
    method.fit(run)
    model = method._fit(
        1.0,
        *(
            t.cpu().numpy()
            for t in (method.features(method.task.train, run)[0], method.labels(method.task.train))
        ),
    )
    test = method.features(read_split(toy_dataset[1])["test"], run)[0]
    expected = torch.from_numpy(model.decision_function(test.numpy())).float()
    torch.testing.assert_close(method.eval_logits_from_features(test), expected, rtol=1e-4, atol=1e-4)


def test_state_round_trip_reproduces_the_logits(assert_round_trip):
    assert_round_trip("linear_probe", {"C": 1.0})
