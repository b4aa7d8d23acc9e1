"""The rule engine (:mod:`guard.dataplane.rules`): pure numpy, checked against independent truth.

Activations are compared with TensorFlow's, counts with a plain numpy recount,
top-k with a stable argsort; hypothesis drives random shapes and values
(NaN, ±Inf, float32 max, subnormals) through random rules.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from guard.control.config import OutputRule, parse_config
from guard.dataplane.errors import ConfigError, GuardError, LabelMismatchError, OutputShapeError
from guard.dataplane.results import Action, Counts, OutputResult
from guard.dataplane.rules import apply_rule, label_table

FLOATS = [np.float16, np.float32, np.float64]


def run(values: Any, labels: tuple[str, ...] | None = None, **rule: Any) -> OutputResult:
    """apply_rule with an OutputRule built from keywords."""
    r = OutputRule(labels=labels, **rule)
    return apply_rule(np.asarray(values), r, label_table(labels), "wide_deep", "output_1")


def derived(result: OutputResult) -> dict[str, np.ndarray[Any, Any]]:
    return {d.suffix: d.array for d in result.derived}


# ---------------------------------------------------------------- activation


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_matches_tensorflow(dtype: Any) -> None:
    x = np.array([[-1000.0, -30.0, -1.0, 0.0, 1.0, 30.0, 1000.0]], dtype=dtype)
    result = run(x, activation="sigmoid")
    expected = tf.math.sigmoid(x).numpy()
    np.testing.assert_allclose(result.values, expected, rtol=1e-6, atol=0)
    assert result.values.dtype == dtype
    assert result.changed and result.action == Action.CLEAN
    np.testing.assert_array_equal(result.checked, result.values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 7)])
def test_softmax_over_last_axis_matches_tensorflow(dtype: Any, shape: tuple[int, ...]) -> None:
    x = (np.random.default_rng(1).standard_normal(shape) * 50).astype(dtype)
    result = run(x, activation="softmax", check_sum=True)
    expected = tf.nn.softmax(x, axis=-1).numpy()
    # TF flushes subnormals to zero; numpy keeps them.
    np.testing.assert_allclose(result.values, expected, rtol=1e-5, atol=1e-30)
    assert result.counts.bad_rows == 0 and result.action == Action.CLEAN


def test_sigmoid_float16_is_computed_wide_and_kept_half() -> None:
    x = np.array([-20.0, -2.0, 0.0, 2.0, 20.0], dtype=np.float16)
    result = run(x, activation="sigmoid")
    assert result.values.dtype == np.float16
    expected = tf.math.sigmoid(x.astype(np.float32)).numpy().astype(np.float16)
    np.testing.assert_array_equal(result.values, expected)


def test_no_activation_returns_the_input_unchanged() -> None:
    x = np.array([0.1, 0.9], dtype=np.float32)
    result = run(x)
    assert result.values is x and not result.changed and result.action == Action.CLEAN


# ---------------------------------------------------------------- validation


def test_each_violation_kind_is_counted_once() -> None:
    x = np.array([-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    result = run(x)
    assert result.counts == Counts(values=9, below_min=1, above_max=2, nan=1, inf=2)
    assert result.counts.violating_values == 6 and result.counts.total == 6
    assert result.action == Action.OBSERVED
    assert result.values is x and not result.changed  # observe leaves it alone


def test_inf_is_only_inf_also_with_open_ranges() -> None:
    x = np.array([np.inf, -np.inf, 5.0], dtype=np.float64)
    assert run(x, valid_range=(0.0, float("inf"))).counts == Counts(values=3, inf=2)
    assert run(x, valid_range=(float("-inf"), 1.0)).counts == Counts(values=3, above_max=1, inf=2)
    assert run(x, valid_range=(6.0, 7.0)).counts == Counts(values=3, below_min=1, inf=2)


def test_check_sum_counts_rows_off_by_more_than_tolerance() -> None:
    x = np.array([[0.5, 0.5], [0.5, 0.5009], [0.5, 0.502], [0.2, 0.2], [np.nan, 1.0]])
    result = run(x, check_sum=True, sum_tolerance=1e-3)
    assert result.counts.bad_rows == 3  # 1.002, 0.4 and the NaN row
    assert result.counts.nan == 1
    assert result.counts.total == 4
    loose = run(x[:3], check_sum=True, sum_tolerance=0.01)
    assert loose.counts.bad_rows == 0 and loose.action == Action.CLEAN


@pytest.mark.parametrize("tolerance", [0.0, 1e-3, 1e-2, 0.3, 1.0])
def test_check_sum_verdict_is_exact_at_the_tolerance_boundary(tolerance: float) -> None:
    # A fast path decides "all rows fine" from the min and max of the sums; rows
    # whose sums sit on either edge of the band, or one float beyond, must get
    # exactly the verdict of |sum - 1| <= tolerance in float64.
    edges = [1.0 - tolerance, 1.0 + tolerance, 1.0]
    sums = sorted({float(v) for e in edges for v in (np.nextafter(e, -9), e, np.nextafter(e, 9))})
    for s in sums:
        x = np.array([[s, 0.0]])  # a float64 row sums exactly to s
        expected = int(not abs(s - 1.0) <= tolerance)
        assert run(x, check_sum=True, sum_tolerance=tolerance).counts.bad_rows == expected, s
    many = np.array([[s, 0.0] for s in sums])
    expected = sum(not abs(s - 1.0) <= tolerance for s in sums)
    assert run(many, check_sum=True, sum_tolerance=tolerance).counts.bad_rows == expected


def test_check_sum_on_one_value_per_row() -> None:
    x = np.array([1.0, 0.5, 1.0], dtype=np.float32)
    assert run(x, check_sum=True).counts.bad_rows == 1


# ------------------------------------------------------------------ policies


def test_observe_keeps_values_and_still_derives() -> None:
    x = np.array([[0.2, 1.3], [0.9, 0.1]], dtype=np.float32)
    result = run(x, argmax=True)
    assert result.action == Action.OBSERVED and result.values is x
    np.testing.assert_array_equal(derived(result)["_class"], [1, 0])
    np.testing.assert_array_equal(derived(result)["_score"], np.array([1.3, 0.9], np.float32))


def test_clamp_clips_and_sends_inf_to_bounds() -> None:
    x = np.array([-0.5, 0.25, 1.0028, np.inf, -np.inf], dtype=np.float32)
    result = run(x, on_violation="clamp")
    assert result.action == Action.CLAMPED and result.changed
    np.testing.assert_array_equal(result.values, np.array([0, 0.25, 1, 1, 0], np.float32))
    np.testing.assert_array_equal(x[2], np.float32(1.0028))  # the input is not modified
    np.testing.assert_array_equal(result.checked[2], np.float32(1.0028))  # metrics see the raw


def test_clamp_renormalises_only_bad_rows() -> None:
    x = np.array([[0.5, 0.5], [0.6, 0.6], [0.0, 0.0], [1.2, -0.1], [0.5, 0.5004]])
    result = run(x, on_violation="clamp", check_sum=True)
    assert result.action == Action.CLAMPED
    np.testing.assert_allclose(
        result.values, [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5004]]
    )
    # [0.6, 0.6], [0.0, 0.0] and [1.2, -0.1]; the last sums to 1 once clipped, so it
    # is not renormalised.
    assert result.counts.bad_rows == 3
    assert result.counts.below_min == 1 and result.counts.above_max == 1


def test_clamp_cannot_repair_nan() -> None:
    x = np.array([0.5, np.nan, 1.5], dtype=np.float32)
    result = run(x, on_violation="clamp")
    assert result.action == Action.REJECTED
    assert result.rejection is not None
    assert result.rejection.startswith("guard: model 'wide_deep' output 'output_1': 1 NaN")
    assert result.values is x and not result.changed
    assert result.counts.nan == 1 and result.counts.above_max == 1


def test_reject_message_names_model_output_and_counts() -> None:
    x = np.array([1.1, 1.2, 1.3, 1.4, 1.5, 0.5], dtype=np.float32)
    result = run(x, on_violation="reject", argmax=True)
    assert result.action == Action.REJECTED
    assert result.rejection == "guard: model 'wide_deep' output 'output_1': 5 values above 1.0"
    assert result.derived == [] and not result.changed


def test_reject_message_lists_every_kind() -> None:
    x = np.array([[-1.0, np.nan], [np.inf, 0.7]], dtype=np.float64)
    result = run(x, on_violation="reject", check_sum=True)
    assert result.rejection == (
        "guard: model 'wide_deep' output 'output_1': 1 values below 0.0, 1 NaN values, "
        "1 infinite values, 2 rows not summing to 1 (tolerance 0.001)"
    )


def test_reject_with_clean_values_is_clean() -> None:
    result = run(np.array([0.0, 1.0, 0.5], np.float32), on_violation="reject")
    assert result.action == Action.CLEAN and result.rejection is None


# ------------------------------------------------------------------- derive


def test_threshold_is_strictly_greater_like_keras_binary_accuracy() -> None:
    x = np.array([[0.0747], [0.5], [0.50001], [0.8348]], dtype=np.float32)
    result = run(x, threshold=0.5, labels=("NO", "YES"))
    cls = derived(result)["_class"]
    assert cls.dtype == np.int64 and cls.shape == (4, 1)
    np.testing.assert_array_equal(cls.ravel(), [0, 0, 1, 1])
    keras = tf.keras.metrics.BinaryAccuracy(threshold=0.5)
    keras.update_state(cls.astype(np.float32), x)
    assert keras.result().numpy() == 1.0  # Keras agrees, value by value
    assert derived(result)["_label"].ravel().tolist() == [b"NO", b"NO", b"YES", b"YES"]
    assert derived(result)["_label"].shape == (4, 1)
    assert not result.multi_label


def test_threshold_per_class_for_multi_label() -> None:
    x = np.array([[0.3, 0.3, 0.3], [0.9, 0.6, 0.85]], dtype=np.float32)
    result = run(x, threshold=(0.2, 0.5, 0.8))
    np.testing.assert_array_equal(derived(result)["_class"], [[1, 0, 0], [1, 1, 1]])
    assert result.multi_label


def test_threshold_list_of_wrong_length_is_a_shape_error() -> None:
    with pytest.raises(OutputShapeError, match="2 thresholds configured but the output has 3"):
        run(np.zeros((2, 3), np.float32), threshold=(0.5, 0.5))


def test_argmax_and_score() -> None:
    x = np.array([[0.1, 0.7, 0.2], [0.4, 0.4, 0.2], [0.0, 0.0, 1.0]], dtype=np.float32)
    result = run(x, argmax=True, labels=("cat", "dog", "eel"))
    d = derived(result)
    np.testing.assert_array_equal(d["_class"], [1, 0, 2])  # a tie goes to the lower index
    np.testing.assert_array_equal(d["_class"], np.argmax(x, axis=-1))
    np.testing.assert_array_equal(d["_score"], np.max(x, axis=-1))
    assert d["_class"].dtype == np.int64 and d["_score"].dtype == np.float32
    assert d["_label"].tolist() == [b"dog", b"cat", b"eel"]
    np.testing.assert_array_equal(result.classes, [1, 0, 2])


def test_argmax_on_rank_three_reduces_the_last_axis() -> None:
    x = np.random.default_rng(2).random((2, 3, 5))
    d = derived(run(x, argmax=True))
    np.testing.assert_array_equal(d["_class"], np.argmax(x, axis=-1))
    assert d["_score"].shape == (2, 3) and d["_score"].dtype == np.float64


@pytest.mark.parametrize("k", [1, 3, 201])
def test_top_k_best_first_equals_stable_argsort(k: int) -> None:
    rng = np.random.default_rng(k)
    x = rng.permutation(np.arange(8 * 201, dtype=np.float32)).reshape(8, 201) / 2000
    d = derived(run(x, top_k=k))
    expected = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(d["_top_k_class"], expected)
    np.testing.assert_array_equal(d["_top_k_score"], np.take_along_axis(x, expected, axis=-1))
    assert d["_top_k_class"].shape == (8, k)


def test_top_k_ties_go_to_the_lower_index() -> None:
    x = np.array([[0.2, 0.4, 0.4, 0.0]], dtype=np.float64)
    d = derived(run(x, top_k=3))
    np.testing.assert_array_equal(d["_top_k_class"], [[1, 2, 0]])


def test_top_k_labels_and_argmax_together() -> None:
    x = np.array([[0.1, 0.6, 0.3]], dtype=np.float16)
    result = run(x, argmax=True, top_k=2, labels=("a", "b", "c"))
    d = derived(result)
    assert d["_top_k_label"].tolist() == [[b"b", b"c"]]
    assert d["_label"].tolist() == [b"b"]
    assert d["_top_k_score"].dtype == np.float16 and d["_score"].dtype == np.float16
    assert [x.suffix for x in result.derived] == [
        "_class",
        "_score",
        "_label",
        "_top_k_class",
        "_top_k_score",
        "_top_k_label",
    ]


def test_top_k_larger_than_classes_is_a_shape_error() -> None:
    with pytest.raises(OutputShapeError, match="top_k is 4 but the output has only 3 classes"):
        run(np.zeros((2, 3), np.float32), top_k=4)


@pytest.mark.parametrize(
    ("rule", "classes"),
    [({"argmax": True}, 3), ({"top_k": 2}, 3), ({"argmax": True}, 1)],
)
def test_label_count_must_match_classes(rule: dict[str, Any], classes: int) -> None:
    with pytest.raises(
        LabelMismatchError, match=f"2 labels configured but the output has {classes}"
    ):
        run(np.zeros((2, classes), np.float32), labels=("a", "b"), **rule)


def test_threshold_needs_exactly_two_labels_in_config() -> None:
    rule = {"name": "p", "threshold": 0.5, "labels": ["a", "b", "c"]}
    with pytest.raises(ConfigError, match="a threshold needs exactly 2 labels"):
        parse_config({"models": [{"name": "m", "outputs": [rule]}]})


@pytest.mark.parametrize("dtype", FLOATS)
def test_dtype_is_kept_through_activation_and_clamp(dtype: Any) -> None:
    x = np.array([[3.0, -1.0], [0.5, 0.25]], dtype=dtype)
    for rule in ({"activation": "softmax"}, {"on_violation": "clamp"}, {"activation": "sigmoid"}):
        result = run(x, argmax=True, **rule)  # type: ignore[arg-type]
        assert result.values.dtype == dtype
        assert derived(result)["_score"].dtype == dtype


@pytest.mark.parametrize("shape", [(), (5,), (5, 1)])
def test_one_value_per_row_shapes(shape: tuple[int, ...]) -> None:
    x = np.full(shape, 0.7, dtype=np.float32)
    d = derived(run(x, threshold=0.5))
    assert d["_class"].shape == shape and np.all(d["_class"] == 1)
    a = derived(run(x, argmax=True))
    assert a["_class"].shape == (shape[0],) if shape else a["_class"].shape == ()
    assert np.all(a["_class"] == 0)


@pytest.mark.parametrize("rule", [{"threshold": 0.5}, {"argmax": True, "labels": ("only",)}])
def test_scalar_output_labels_are_arrays(rule: dict[str, Any]) -> None:
    labels = rule.pop("labels", ("NO", "YES"))
    result = run(np.array(0.7, np.float32), labels=labels, **rule)
    for d in result.derived:
        assert isinstance(d.array, np.ndarray), d.suffix
        assert d.array.shape == ()


@pytest.mark.parametrize("rule", [{"activation": "softmax"}, {"check_sum": True}, {"argmax": True}])
def test_zero_width_class_axis_is_not_a_crash(rule: dict[str, Any]) -> None:
    try:
        run(np.zeros((3, 0), np.float32), **rule)
    except GuardError:
        pass


def test_clamp_float16_with_bounds_beyond_half_range() -> None:
    x = np.array([np.inf, -np.inf, 1.0], dtype=np.float16)
    result = run(x, valid_range=(-1e5, 1e5), on_violation="clamp")
    assert np.isfinite(result.values).all()


def test_clamp_with_open_upper_bound_and_check_sum_gives_no_nan() -> None:
    x = np.array([[np.inf, 0.5]], dtype=np.float32)
    result = run(x, valid_range=(0.0, float("inf")), check_sum=True, on_violation="clamp")
    assert result.action in (Action.CLAMPED, Action.REJECTED)
    if result.action == Action.CLAMPED:
        assert not np.isnan(result.values).any()


# ---------------------------------------------------------- property tests

EXTREMES = {
    np.float16: [65504.0, -65504.0, 6e-8, -6e-8, 6.1e-5],
    np.float32: [3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 1.1754944e-38],
    np.float64: [1.7976931348623157e308, -1.7976931348623157e308, 5e-324, 2.2250738585072014e-308],
}
SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 0.5, 1.0028, -0.001]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    dtype = draw(st.sampled_from(FLOATS))
    rank = draw(st.integers(0, 3))
    lead = draw(st.lists(st.integers(0, 4), min_size=max(rank - 1, 0), max_size=max(rank - 1, 0)))
    # The class axis is never zero-wide here (a known bug has its own test above).
    shape = tuple(lead + [draw(st.integers(1, 6))]) if rank else ()
    n = int(np.prod(shape, dtype=np.int64))
    width: Literal[16, 32, 64] = {np.float16: 16, np.float32: 32, np.float64: 64}[dtype]  # type: ignore[assignment]
    element = st.one_of(
        st.floats(width=width),
        st.sampled_from(SPECIAL + EXTREMES[dtype]),
        st.floats(0, 1, width=width),
    )
    flat = draw(st.lists(element, min_size=n, max_size=n))
    return np.array(flat, dtype=dtype).reshape(shape)


@st.composite
def rules(draw: st.DrawFn, classes: int, rank: int) -> OutputRule:
    check_sum = draw(st.booleans())
    lo = draw(st.sampled_from([0.0] if check_sum else [-100.0, -1.0, 0.0, 0.25]))
    hi = draw(st.sampled_from([1.0, 2.0, 100.0] if check_sum else [0.5, 1.0, 2.0, 100.0]))
    # Rank 0 with a per-class threshold list or with labels: known bugs, tested above.
    derive = draw(
        st.sampled_from(["none", "threshold", "argmax"] + (["thresholds"] if rank else []))
    )
    top_k = draw(st.integers(0, classes + 1))
    labels: tuple[str, ...] | None = None
    if derive in ("threshold", "thresholds"):
        if draw(st.booleans()):
            labels = ("NO", "YES")  # the config allows exactly 2 with a threshold
    elif (derive == "argmax" or top_k) and draw(st.booleans()):
        labels = tuple(f"c{i}" for i in range(draw(st.sampled_from([classes, classes + 1]))))
    threshold: float | tuple[float, ...] | None = None
    if derive == "threshold":
        threshold = draw(st.sampled_from([0.5, 0.0, 0.9]))
    elif derive == "thresholds":
        n = draw(st.sampled_from([classes, classes + 1]))
        threshold = tuple(draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)))
    return OutputRule(
        activation=draw(st.sampled_from(["none", "sigmoid", "softmax"])),
        valid_range=(lo, hi),
        check_sum=check_sum,
        sum_tolerance=draw(st.sampled_from([1e-3, 1e-2, 1.0])),
        on_violation=draw(st.sampled_from(["observe", "clamp", "reject"])),
        threshold=threshold,
        argmax=derive == "argmax",
        top_k=top_k,
        labels=labels,
    )


def recount(values: np.ndarray[Any, Any], rule: OutputRule) -> Counts:
    """The counts, computed the obvious way (one kind per value)."""
    lo, hi = rule.valid_range
    v = values.astype(np.float64).ravel()
    finite = np.isfinite(v)
    counts = Counts(
        values=v.size,
        below_min=int(np.sum(finite & (v < lo))),
        above_max=int(np.sum(finite & (v > hi))),
        nan=int(np.sum(np.isnan(v))),
        inf=int(np.sum(np.isinf(v))),
    )
    if rule.check_sum:
        c = values.shape[-1] if values.ndim >= 2 else 1
        with np.errstate(invalid="ignore", over="ignore"):
            sums = values.astype(np.float64).reshape(-1, c).sum(axis=1)
        counts.bad_rows = int(np.sum(~(np.abs(sums - 1) <= rule.sum_tolerance)))
    return counts


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rule_engine_properties(data: st.DataObject) -> None:
    values = data.draw(arrays())
    classes = values.shape[-1] if values.ndim >= 2 else 1
    rule = data.draw(rules(classes, values.ndim))
    assume(values.ndim or rule.labels is None)
    before = values.copy()
    try:
        result = apply_rule(values, rule, label_table(rule.labels), "m", "o")
    except GuardError as exc:
        assert exc.details.startswith("guard: model 'm' output 'o': ")
        shape_problem = rule.top_k > classes or (
            isinstance(rule.threshold, tuple) and len(rule.threshold) != classes
        )
        label_problem = rule.labels is not None and len(rule.labels) != classes
        assert shape_problem or label_problem
        assert isinstance(exc, (OutputShapeError, LabelMismatchError))
        return
    np.testing.assert_array_equal(values, before)  # the input is never modified in place

    # Counts add up and agree with a plain recount of the checked values.
    c = result.counts
    assert c == recount(result.checked, rule)
    assert c.values == values.size
    assert 0 <= c.violating_values <= c.values
    rows = values.size // classes if classes else 0
    assert 0 <= c.bad_rows <= rows

    # The action follows from the counts and the policy.
    assert result.values.shape == values.shape and result.values.dtype == values.dtype
    if c.total == 0:
        assert result.action == Action.CLEAN
    elif rule.on_violation == "observe":
        assert result.action == Action.OBSERVED
    elif rule.on_violation == "reject" or c.nan:
        assert result.action == Action.REJECTED
        assert result.rejection and result.rejection.startswith("guard: model 'm' output 'o': ")
        assert result.derived == []
        return
    else:
        assert result.action == Action.CLAMPED
        lo, hi = rule.valid_range
        out = result.values.astype(np.float64)
        assert not np.isnan(out).any()
        assert (out >= lo).all() and (out <= hi).all()
        # Rank 0: a known bug with its own test (the renormalisation is lost).
        if rule.check_sum and values.dtype != np.float16 and values.ndim:
            sums = out.reshape(-1, classes).sum(axis=1)
            assert (np.abs(sums - 1) <= rule.sum_tolerance + 1e-6).all()
    if rule.activation == "none" and result.action != Action.CLAMPED:
        assert result.values is values and not result.changed

    # Derived outputs have the right shapes and dtypes.
    lead = values.shape[:-1] if values.ndim >= 2 else values.shape
    d = derived(result)
    if rule.threshold is not None:
        assert d["_class"].shape == values.shape and d["_class"].dtype == np.int64
        assert set(np.unique(d["_class"]).tolist()) <= {0, 1}
    if rule.argmax:
        assert np.shape(d["_class"]) == lead and np.shape(d["_score"]) == lead
        assert d["_score"].dtype == values.dtype
    if rule.top_k:
        assert d["_top_k_class"].shape == (*lead, rule.top_k)
        assert d["_top_k_score"].shape == (*lead, rule.top_k)
        assert ((d["_top_k_class"] >= 0) & (d["_top_k_class"] < classes)).all()
        scores = d["_top_k_score"].astype(np.float64)
        finite = np.isfinite(scores).all(axis=-1)
        assert (np.diff(scores[finite], axis=-1) <= 0).all()  # best first
    if rule.labels is not None:
        for suffix in ("_label", "_top_k_label"):
            if suffix in d:
                assert d[suffix].dtype == object
                assert all(isinstance(x, bytes) for x in np.ravel(d[suffix]))
    if rule.argmax and rule.top_k:
        np.testing.assert_array_equal(d["_score"], d["_top_k_score"][..., 0])


@st.composite
def distinct_rows(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    classes = draw(st.integers(1, 12))
    rows = draw(st.integers(1, 5))
    element = st.floats(-1e6, 1e6, width=32)  # exact in both dtypes
    flat = [
        draw(st.lists(element, min_size=classes, max_size=classes, unique=True))
        for _ in range(rows)
    ]
    return np.array(flat, dtype=dtype)


@settings(max_examples=150, deadline=None)
@given(distinct_rows(), st.integers(1, 12))
def test_top_k_matches_stable_argsort_without_ties(values: np.ndarray[Any, Any], k: int) -> None:
    k = min(k, values.shape[-1])
    d = derived(run(values, top_k=k, argmax=True, valid_range=(-1e7, 1e7)))
    expected = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(d["_top_k_class"], expected)
    np.testing.assert_array_equal(d["_top_k_score"], np.take_along_axis(values, expected, -1))
    np.testing.assert_array_equal(d["_class"], np.argmax(values, axis=-1))


def test_ties_go_to_the_lower_index_as_documented() -> None:
    x = np.array([[-1.0, -1.0, 0.0, 0.0]], dtype=np.float32)
    d = derived(run(x, argmax=True, top_k=2, valid_range=(-1.0, 1.0)))
    np.testing.assert_array_equal(d["_top_k_class"], [[2, 3]])
    np.testing.assert_array_equal(d["_class"], [2])  # np.argmax / tf.argmax give 2


def test_threshold_list_on_scalar_keeps_the_shape() -> None:
    d = derived(run(np.array(0.7, np.float32), threshold=(0.5,)))
    assert d["_class"].shape == ()


def test_clamp_renormalises_a_rank_zero_output() -> None:
    result = run(np.array(0.0, np.float32), check_sum=True, on_violation="clamp")
    assert result.action == Action.CLAMPED
    assert float(result.values) == 1.0


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_confidence_is_the_row_max_of_the_checked_values(data: st.DataObject) -> None:
    """The histogram reads ``confidence``; after a clamp it must still be the
    top value of each row *before* repair, exactly as a plain scan gives it."""
    rows = data.draw(st.integers(1, 6))
    classes = data.draw(st.integers(1, 9))
    element = st.floats(-3.0, 3.0, width=32)
    values = np.array(
        data.draw(st.lists(element, min_size=rows * classes, max_size=rows * classes)),
        dtype=np.float32,
    ).reshape(rows, classes)
    rule = OutputRule(
        valid_range=(0.0, 1.0),
        check_sum=data.draw(st.booleans()),
        on_violation="clamp",
        argmax=data.draw(st.booleans()),
        top_k=data.draw(st.integers(0, classes)),
    )
    result = apply_rule(values, rule, None, "m", "o")
    if result.confidence is not None:
        np.testing.assert_array_equal(result.confidence, values.max(axis=1))
