"""Issue 15's rules against plain numpy references: entropy, abstention,
temperature and Platt scaling, PSI, and their metrics on both routes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from prometheus_client import CollectorRegistry, generate_latest

from guard.control.baseline import from_metrics, from_values
from guard.dataplane.kernels import REFERENCE, row_entropy
from guard.dataplane.rules import apply_rule, label_table, normalized_entropy
from guard.dataplane.rulespec import OutputRule
from guard.metrics.collectors import ENTROPY_BUCKETS, PSI_EPSILON, psi
from guard.metrics.guard_metrics import OUTPUT_VALUE_BUCKETS, GuardMetrics
from tests.control.test_config import error_of
from tests.dataplane.test_pipeline import Guard, response, tensor
from tests.native import native

Array = np.ndarray[Any, Any]
finite = st.floats(-30, 30, allow_nan=False, width=32)


def entropy_reference(row: list[float]) -> float:
    """Shannon entropy of the row divided by its sum, over ln(classes), in plain Python."""
    total = math.fsum(row)
    q = [p / total for p in row]
    return -math.fsum(x * math.log(x) for x in q if x > 0) / math.log(len(row))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 40)),
                  elements=st.floats(0, 1, allow_nan=False)))  # fmt: skip
def test_entropy_matches_the_textbook_formula(rows: Array) -> None:
    h = normalized_entropy(rows)
    for row, got in zip(rows.tolist(), h.tolist(), strict=True):
        if math.fsum(row) < 1e-20:  # (nearly) 0: no distribution
            assert math.isnan(got)
        else:
            want = min(1.0, max(0.0, entropy_reference(row)))
            assert got == pytest.approx(want, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.integers(2, 300)),
        elements=st.one_of(
            st.floats(0, 1, width=32),
            st.sampled_from([0.0, 1e-40, 1e-30, 3.0, np.nan, np.inf, -0.0, -1e-3]),
        ),
    ),
    st.booleans(),
)
@example(np.full((1, 47), 1.3924297e-21, dtype=np.float32), False)  # found by hypothesis
def test_the_native_entropy_agrees_with_the_reference(rows: Array, misaligned: bool) -> None:
    if misaligned:  # values read in place from a response sit at any offset
        raw = bytearray(rows.nbytes + 1)
        raw[1:] = rows.tobytes()
        rows = np.frombuffer(memoryview(raw)[1:], dtype=np.float32).reshape(rows.shape)
    native_rank = native().rank_module
    got = np.frombuffer(native_rank.row_entropy(rows, *rows.shape))
    want = normalized_entropy(rows)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    # The reference works in float32: where ln S and the mean log nearly cancel
    # (tiny values), its own rounding reaches 1.5e-6; the buckets are 0.001 wide.
    np.testing.assert_allclose(got, want, atol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(row_entropy(rows), got)  # the process's one function


def _wide_row(kind: str, classes: int) -> Array:
    rng = np.random.default_rng(4)
    if kind == "uniform":
        return np.full((1, classes), 1.0 / classes, np.float32)
    if kind == "uniform raw scores":  # unnormalised: a sum of 2e9
        return np.full((1, classes), 1e3, np.float32)
    if kind == "half and flat":
        row = np.full((1, classes), 0.5 / (classes - 1), np.float32)
        row[0, 0] = 0.5
        return row
    row = rng.random((1, classes)).astype(np.float32)
    return row / row.sum() if kind == "random" else row * np.float32(1e-12)


@pytest.mark.parametrize("kind", ["uniform", "uniform raw scores", "half and flat", "random",
                                  "random tiny"])  # fmt: skip
def test_the_native_entropy_of_a_wide_row_is_the_float64_one(kind: str) -> None:
    # Float32 running sums over 2M classes were off by up to 0.003 (0.9967 for
    # a uniform row of raw scores); the native loop sums in double. The numpy
    # reference in float64 is the truth here: in float32 it drifts by 2e-5 itself.
    rows = _wide_row(kind, 2_000_000)
    got = np.frombuffer(native().rank_module.row_entropy(rows, *rows.shape))
    want = normalized_entropy(rows.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, normalized_entropy(rows), rtol=0, atol=1e-4)


def test_the_native_entropy_refuses_arguments_that_do_not_describe_the_buffer() -> None:
    rank = native().rank_module
    values = np.zeros((2, 3), np.float32)
    for rows, cols in ((2, 4), (3, 3), (6, 1), (-1, 3)):
        with pytest.raises(ValueError, match="row_entropy"):
            rank.row_entropy(values, rows, cols)


def test_entropy_of_one_hot_uniform_and_invalid_rows() -> None:
    rows = np.array(
        [
            [1, 0, 0, 0],
            [0.25] * 4,
            [0.5, 0.5, 0, 0],
            [-0.1, 0.6, 0.5, 0],
            [np.nan, 1, 0, 0],
            [0] * 4,
        ]
    )
    h = normalized_entropy(rows.astype(np.float32))
    assert h[0] == 0 and h[1] == pytest.approx(1.0) and h[2] == pytest.approx(0.5)
    assert np.isnan(h[3:]).all()


def _softmax(z: Array) -> Array:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    out: Array = e / e.sum(axis=-1, keepdims=True)
    return out


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(2, 12)), elements=finite),
       st.floats(0.05, 20))  # fmt: skip
@example(np.array([[30.0, 29.9375]], dtype=np.float32), 0.0546875)
def test_temperature_is_softmax_of_logits_over_t(logits: Array, t: float) -> None:
    rule = OutputRule(activation="softmax", temperature=t)
    got = apply_rule(logits, rule, None, "m", "o").values
    # The logits are scaled in their own dtype (float32), as the rule documents;
    # the softmax of those scaled logits is then taken in float64. Scaling in
    # float64 instead would differ by the float32 rounding of z / t, which
    # grows with |z / t| (found by hypothesis: 30 / 0.0547 moved p by 6e-6).
    want = _softmax((logits / np.float32(t)).astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 20), elements=finite),
       st.floats(-5, 5), st.floats(-5, 5), st.floats(0.1, 10))  # fmt: skip
def test_platt_and_sigmoid_temperature_match_numpy(z: Array, a: float, b: float, t: float) -> None:
    platt = apply_rule(z, OutputRule(activation="sigmoid", platt=(a, b)), None, "m", "o")
    np.testing.assert_allclose(
        platt.values, 1 / (1 + np.exp(-(a * z + b))), rtol=1e-12, atol=1e-300
    )
    scaled = apply_rule(z, OutputRule(activation="sigmoid", temperature=t), None, "m", "o")
    np.testing.assert_allclose(scaled.values, 1 / (1 + np.exp(-z / t)), rtol=1e-12, atol=1e-300)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 9), st.floats(0.05, 1.0))
def test_argmax_abstains_exactly_below_min_confidence(
    seed: int, classes: int, floor: float
) -> None:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(classes) * rng.uniform(0.1, 3), size=6).astype(np.float32)
    labels = tuple(f"c{i}" for i in range(classes))
    rule = OutputRule(argmax=True, top_k=2, min_confidence=floor, labels=labels, abstain_label="?")
    out = apply_rule(p, rule, label_table(labels), "m", "o")
    derived = {d.suffix: d.array for d in out.derived}
    unsure = p.max(axis=-1) < np.float32(floor)
    want = np.where(unsure, -1, p.argmax(axis=-1))
    np.testing.assert_array_equal(derived["_class"], want)
    np.testing.assert_array_equal(derived["_top_k_class"][:, 0], want)
    np.testing.assert_array_equal(derived["_score"], p.max(axis=-1))  # untouched
    names = [b"?" if c < 0 else labels[c].encode() for c in want]
    assert derived["_label"].tolist() == names
    assert out.abstained == int(unsure.sum())


def test_a_binary_threshold_abstains_on_p_or_one_minus_p() -> None:
    p = np.array([[0.95], [0.6], [0.3], [0.02], [np.nan]], np.float32)
    rule = OutputRule(threshold=0.5, min_confidence=0.8, labels=("NO", "YES"))
    out = apply_rule(p, rule, label_table(rule.labels), "m", "o")
    derived = {d.suffix: d.array for d in out.derived}
    assert derived["_class"].ravel().tolist() == [1, -1, -1, 0, -1]
    assert derived["_label"].ravel().tolist() == [b"YES", b"unknown", b"unknown", b"NO", b"unknown"]
    assert out.abstained == 3


def test_with_a_threshold_and_top_k_the_threshold_abstains_and_the_ranking_stays() -> None:
    p = np.array([[0.55, 0.45], [0.95, 0.05]], np.float32)
    rule = OutputRule(threshold=0.5, top_k=2, min_confidence=0.9)
    out = apply_rule(p, rule, None, "m", "o")
    derived = {d.suffix: d.array for d in out.derived}
    assert derived["_class"].tolist() == [[-1, -1], [1, 0]]  # per value: p or 1 - p
    assert derived["_top_k_class"].tolist() == [[0, 1], [0, 1]]
    assert out.abstained == 2


# ---------------------------------------------------------------- metrics, both routes


def _softmax_body(p: Array, encoding: Any = None) -> bytes:
    from guard.dataplane.codec.tensor import Encoding

    return response({"probs": tensor(p, encoding or Encoding.TYPED, np.float32)})


def _exposition(guard: Guard) -> list[bytes]:
    text = generate_latest(guard.registry).splitlines()
    return [line for line in text if b"_created" not in line]


@pytest.mark.parametrize("kernels", [REFERENCE, "native"], ids=["reference", "native"])
def test_entropy_histogram_and_near_uniform_rows_match_numpy(kernels: Any) -> None:
    rng = np.random.default_rng(15)
    confident = rng.dirichlet(np.full(201, 0.05), size=6)
    uniform = _softmax(rng.normal(0, 0.05, (4, 201)))
    p = np.concatenate([confident, uniform]).astype(np.float32)
    rule = {"name": "probs", "argmax": True, "check_sum": True, "near_uniform_entropy": 0.97}
    guard = Guard(
        [{"name": "wide_deep", "outputs": [rule]}], native() if kernels == "native" else kernels
    )
    guard(_softmax_body(p))
    h = normalized_entropy(p)
    labels = {"model": "wide_deep", "signature": "serving_default", "output": "probs"}
    assert (
        guard.sample("guard_near_uniform_rows_total", **labels) == np.count_nonzero(h >= 0.97) == 4
    )
    assert guard.sample("guard_output_entropy_count", **labels) == 10
    assert guard.sample("guard_output_entropy_sum", **labels) == pytest.approx(h.sum())
    for le in ENTROPY_BUCKETS:
        got = guard.sample("guard_output_entropy_bucket", **labels, le=repr(le))
        assert got == np.count_nonzero(h <= le), le
    assert guard.sample("guard_output_classes", **labels) == 201


def test_native_and_reference_routes_count_abstentions_alike() -> None:
    p = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.2, 0.7, 0.1]], np.float32)
    rule = {"name": "probs", "argmax": True, "min_confidence": 0.5, "labels": ["a", "b", "c"]}
    found = []
    for kernels in (native(), REFERENCE):
        guard = Guard([{"name": "wide_deep", "outputs": [rule]}], kernels)
        guarded = guard(_softmax_body(p))
        assert guarded is not None
        found.append((guarded.body, _exposition(guard)))
        series = {"model": "wide_deep", "signature": "serving_default", "output": "probs"}
        assert guard.sample("guard_abstentions_total", **series) == 1
        assert guard.sample("guard_predicted_class_total", **series, **{"class": "unknown"}) == 1
        assert guard.sample("guard_predicted_class_total", **series, **{"class": "b"}) == 1
    assert found[0] == found[1]


# ------------------------------------------------------------------------ drift


def psi_reference(actual: list[float], expected: list[float]) -> float:
    total = 0.0
    for a, e in zip(actual, expected, strict=True):
        a, e = max(a, PSI_EPSILON), max(e, PSI_EPSILON)
        total += (a - e) * math.log(a / e)
    return total


def _pair(n: int) -> Any:
    side = st.lists(st.floats(0, 1), min_size=n, max_size=n)
    return st.tuples(side, side)


@given(st.integers(3, 10).flatmap(_pair))
def test_psi_matches_the_formula(pair: tuple[list[float], list[float]]) -> None:
    a, e = pair
    assert psi(np.array(a), np.array(e)) == pytest.approx(psi_reference(a, e), rel=1e-9, abs=1e-12)


def test_the_drift_window_holds_the_last_rows_and_psi_follows_them() -> None:
    metrics = GuardMetrics(CollectorRegistry(), ["m"])
    edges, fractions, _ = from_values(np.linspace(0.5, 1, 1000))
    baseline = (edges, fractions)
    series = ("m", "s", "o")
    rng = np.random.default_rng(1)
    pushed = [rng.uniform(0, 1, n) for n in (70, 300, 45, 260)]  # 675 rows through 250
    for chunk in pushed:
        metrics.drift.observe(series, chunk, baseline, 250)
    last = np.concatenate(pushed)[-250:]
    counts = np.bincount(np.searchsorted(edges, last, side="left"), minlength=len(edges) + 1)
    want = psi_reference((counts / 250).tolist(), list(fractions))
    (family,) = list(metrics.drift.collect())
    (sample,) = family.samples
    assert sample.value == pytest.approx(want)
    assert sample.value > 0.25  # uniform on [0, 1] against a baseline on [0.5, 1]


def test_baseline_from_metrics_reads_the_confidence_buckets(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, ["m"])
    confidence = np.random.default_rng(2).beta(5, 2, 400)
    metrics.output_value.observe(("m", "serving_default", "p"), confidence)
    metrics.output_value.observe(("m", "other", "p"), confidence[:100])
    text = generate_latest(registry).decode()
    edges, fractions, rows = from_metrics(text, "m", "p", "serving_default")
    assert edges == OUTPUT_VALUE_BUCKETS and rows == 400
    assert fractions == pytest.approx(from_values(confidence)[1])
    assert from_metrics(text, "m", "p")[2] == 500  # every signature, summed


# ----------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("argmax: true\n        temperature: 2", "field 'temperature' needs 'activation: softmax'"),
        ("activation: softmax\n        temperature: 0", "field 'temperature': 0 is not allowed"),
        ("activation: softmax\n        platt: [1, 0]", "field 'platt' needs 'activation: sigmoid'"),
        ("activation: sigmoid\n        platt: [1]", "field 'platt': [1] is not allowed"),
        ("activation: sigmoid\n        platt: [1, 0]\n        temperature: 2",
         "'temperature' and 'platt' exclude each other"),
        ("min_confidence: 0.5", "field 'min_confidence' needs 'argmax', 'top_k' or 'threshold'"),
        ("threshold: [0.5, 0.6]\n        min_confidence: 0.5",
         "does not combine with per-class thresholds"),
        ("argmax: true\n        min_confidence: 1.5", "field 'min_confidence': 1.5 is not allowed"),
        ("argmax: true\n        near_uniform_entropy: 0", "field 'near_uniform_entropy'"),
        ("argmax: true\n        entropy: maybe", "field 'entropy'"),
        ("drift_window: 100", "field 'drift_window' needs 'baseline'"),
        ("baseline: {edges: [0.5, 0.2], fractions: [0.2, 0.3, 0.5]}", "edges must increase"),
        ("baseline: {edges: [0.5], fractions: [0.2, 0.3, 0.5]}", "1 edges need 2 fractions"),
        ("baseline: {edges: [0.5], fractions: [0.2, 0.3]}", "sum to 1"),
    ],
)  # fmt: skip
def test_health_field_errors_name_file_rule_and_field(
    tmp_path: Path, snippet: str, expected: str
) -> None:
    text = f"models:\n  - name: m\n    outputs:\n      - name: o\n        {snippet}\n"
    message = error_of(tmp_path, text)
    assert "models[0] (model 'm') outputs[0] (output 'o')" in message
    assert expected in message


def _window_psi(window: Array, baseline: tuple[tuple[float, ...], tuple[float, ...]]) -> float:
    edges, fractions = baseline
    counts = np.bincount(np.searchsorted(edges, window, side="left"), minlength=len(edges) + 1)
    return psi_reference((counts / window.size).tolist(), list(fractions))


def test_a_new_baseline_or_window_starts_the_window_afresh() -> None:
    metrics = GuardMetrics(CollectorRegistry(), ["m"])
    series = ("m", "s", "o")
    low = from_values(np.linspace(0.0, 0.5, 100))[:2]
    high = from_values(np.linspace(0.5, 1.0, 100))[:2]
    first, second = np.linspace(0.6, 0.9, 150), np.linspace(0.1, 0.4, 120)

    def psi_now() -> float | None:
        (family,) = list(metrics.drift.collect())
        return float(family.samples[0].value) if family.samples else None

    metrics.drift.observe(series, first, low, 200)
    assert psi_now() == pytest.approx(_window_psi(first, low))
    metrics.drift.observe(series, second, high, 200)  # a reload with another baseline
    assert psi_now() == pytest.approx(_window_psi(second, high))  # not first + second
    metrics.drift.observe(series, second[:50], high, 100)  # a smaller window: 50 rows
    assert psi_now() is None  # below the 100 rows a PSI needs


def test_workers_report_the_largest_psi_and_the_classes_not_their_sums() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from guard.metrics.aggregate import _add

    bucket: dict[Any, float] = {}
    for psi_value in (0.05, 0.4):  # two workers' windows
        text = (
            "# TYPE guard_output_drift_psi gauge\n"
            f'guard_output_drift_psi{{model="m",signature="s",output="o"}} {psi_value}\n'
            "# TYPE guard_output_classes gauge\n"
            'guard_output_classes{model="m",signature="s",output="o"} 201\n'
            "# TYPE guard_near_uniform_rows counter\n"
            'guard_near_uniform_rows_total{model="m",signature="s",output="o"} 3\n'
        )
        for family in text_string_to_metric_families(text):
            _add(bucket, family)
    got = {name: value for (name, _), value in bucket.items()}
    assert got == {
        "guard_output_drift_psi": 0.4,
        "guard_output_classes": 201,
        "guard_near_uniform_rows_total": 6,
    }


def test_guard_baseline_writes_what_the_config_accepts(tmp_path: Path) -> None:
    from guard.cli import main
    from guard.control.config import load_config

    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, ["m"])
    metrics.output_value.observe(("m", "serving_default", "p"), np.linspace(0.3, 1.0, 300))
    saved = tmp_path / "metrics.txt"
    saved.write_bytes(generate_latest(registry))
    written = tmp_path / "baseline.yaml"
    argv = ["baseline", "--metrics-file", str(saved), "--model", "m", "--output", "p"]
    assert main([*argv, "--out", str(written)]) == 0
    assert main([*argv[:3], "--model", "m", "--output", "nothing"]) == 2  # no such series
    block = "\n".join("        " + line for line in written.read_text().splitlines())
    config = tmp_path / "guard.yaml"
    config.write_text(f"models:\n  - name: m\n    outputs:\n      - name: p\n{block}\n")
    rule = load_config(config).models[0].outputs[0]
    assert rule.baseline is not None
    assert rule.baseline.edges == OUTPUT_VALUE_BUCKETS
    assert rule.baseline.fractions == pytest.approx(
        from_values(np.linspace(0.3, 1, 300))[1], abs=1e-6
    )
