"""What training costs in device time: profiled step time × iterations, per method.

Light to import (no torch): the report prints these estimates after the runs, the plan before them.
Step times come from profiles (``blocklora profile``), keyed by (method entry, class count); a run
whose class count was not profiled takes the time interpolated linearly between the profiled counts
(or extrapolated from the nearest two, never below 0), or the single profiled time. A method
profiled without a training step costs 0. Evaluation, data preparation and start-up are not included.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from typing import Any

StepTimes = Mapping[tuple[str, int | None], float | None]


def step_times(profiles: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int | None], float | None]:
    """``{(label, num_classes): step_ms}`` from profile dicts (``label`` falls back to ``method``)."""
    times: dict[tuple[str, int | None], float | None] = {}
    for p in profiles:
        name = str(p.get("label") or p["method"])
        classes = p.get("num_classes")
        step = p.get("step_ms")
        times[(name, None if _missing(classes) else int(classes))] = None if _missing(step) else float(step)
    return times


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def step_ms_for(step_ms: StepTimes, method: str, num_classes: int | None) -> float:
    """The step time of ``method`` at ``num_classes`` (see the module docstring); 0 without a step."""
    measured = sorted(((c, t) for (m, c), t in step_ms.items() if m == method), key=lambda ct: ct[0] or 0)
    if not measured:
        raise ValueError(f"no step time for method {method!r}; profile it first (blocklora profile)")
    if any(t is None for _, t in measured):
        return 0.0
    points = dict(measured)
    if num_classes in points:
        return float(points[num_classes])
    if len(measured) == 1:
        return float(measured[0][1])
    if num_classes is None or any(c is None for c, _ in measured):
        raise ValueError(f"method {method!r} has several step times; name the class count to pick one")
    counts = [c for c, _ in measured]
    i = min(max(bisect.bisect_left(counts, num_classes), 1), len(counts) - 1)
    (c0, t0), (c1, t1) = measured[i - 1], measured[i]
    return max(0.0, t0 + (t1 - t0) * (num_classes - c0) / (c1 - c0))


def device_hours(runs: Iterable[Mapping[str, Any]], step_ms: StepTimes) -> dict[str, float | None]:
    """Σ iterations × step time per method entry, in hours, over runs given as dicts with ``label``,
    ``iterations`` and (optionally) ``num_classes``. None for a label that was not profiled or has no
    training step (zero-shot, methods that train on cached features)."""
    with_step = {m for (m, _), t in step_ms.items() if t is not None}
    hours: dict[str, float | None] = {}
    for run in runs:
        label = str(run["label"])
        if label not in with_step:
            hours.setdefault(label, None)
            continue
        classes, iterations = run.get("num_classes"), run.get("iterations")
        ms = step_ms_for(step_ms, label, None if _missing(classes) else int(classes))
        hours[label] = (hours.get(label) or 0.0) + (
            0.0 if _missing(iterations) else float(iterations)
        ) * ms / 3.6e6
    return hours
