"""guard_predicted_class_total against what the clients were answered.

Found by a red-team pass: abstentions were counted at the index just past
an output's classes, so a model with more classes (another model under the
same ``__other__`` series, or an output whose width changes) had its class
at that index named after the abstentions, and the other way round; and
the per-class tables grew with the largest class index an upstream chose.
"""

from __future__ import annotations

import time
import tracemalloc
from collections import Counter
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from guard.dataplane.kernels import REFERENCE, Kernels
from guard.metrics.collectors import PredictedClassCounter
from tests.dataplane.test_pipeline import Guard, parsed, response, tensor

ABSTAIN = {"argmax": True, "min_confidence": 0.6, "abstain_label": "unsure"}


def _classes(registry: CollectorRegistry) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in registry.collect():
        if family.name == "guard_predicted_class":
            for s in family.samples:
                if s.name.endswith("_total"):
                    found[s.labels["class"]] = found.get(s.labels["class"], 0) + s.value
    return found


def _answered(guard: Guard, rows: list[list[float]], model: str, output: str) -> list[int]:
    out = parsed(guard(response({output: tensor(rows)}, model=model)))
    return list(out.outputs[f"{output}_class"].int64_val)


@pytest.mark.parametrize("kernels", [None, REFERENCE], ids=["native", "reference"])
def test_two_models_under_one_series_count_what_clients_saw(kernels: Kernels | None) -> None:
    """A rule for model '*': both models are labelled __other__. Model a has
    3 classes and abstains; model b has 10 and predicts class 3."""
    guard = Guard([{"name": "*", "outputs": [{"name": "probs", **ABSTAIN}]}], kernels=kernels)
    seen: Counter[int] = Counter()
    for _ in range(10):
        seen.update(_answered(guard, [[0.4, 0.3, 0.3]], "a", "probs"))
    confident = [0.01] * 10
    confident[3] = 0.91
    for _ in range(90):
        seen.update(_answered(guard, [confident], "b", "probs"))
    assert seen == {-1: 10, 3: 90}
    assert _classes(guard.registry) == {"unsure": 10, "3": 90}
    assert (
        guard.registry.get_sample_value(
            "guard_abstentions_total",
            {"model": "__other__", "signature": "serving_default", "output": "probs"},  # fmt: skip
        )
        == 10
    )


@pytest.mark.parametrize("kernels", [None, REFERENCE], ids=["native", "reference"])
def test_an_output_whose_width_changes_counts_each_class_by_name(kernels: Kernels | None) -> None:
    guard = Guard([{"name": "m", "outputs": [{"name": "*", **ABSTAIN}]}], kernels=kernels)
    answers = [
        [[0.4, 0.3, 0.3]],  # abstains (3 classes)
        [[0.0, 0.0, 0.0, 0.9, 0.1]],  # class 3 of 5
        [[0.2] * 5],  # abstains (5 classes)
        [[0.5, 0.5]],  # abstains (2 classes)
        [[0.0, 0.0, 0.95, *[0.05 / 7] * 7]],  # class 2 of 10
    ]
    seen: Counter[int] = Counter()
    for rows in answers:
        seen.update(_answered(guard, rows, "m", "p"))
    assert seen == {-1: 3, 3: 1, 2: 1}
    assert _classes(guard.registry) == {"unsure": 3, "3": 1, "2": 1}


def _held(make: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        made = make()
        return made, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_class_indices_an_upstream_chooses_do_not_size_the_tables() -> None:
    """Classes near 16 million (a fill-convention answer of 60 bytes declares
    them) took 128 MB of tables each, kept for good."""
    counter = PredictedClassCounter(cap=100)
    labels = ("m", "s", "p")

    def count() -> PredictedClassCounter:
        for i in range(20):
            counter.add(labels, np.array([16_000_000 - i, 15_000_000 - i], np.int64), str)
            list(counter.collect())
        return counter

    _, held = _held(count)
    assert held < 1024 * 1024, f"{held} bytes held"
    samples = dict(
        (s.labels["class"], s.value) for s in next(iter(counter.collect())).samples
    )  # fmt: skip
    assert samples["16000000"] == 1 and sum(samples.values()) == 40


def test_a_wide_multi_label_answer_is_counted_at_numpy_speed() -> None:
    """Three million classes fired in one answer, each answer under a new
    output name (a new series): past the label cap they are __other__,
    without a Python step each (that took 1.8 s an answer)."""
    counter = PredictedClassCounter(cap=100)
    fired = np.arange(3_000_000, dtype=np.int64)
    started = time.thread_time()  # not the CPU of the suite's other threads
    for i in range(3):
        counter.add(("m", "s", f"p{i}"), fired, str)
        list(counter.collect())
    took = time.thread_time() - started
    # 0.15-0.8 s here (the first allocations fault their pages in); 2.04 s once
    # while the box was short of memory; a Python step per class took 5.4 s.
    assert took < 3.0, f"{took:.2f} s of CPU for three answers"
    samples = [s for s in next(iter(counter.collect())).samples if s.labels["output"] == "p2"]
    by_class = {s.labels["class"]: s.value for s in samples}
    assert len(by_class) == 101
    assert by_class["__other__"] == 3_000_000 - 100
    assert by_class["0"] == by_class["99"] == 1
