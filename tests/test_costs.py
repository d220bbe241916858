import pytest

from blocklora.costs import device_hours, step_ms_for, step_times


def planned(datasets: dict[str, int], method: str, shots: list[int], seeds: int, iterations) -> list[dict]:
    """One row per planned run, as the plan and the report give them to device_hours."""
    return [
        {"label": method, "num_classes": classes, "iterations": iterations(dataset, k)}
        for dataset, classes in datasets.items()
        for k in shots
        for _ in range(seeds)
    ]


def test_device_hours_sum_iterations_times_step_time_over_the_runs():
    step_ms = {("lora", 100): 100.0, ("lora", 1000): 1000.0, ("zeroshot", 1000): None}
    runs = planned({"a": 100, "b": 550}, "lora", [1, 2], 3, lambda d, k: 500 * k)
    runs += planned({"a": 100, "b": 550}, "zeroshot", [1, 2], 3, lambda d, k: 0)
    hours = device_hours(runs, step_ms)
    # lora: (500 + 1000) iterations x 3 seeds x (100 ms at 100 classes + 550 ms interpolated at 550)
    assert hours["lora"] == pytest.approx(1500 * 3 * (100 + 550) / 3.6e6)
    assert hours["zeroshot"] is None  # no training step
    per_method = device_hours(planned({"a": 100}, "lora", [4], 2, lambda d, k: 10 * k), step_ms)
    assert per_method["lora"] == pytest.approx(40 * 2 * 100 / 3.6e6)
    fixed = device_hours(planned({"a": 100}, "lora", [1, 16], 1, lambda d, k: 7), step_ms)
    assert fixed["lora"] == pytest.approx(2 * 7 * 100 / 3.6e6)
    assert device_hours([{"label": "unprofiled", "iterations": 5}], step_ms) == {"unprofiled": None}


def test_step_time_lookup_interpolates_extrapolates_and_falls_back():
    step_ms = {("a", 100): 100.0, ("a", 1000): 1000.0, ("one", 1000): 80.0, ("free", 16): None}
    assert step_ms_for(step_ms, "a", 1000) == 1000.0
    assert step_ms_for(step_ms, "a", 2000) == pytest.approx(2000.0)
    assert step_ms_for(step_ms, "a", 10) == pytest.approx(10.0)
    assert step_ms_for(step_ms, "one", 10) == 80.0
    assert step_ms_for(step_ms, "free", 1000) == 0.0
    with pytest.raises(ValueError, match="no step time for method 'missing'"):
        step_ms_for(step_ms, "missing", 10)


def test_step_times_are_keyed_by_profile_name():
    profiles = [
        {"method": "blocklora", "label": "blocklora_n4", "num_classes": 1000, "step_ms": 12.5},
        {"method": "zeroshot", "num_classes": 1000, "step_ms": None},
    ]
    assert step_times(profiles) == {("blocklora_n4", 1000): 12.5, ("zeroshot", 1000): None}
