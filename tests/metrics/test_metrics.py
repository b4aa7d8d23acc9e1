"""The guard's own metric collectors against prometheus_client's reference types."""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from guard.control.config import Config
from guard.dataplane.results import Action
from guard.dataplane.rulespec import OutputRule
from guard.metrics.collectors import PENDING_ARRAYS_MAX, PENDING_VALUES_MAX, OutputValueHistogram
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
    gate.inflight, gate.pending, gate.inflight_bytes, gate.relayed = 7, 3, 4096, 2
    assert registry.get_sample_value("guard_inflight_requests") == 7.0
    assert registry.get_sample_value("guard_pending_requests") == 3.0
    assert registry.get_sample_value("guard_inflight_bytes") == 4096.0
    assert registry.get_sample_value("guard_relayed_streams") == 2.0
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


def _exposition(registry: CollectorRegistry) -> list[bytes]:
    return [line for line in generate_latest(registry).splitlines() if b"_created" not in line]


def _two_recorders(cap: int) -> tuple[list[CollectorRegistry], list[Any]]:
    registries = [CollectorRegistry(), CollectorRegistry()]
    recorders = [
        GuardMetrics(r, ["m"], max_class_label_values=cap).output_recorder("m", "1", "s", "p")
        for r in registries
    ]
    return registries, recorders


def test_queued_lane_verdicts_count_as_recorded_ones_in_order() -> None:
    """Lane verdicts queued raw, then a verdict counted at once, then more
    queued: the same samples as counting every one at once in that order.
    Order matters: with 3 class labels, the first three classes seen get
    them, and later ones count as __other__."""
    registries, (queued, direct) = _two_recorders(cap=3)
    rule = OutputRule(name="p")
    labels = np.array([f"c{i}".encode() for i in range(9)], dtype=object)
    f32 = np.dtype(np.float32)
    steps = [([5, 6], [0.9, 0.8], True), ([7], [0.7], False), ([8, 5], [0.6, 0.5], True)]
    for classes, scores, lane in steps:
        c, s = np.array(classes, np.int64), np.array(scores, np.float32)
        if lane:
            queued.record_lane(c.size, c.tobytes(), s.tobytes(), f32, labels)
        else:
            queued.record_clean(c.size, c, s, labels, rule)
        direct.record_clean(c.size, c, s, labels, rule)
    assert _exposition(registries[0]) == _exposition(registries[1])
    text = generate_latest(registries[0]).decode()
    assert 'class="c7"' in text and 'class="c8"' not in text and 'class="__other__"' in text


def test_the_lane_queue_is_bounded_by_responses_and_by_values() -> None:
    metrics = GuardMetrics(CollectorRegistry(), ["m"])
    recorder = metrics.output_recorder("m", "1", "s", "p")
    f32, one = np.dtype(np.float32), np.zeros(1, np.int64).tobytes()
    for i in range(PENDING_ARRAYS_MAX + 1):
        recorder.record_lane(1, one, np.float32(0.5).tobytes(), f32, None)
        assert len(metrics.lanes) == (i + 1) % (PENDING_ARRAYS_MAX + 1)
    rows = PENDING_VALUES_MAX // 2 + 1
    classes, scores = np.zeros(rows, np.int64).tobytes(), np.zeros(rows, np.float32).tobytes()
    recorder.record_lane(rows, classes, scores, f32, None)
    assert len(metrics.lanes) == 1
    recorder.record_lane(rows, classes, scores, f32, None)
    assert len(metrics.lanes) == 0


def test_a_scrape_while_the_loop_queues_loses_no_verdict() -> None:
    """Scrapes run on the metrics server's thread, queued verdicts arrive on
    the event loop's: every verdict is counted once, whichever flushes it."""
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, ["m"])
    recorder = metrics.output_recorder("m", "1", "s", "p")
    f32 = np.dtype(np.float32)
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            generate_latest(registry)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(20_000):
            c = np.array([i % 3], np.int64)
            recorder.record_lane(1, c.tobytes(), np.float32(0.25).tobytes(), f32, None)
    finally:
        done.set()
        scraper.join()
    text = generate_latest(registry).decode()
    counts = {
        line.split('class="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("guard_predicted_class_total{")
    }
    assert counts == {"0": 6667.0, "1": 6667.0, "2": 6666.0}
    every = 'guard_output_value_bucket{le="+Inf",model="m",output="p",signature="s"} 20000.0'
    assert every in text


def test_label_combinations_are_bounded_whatever_the_upstream_names() -> None:
    """Found (a red-team pass): versions, signatures and outputs were each
    bounded, not their product: an echoing upstream's 66,049 (version,
    signature) pairs made 380,000 samples in one worker. 8 versions (as many
    as a model keeps) x 300 signatures here, each with two outputs."""
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, ["m"])
    for v in range(8):
        for s in range(300):
            metrics.response_counter("m", str(v), f"sig{s}", Action.CLEAN).inc()
            for output in ("a", "b"):
                metrics.output_recorder("m", str(v), f"sig{s}", output)

    def series(family: str) -> set[tuple[str, ...]]:
        return {
            (
                s.labels["model"],
                s.labels["version"],
                s.labels["signature"],
                s.labels.get("output", ""),
            )
            for f in registry.collect()
            if f.name == family
            for s in f.samples
        }

    responses, outputs = series("guard_responses"), series("guard_output_violations")
    assert 1000 <= len(responses) <= 1025 and 1000 <= len(outputs) <= 1025
    assert ("m", "__other__", "__other__", "") in responses
    assert ("m", "__other__", "__other__", "__other__") in outputs
    total = sum(s.value for f in registry.collect() if f.name == "guard_responses"
                for s in f.samples if s.labels.get("action") == "clean")  # fmt: skip
    assert total == 8 * 300  # every response still counted
    assert len(generate_latest(registry)) < 4_000_000


