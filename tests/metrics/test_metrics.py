"""The guard's own metric collectors against prometheus_client's reference types."""

from __future__ import annotations

import warnings

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from guard.control.config import Config
from guard.metrics.collectors import OutputValueHistogram
from guard.metrics.guard_metrics import LATENCY_BUCKETS, GuardMetrics
from guard.server.gate import Gate


def test_latency_histogram_matches_prometheus_client() -> None:
    # The timing histograms are a custom collector (a bisect per observation); the
    # exposition must be what prometheus_client's Histogram gives for the same data,
    # including values exactly on a bucket bound (le is inclusive).
    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    ours = GuardMetrics(ours_registry, ["m"])
    reference = Histogram(
        "guard_overhead_seconds", "reference", ["protocol", "method"], buckets=LATENCY_BUCKETS,
        registry=reference_registry,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    amounts = [*rng.exponential(0.002, 500).tolist(), *LATENCY_BUCKETS, 0.0, 99.0]
    for i, amount in enumerate(amounts):
        method = "Predict" if i % 3 else "GetModelStatus"
        protocol = "rest" if i % 5 == 0 else "grpc"
        ours.record_timing(protocol, method, upstream_s=0.0, overhead_s=amount)
        reference.labels(protocol, method).observe(amount)

    def samples(
        registry: CollectorRegistry,
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            if family.name == "guard_overhead_seconds"
            for s in family.samples
            if not s.name.endswith("_created")
        }

    expected = samples(reference_registry)
    got = samples(ours_registry)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == value or abs(got[key] - value) < 1e-9, key


def test_gate_gauges_read_the_servers_counts() -> None:
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    gate = Gate(Config())
    metrics.track_gate(gate)
    gate.inflight, gate.pending, gate.inflight_bytes = 7, 3, 4096
    assert registry.get_sample_value("guard_inflight_requests") == 7.0
    assert registry.get_sample_value("guard_pending_requests") == 3.0
    assert registry.get_sample_value("guard_inflight_bytes") == 4096.0
    gate.inflight = 0
    assert registry.get_sample_value("guard_inflight_requests") == 0.0


def test_a_histogram_sum_past_float64_is_infinite_without_a_warning() -> None:
    # Finite float64 values near the maximum (an observed output out of range)
    # add up past it; found by fuzzing.
    histogram = OutputValueHistogram((0.5, 1.0))
    histogram.observe(("m", "s", "o"), np.array([1e308, 1e308, 0.25]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (family,) = list(histogram.collect())
    found = {s.name: s.value for s in family.samples if not s.labels.get("le")}
    assert found["guard_output_value_sum"] == float("inf")
    assert found["guard_output_value_count"] == 3
