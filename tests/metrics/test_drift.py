"""guard_output_drift_psi: counts kept as rows come and go, within bounds.

Found by a red-team pass: each window held its rows as float64 and a scrape
binned them all under the lock the event loop takes to push (0.76 s a
scrape for 150 windows of a million rows, the loop waiting on it), and an
upstream naming new outputs under a '*' rule made a window of drift_window
rows for each (8 MB apiece, up to 1,024 series).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.control.baseline import from_values
from guard.metrics.collectors import OTHER, DriftGauge, psi

EDGES, FRACTIONS, _ = from_values(np.linspace(0.3, 1, 1000))
BASELINE = (EDGES, FRACTIONS)


def _psi_of(gauge: DriftGauge) -> dict[tuple[str, ...], float]:
    (family,) = list(gauge.collect())
    return {tuple(s.labels.values()): s.value for s in family.samples}


def _reference(rows: np.ndarray, size: int) -> float | None:
    """Straight from the last ``size`` rows: bin the finite ones, compare."""
    last = rows[-size:]
    finite = last[np.isfinite(last)]
    if last.size < min(100, size) or not finite.size:
        return None
    bins = np.searchsorted(np.asarray(EDGES), finite, side="left")
    counts = np.bincount(bins, minlength=len(EDGES) + 1)
    return psi(counts / finite.size, np.asarray(FRACTIONS))


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 400),
    chunks=st.lists(st.integers(1, 700), min_size=1, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_counts_follow_the_last_rows(size: int, chunks: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    gauge = DriftGauge()
    pushed = []
    for n in chunks:
        rows = rng.uniform(-0.2, 1.2, n)
        rows[rng.random(n) < 0.05] = np.nan
        rows[rng.random(n) < 0.02] = np.inf
        gauge.observe(("m", "s", "o"), rows, BASELINE, size)
        pushed.append(rows)
        want = _reference(np.concatenate(pushed), size)
        got = _psi_of(gauge).get(("m", "s", "o"))
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_windows_stay_within_their_rows_and_other_gets_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gauge = DriftGauge(rows_max=2500)
    rows = np.full(200, 0.9)
    for i in range(10):  # 1000-row windows: two fit
        gauge.observe(("m", "s", f"o{i}"), rows, BASELINE, 1000)
    gauge.observe(("m", "s", OTHER), rows, BASELINE, 100)
    assert sorted(_psi_of(gauge)) == [("m", "s", "o0"), ("m", "s", "o1")]
    assert len([r for r in caplog.records if "no drift window" in r.message]) == 1
    # A reload to a smaller window frees what the old one held.
    gauge.observe(("m", "s", "o0"), rows, BASELINE, 100)
    gauge.observe(("m", "s", "o5"), rows, BASELINE, 1000)
    assert ("m", "s", "o5") in _psi_of(gauge)


def test_a_scrape_reads_counts_not_rows() -> None:
    gauge = DriftGauge()
    rows = np.random.default_rng(3).uniform(0, 1, 1_000_000)
    for i in range(8):  # the most DRIFT_ROWS_MAX holds at the largest window
        gauge.observe(("m", "s", f"o{i}"), rows, BASELINE, 1_000_000)
    started = time.perf_counter()
    found = _psi_of(gauge)
    took = time.perf_counter() - started
    assert len(found) == 8
    assert took < 0.05, f"a scrape took {took:.3f} s"


def test_a_million_row_window_holds_two_bytes_a_row() -> None:
    import tracemalloc

    gauge = DriftGauge()
    tracemalloc.start()
    try:
        gauge.observe(("m", "s", "o"), np.full(10, 0.5), BASELINE, 1_000_000)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 2_100_000, f"{held} bytes for one window"


def test_logging_names_the_setting(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    gauge = DriftGauge(rows_max=10)
    gauge.observe(("m", "s", "o"), np.full(5, 0.5), BASELINE, 100)
    (record,) = caplog.records
    assert "lower drift_window" in record.message and "'o'" in record.message


def test_a_window_refused_after_a_reload_freed_rows_is_logged_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    gauge = DriftGauge(rows_max=100)
    gauge.observe(("old", "s", "o"), np.full(5, 0.5), BASELINE, 100)
    gauge.observe(("m", "s", "o"), np.full(5, 0.5), BASELINE, 100)
    gauge.forget(frozenset({"m"}))  # a reload retires 'old'
    gauge.observe(("m", "s", "o"), np.full(5, 0.5), BASELINE, 100)  # takes the rows
    gauge.observe(("n", "s", "o"), np.full(5, 0.5), BASELINE, 100)
    refused = [r.message for r in caplog.records if "no drift window" in r.message]
    assert len(refused) == 2 and "'m'" in refused[0] and "'n'" in refused[1], refused