def _models_in(registry: CollectorRegistry) -> set[str]:
    return {s.labels["model"] for f in registry.collect() for s in f.samples if "model" in s.labels}


def test_a_reload_forgets_the_series_of_the_models_it_retires() -> None:
    """Found (a red-team pass): series outlived the models a reload removed.
    Eight reloads of 200 new model names grew a scrape from 11,000 to 90,000
    samples, and once 1,024 output series were taken, new models' outputs
    read ``__other__``. A model kept by every reload keeps counting."""
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, ["kept"])
    rule = OutputRule(name="p")
    baseline = ((0.5,), (0.5, 0.5))
    for reload in range(8):
        names = [f"m{reload}-{i}" for i in range(200)]
        metrics.set_model_names(["kept", *names])
        for model in ["kept", *names]:
            metrics.record_request("grpc", model, "Predict", "OK")
            metrics.response_counter(model, str(reload), "s", Action.CLEAN).inc()
            recorder = metrics.output_recorder(model, str(reload), "s", "p")
            recorder.record_clean(1, np.array([reload]), np.array([0.75]), None, rule)
            metrics.entropy.observe((model, "s", "p"), np.array([0.5]), 3, 0.99)
            metrics.drift.observe((model, "s", "p"), np.array([0.75]), baseline, 100)
            metrics.count_decode_error(model)
        assert _models_in(registry) == {"kept", *names}
    outputs = {
        s.labels["output"] for f in registry.collect() if f.name == "guard_output_values"
        for s in f.samples
    }  # fmt: skip
    assert outputs == {"p"}  # no __other__: the retired models' slots were freed
    versions = {
        s.labels["version"] for f in registry.collect() if f.name == "guard_responses"
        for s in f.samples if s.labels["model"] == "m7-0"
    }  # fmt: skip
    assert versions == {"7"}
    assert registry.get_sample_value(
        "guard_requests_total", {"protocol": "grpc", "model": "kept", "method": "Predict",
                                 "code": "OK"}
    ) == 8  # fmt: skip
    samples = sum(len(f.samples) for f in registry.collect())
    assert samples < 201 * 60, samples
    assert registry.get_sample_value("guard_model_info", {"model": "m7-0"}) == 1
    assert registry.get_sample_value("guard_model_info", {"model": "m6-0"}) is None
    assert metrics.drift._rows == 201 * 100  # the retired windows' rows freed


def test_a_reload_that_retires_no_model_forgets_nothing() -> None:
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, ["a"])
    metrics.record_request("rest", "a", "Predict", "OK")
    metrics.set_model_names(["a", "b"])
    metrics.record_request("rest", "b", "Predict", "OK")
    metrics.set_model_names(["b", "a"])
    assert _models_in(registry) == {"a", "b"}


def test_series_a_call_in_flight_brings_back_go_at_the_next_reload() -> None:
    """Found (a red-team pass): a call that began before its model was
    retired, and ends after, counted its request under the retired name,
    and no later reload removed that series, ``models: []`` included."""
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, ["m", "kept"])
    recorder = metrics.output_recorder("m", "1", "s", "p")  # held by a plan in flight
    metrics.set_model_names(["kept"])
    metrics.record_request("grpc", "m", "Predict", "OK")  # the call ends after the reload
    recorder.record_clean(1, np.array([0]), np.array([0.5]), None, OutputRule(name="p"))
    assert registry.get_sample_value(
        "guard_requests_total", {"protocol": "grpc", "model": "__other__", "method": "Predict",
                                 "code": "OK"}
    ) == 1  # fmt: skip
    assert "m" in _models_in(registry)  # the old recorder's value histogram
    metrics.set_model_names(["kept"])  # any later reload
    assert _models_in(registry) <= {"__other__", "kept"}


def test_a_reload_waits_for_a_scrape_folding_the_lanes() -> None:
    """Found (a red-team pass): a reload whose lane queue looked empty while
    a scrape was still folding what it had taken from it dropped the
    retired model's series before the fold put them back (41 of 60 tries)."""
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, ["gone"])
    recorder = metrics.output_recorder("gone", "1", "s", "p")
    folding = threading.Event()

    def scrape_folding() -> None:
        with metrics.lanes._lock:  # a scrape's flush, between taking and folding
            folding.set()
            time.sleep(0.2)
            one = np.zeros(1, np.int64).tobytes()
            recorder.fold_lane(np.dtype(np.float32), str, one, np.float32(0.5).tobytes())

    scraper = threading.Thread(target=scrape_folding)
    scraper.start()
    folding.wait(5)
    metrics.set_model_names([])
    scraper.join()
    assert _models_in(registry) == set()


def test_a_model_keeps_the_series_of_its_last_eight_versions() -> None:
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, ["m", "n"])
    metrics.response_counter("n", "1", "s", Action.CLEAN).inc()
    first = metrics.output_recorder("m", "0", "s", "p")
    for v in range(300):  # past the 256 values the version label may take
        metrics.response_counter("m", str(v), "s", Action.CLEAN).inc()
        metrics.output_recorder("m", str(v), "s", "p").values.inc(2)

    def versions(family: str, model: str) -> dict[str, float]:
        return {
            s.labels["version"]: s.value for f in registry.collect() if f.name == family
            for s in f.samples if s.labels["model"] == model
        }  # fmt: skip

    assert versions("guard_responses", "m") == {str(v): 1.0 for v in range(292, 300)}
    assert versions("guard_output_values", "m") == {str(v): 2.0 for v in range(292, 300)}
    assert versions("guard_responses", "n") == {"1": 1.0}
    assert first.stale  # the plans that hold it let go
    assert not metrics.output_recorder("m", "299", "s", "p").stale
