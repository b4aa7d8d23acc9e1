"""bench.check (``make bench-check``) and the micro-benchmark paths it compares."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench import check, micro


@pytest.mark.parametrize("encoding", ["float_val", "tensor_content"])
@pytest.mark.parametrize(
    "case",
    [
        micro.Case(16, 12, ""),
        micro.Case(16, 1, "", threshold=True),
        micro.Case(128, 12, "", repair=True),
        micro.Case(128, 12, "", repair=True, renormalise=True),
        micro.Case(16, 12, "", softmax=True),
        micro.Case(16, 12, "", abstain=True),
    ],
    ids=lambda case: case.label.strip(),
)
def test_guard_and_naive_paths_agree(encoding: str, case: micro.Case) -> None:
    case = dataclasses.replace(case, encoding=encoding)
    guard = micro.guard_path(case)
    assert guard is not None
    naive = micro.naive_path(case, micro.case_labels(case))
    body = micro.response_bytes(case)
    micro.check_same_answer(case, guard(body), naive(body))


def test_floor_top_k_is_sorted_and_ties_go_low() -> None:
    rows = np.array([[0.1, 0.3, 0.3, 0.2, 0.1]], dtype=np.float32)
    classes, scores = micro.top_k(rows, 3)
    assert classes.tolist() == [[1, 2, 3]]
    assert scores[0].tolist() == pytest.approx([0.3, 0.3, 0.2])


def test_bench_check_passes_on_this_checkout() -> None:
    assert check.main(["--budget", "0.05"]) == 0


def test_bench_check_reports_a_regression(capsys: pytest.CaptureFixture[str]) -> None:
    impossible = (check.Threshold(64, 10, "float_val", 0.01, 1000.0),)
    outcomes = check.check(impossible, budget_s=0.02, attempts=2)
    misses = outcomes[0].misses()
    assert len(misses) == 2
    assert "numpy floor" in misses[0] and "official message classes" in misses[1]


def test_bench_check_notices_the_native_modules_missing() -> None:
    # On the reference kernels (numpy and protobuf alone, as an install without
    # a C compiler runs) the guard takes about twice the numpy floor: the
    # bounds are tight enough to see that.
    outcomes = check.check(check.THRESHOLDS[:1], budget_s=0.05, attempts=2, native=False)
    assert outcomes[0].misses()


@pytest.mark.parametrize("kind", ["repair", "softmax", "renormalise", "abstain"])
def test_bench_check_notices_repairs_and_activations_off_the_native_lane(kind: str) -> None:
    # All took the numpy reference before the lanes counted, clamped,
    # renormalised, abstained and ranked activated values themselves.
    cases = tuple(t for t in check.THRESHOLDS if getattr(t, kind))
    assert cases
    outcomes = check.check(cases[:1], budget_s=0.05, attempts=2, native=False)
    assert outcomes[0].misses()


def test_bench_check_notices_threshold_rules_off_the_native_lane() -> None:
    # binary_mlp's threshold rule took the numpy reference before it had a
    # native lane: 10-27x the floor, where the lane takes 1-3.5x.
    cases = tuple(t for t in check.THRESHOLDS if t.threshold)
    assert cases
    outcomes = check.check(cases[:1], budget_s=0.05, attempts=2, native=False)
    assert outcomes[0].misses()
