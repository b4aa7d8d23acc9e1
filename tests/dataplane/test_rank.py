"""The native clean path (``guard.dataplane._rank``) against the numpy path it shortcuts.

``guard.dataplane.rules`` hands a clean output (finite, in range, rows summing to 1) to
one native call that checks and ranks it. The numpy path stays the reference:
every result here is computed both ways and must be identical, field by field,
including the rows right at the sum tolerance and ties between classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from tensorflow_serving.apis import predict_pb2

from guard.control.config import OutputRule
from guard.dataplane import rules, wire
from guard.dataplane.errors import GuardError
from guard.dataplane.rules import OutputResult, apply_rule, label_table
from tests.dataplane.test_pipeline import Guard, response, tensor
from tests.dataplane.test_rules import arrays
from tests.dataplane.test_rules import rules as rule_strategy
from tests.native import pure_python

Array = np.ndarray[Any, Any]


def outcome(values: Array, rule: OutputRule) -> OutputResult | tuple[type, str]:
    try:
        return apply_rule(values, rule, label_table(rule.labels), "m", "probs")
    except GuardError as exc:
        return type(exc), exc.details


def assert_same_array(a: Array | None, b: Array | None) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == object:
        assert a.tolist() == b.tolist()
    else:
        # Bit for bit: -0.0 and 0.0 are told apart, NaN equals NaN.
        np.testing.assert_array_equal(
            np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)
        )


def assert_both_paths_agree(values: Array, rule: OutputRule) -> OutputResult | None:
    native = outcome(values, rule)
    with pure_python():
        reference = outcome(values, rule)
    if not isinstance(reference, OutputResult):
        assert native == reference
        return None
    assert isinstance(native, OutputResult)
    assert (native.changed, native.counts, native.action, native.rejection) == (
        reference.changed,
        reference.counts,
        reference.action,
        reference.rejection,
    )
    assert native.multi_label == reference.multi_label
    for field in ("values", "checked", "classes", "confidence"):
        assert_same_array(getattr(native, field), getattr(reference, field))
    assert [d.suffix for d in native.derived] == [d.suffix for d in reference.derived]
    for mine, theirs in zip(native.derived, reference.derived, strict=True):
        assert_same_array(mine.array, theirs.array)
    return native


def test_the_native_path_is_built_by_the_install() -> None:
    # `make test` installs a C compiler first; an install without one still
    # works (numpy path only), but this suite must exercise both.
    assert rules.NATIVE


def test_clean_softmax_rows_take_the_native_path() -> None:
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(201), size=8).astype(np.float32)
    rule = OutputRule(check_sum=True, argmax=True, top_k=5)
    top = rules._native_clean(x, rule, 5)
    assert top is not None
    expected = np.argsort(-x, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(top[0], expected)
    np.testing.assert_array_equal(top[1], np.take_along_axis(x, expected, axis=1))
    assert_both_paths_agree(x, rule)


@pytest.mark.parametrize(
    "bad",
    [
        lambda x: x.__setitem__((0, 3), np.nan),
        lambda x: x.__setitem__((1, 0), np.inf),
        lambda x: x.__setitem__((2, 7), -1e-7),
        lambda x: x.__setitem__((3, 7), 1.5),
        lambda x: x.__setitem__((4, slice(None)), x[4] * 1.01),  # the row sums to 1.01
    ],
)
def test_anything_to_count_goes_to_the_numpy_path(bad: Any) -> None:
    x = np.random.default_rng(1).dirichlet(np.ones(10), size=6)
    bad(x)
    rule = OutputRule(check_sum=True, top_k=3)
    assert rules._native_clean(x, rule, 3) is None
    result = assert_both_paths_agree(x, rule)
    assert result is not None and result.counts.total > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_at_the_tolerance_agree(dtype: Any) -> None:
    # Rows whose sums sit a few ulps either side of 1 ± tolerance: the native
    # sum is not numpy's pairwise sum, so these must fall back, never differ.
    tolerance = 1e-3
    rows = []
    for target in (1 - tolerance, 1 + tolerance):
        for ulps in range(-40, 41):
            s = target + ulps * np.spacing(target)
            rows.append(np.full(7, s / 7, dtype=np.float64).astype(dtype))
    for row in rows:
        assert_both_paths_agree(row[None, :], OutputRule(check_sum=True, sum_tolerance=tolerance))


def test_ties_and_signed_zeros_rank_like_repeated_argmax() -> None:
    x = np.array([[0.0, -0.0, 0.25, 0.25, 0.5, 0.0]], dtype=np.float32)
    result = assert_both_paths_agree(x, OutputRule(valid_range=(-1.0, 1.0), top_k=6, argmax=True))
    assert result is not None
    top = {d.suffix: d.array for d in result.derived}["_top_k_class"]
    np.testing.assert_array_equal(top, [[4, 2, 3, 0, 1, 5]])


def test_non_contiguous_and_other_dtypes_are_left_to_numpy() -> None:
    x = np.random.default_rng(2).dirichlet(np.ones(4), size=6)
    rule = OutputRule(check_sum=True, top_k=2)
    assert rules._native_clean(x[:, ::-1], rule, 2) is None
    assert rules._native_clean(x.astype(np.float16), rule, 2) is None
    assert rules._native_clean(x.astype(">f8"), rule, 2) is None
    assert rules._native_clean(np.zeros((6, 40)), OutputRule(top_k=17), 17) is None
    for variant in (x[:, ::-1], x.astype(np.float16), x.astype(">f8")):
        assert_both_paths_agree(variant, rule)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_values_rank_as_aligned_ones(dtype: Any) -> None:
    # Values read in place from a response sit at any offset of its bytes.
    assert rules._rank is not None
    x = np.random.default_rng(3).dirichlet(np.ones(37), size=5).astype(dtype)
    expected = rules._rank.clean_top_k(x, x.itemsize, 5, 37, 4, 0.0, 1.0, True, 0.999, 1.001)
    assert expected is not None
    for shift in range(1, 9):
        misaligned = memoryview(b"\0" * shift + x.tobytes())[shift:]
        found = rules._rank.clean_top_k(
            misaligned, x.itemsize, 5, 37, 4, 0.0, 1.0, True, 0.999, 1.001
        )
        assert found == expected


def test_the_kernel_refuses_arguments_that_do_not_describe_the_buffer() -> None:
    assert rules._rank is not None
    x = np.zeros((2, 3), dtype=np.float32)
    kernel = rules._rank.clean_top_k
    for args in [
        (x, 4, 2, 4, 1),  # 8 values described, 6 given
        (x, 8, 2, 3, 1),  # float32 read as float64
        (x, 4, 2, 3, 4),  # k larger than the classes
        (x, 4, 2, 3, -1),
        (x, 4, 2, 0, 0),
        (x, 2, 3, 2, 1),  # no such item size
    ]:
        with pytest.raises(ValueError, match="do not describe the buffer"):
            kernel(*args, 0.0, 1.0, False, 0.999, 1.001)
    big = np.zeros((1, 40), dtype=np.float64)
    with pytest.raises(ValueError):
        kernel(big, 8, 1, 40, rules._rank.MAX_K + 1, 0.0, 1.0, False, 0.999, 1.001)


def test_the_encoder_refuses_entry_specs_it_cannot_write() -> None:
    assert rules._rank is not None
    x = np.full((2, 3), 1 / 3, dtype=np.float32)
    encode = rules._rank.clean_rank_encode
    head = (b"\x0a\x01a", b"\x08\x09")
    labels = (b"\x42\x01x", b"\x42\x01y", b"\x42\x01z")
    good = encode(x, 4, 2, 3, 1, 0.0, 1.0, True, 0.999, 1.001, False, 0x2A, ((*head, 2, labels),))
    assert good is not None
    for entries, error in [
        (((*head, 2),), ValueError),  # a label entry without labels
        (((*head, 0, labels),), ValueError),  # labels on a class entry
        (((*head, 2, labels[:2]),), ValueError),  # fewer labels than classes
        (((*head, 2, (b"x", "y", b"z")),), TypeError),  # a label that is not bytes
        (((*head, 6),), ValueError),  # no such kind
        ([(*head, 0)], TypeError),  # entries must be a tuple
        (((*head, 0),) * 7, ValueError),  # more entries than outputs exist
        ((list((*head, 0)),), TypeError),
    ]:
        with pytest.raises(error):
            encode(x, 4, 2, 3, 1, 0.0, 1.0, True, 0.999, 1.001, False, 0x2A, entries)


@st.composite
def near_clean(draw: st.DrawFn) -> tuple[Array, OutputRule]:
    """Mostly clean softmax-like rows: sums near the tolerance, ties, zeros."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rows = draw(st.integers(1, 5))
    classes = draw(st.integers(1, 30))
    tolerance = draw(st.sampled_from([1e-6, 1e-3, 1e-2]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.dirichlet(np.ones(classes), size=rows)
    if draw(st.booleans()):
        x = np.round(x * 8) / 8  # ties, exact zeros, and rows off by a lot
    scale = 1.0 + tolerance * draw(st.sampled_from([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 1.5]))
    x = x * scale
    lo = draw(st.sampled_from([0.0, -1.0]))
    if lo < 0 and classes >= 2:
        x[:, 0] -= 0.25  # negative values, the same row sums: the native sum|x| path
        x[:, 1] += 0.25
    x = x.astype(dtype)
    rank = draw(st.sampled_from([2, 3]))
    if rank == 3:
        x = x.reshape(rows, 1, classes)
    top_k = draw(st.integers(0, min(classes, 18)))
    labels = tuple(f"c{i}" for i in range(classes)) if draw(st.booleans()) else None
    rule = OutputRule(
        valid_range=(lo, draw(st.sampled_from([1.0, 0.5]))),
        check_sum=draw(st.booleans()),
        sum_tolerance=tolerance,
        on_violation=draw(st.sampled_from(["observe", "clamp", "reject"])),
        argmax=draw(st.booleans()),
        top_k=top_k,
        labels=labels,
    )
    return x, rule


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_clean())
def test_near_clean_outputs_agree_with_numpy(case: tuple[Array, OutputRule]) -> None:
    values, rule = case
    assert_both_paths_agree(values, rule)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_output_and_rule_agree_with_numpy(data: st.DataObject) -> None:
    values = data.draw(arrays())
    classes = values.shape[-1] if values.ndim >= 2 else 1
    rule = data.draw(rule_strategy(classes, values.ndim))
    assert_both_paths_agree(values, rule)


# ------------------------------------------------------- the pipeline's fast lane


@st.composite
def guarded_cases(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A config rule and a response of mostly clean outputs, in any encoding."""
    values, rule = draw(near_clean())
    encoding = draw(st.sampled_from([wire.Encoding.TYPED, wire.Encoding.CONTENT]))
    output: dict[str, Any] = {"name": "probs", "argmax": rule.argmax, "top_k": rule.top_k}
    output |= {"check_sum": rule.check_sum, "sum_tolerance": rule.sum_tolerance}
    output |= {"valid_range": list(rule.valid_range), "on_violation": rule.on_violation}
    if rule.check_sum and rule.on_violation == "clamp":
        output["valid_range"] = [0.0, 1.0]  # the config refuses less (renormalising needs 1)
    if rule.labels is not None and (rule.argmax or rule.top_k):
        output["labels"] = list(rule.labels)
    outputs = {"probs": tensor(values, encoding, values.dtype.type)}
    if draw(st.booleans()):  # a second guarded output, and one left alone
        outputs["zeta"] = tensor(values[..., ::-1], encoding, values.dtype.type)
        outputs["other"] = tensor([1.5], encoding)
        output["name"] = "*"
    return output, response(outputs)


def run_pipeline(output: dict[str, Any], body: bytes) -> tuple[Any, bytes]:
    guard = Guard([{"name": "wide_deep", "outputs": [output]}])
    try:
        guarded = guard(body)
    except GuardError as exc:
        guarded = (type(exc), exc.details)
    return guarded, generate_latest(guard.registry)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(guarded_cases())
def test_fast_lane_writes_the_bytes_and_metrics_of_the_general_path(
    case: tuple[dict[str, Any], bytes],
) -> None:
    output, body = case
    fast, fast_metrics = run_pipeline(output, body)
    with pure_python():
        general, general_metrics = run_pipeline(output, body)
    assert fast == general
    assert fast_metrics == general_metrics


def test_fast_lane_outputs_read_back_with_the_official_classes() -> None:
    x = np.random.default_rng(5).dirichlet(np.ones(201), size=8).astype(np.float32)
    labels = [f"class-{i}" for i in range(201)]
    rule = {"name": "probs", "check_sum": True, "argmax": True, "top_k": 5, "labels": labels}
    guard = Guard([{"name": "wide_deep", "outputs": [rule]}])
    book_rules = guard.book.for_signature("wide_deep", "serving_default")
    assert book_rules is not None
    guarded = guard(response({"probs": tensor(x)}))
    assert guarded is not None and guarded.action == "clean"
    lane = book_rules.lane("probs", book_rules.rule_for("probs"), x, wire.Encoding.TYPED)  # type: ignore[arg-type]
    assert lane is not None and lane.run(x) is not None  # the lane, not the general path, ran
    back = predict_pb2.PredictResponse.FromString(guarded.body)
    best = np.argsort(-x, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(tf.make_ndarray(back.outputs["probs_class"]), best[:, 0])
    np.testing.assert_array_equal(tf.make_ndarray(back.outputs["probs_score"]), x.max(axis=1))
    np.testing.assert_array_equal(tf.make_ndarray(back.outputs["probs_top_k_class"]), best)
    np.testing.assert_array_equal(
        tf.make_ndarray(back.outputs["probs_top_k_score"]), np.take_along_axis(x, best, axis=1)
    )
    top_labels = tf.make_ndarray(back.outputs["probs_top_k_label"])
    assert top_labels.tolist() == [[labels[i].encode() for i in row] for row in best]
    assert list(back.outputs["probs_label"].string_val) == [labels[i].encode() for i in best[:, 0]]
    np.testing.assert_array_equal(tf.make_ndarray(back.outputs["probs"]), x)
