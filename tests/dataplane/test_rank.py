"""The native kernel (``guard.dataplane._rank``) against the numpy reference.

A lane hands a clean output (finite, in range, rows summing to 1) to one
native call that checks it, ranks it and encodes the derived outputs. The
numpy reference (:func:`guard.dataplane.rules.apply_rule`) decides everything
else, and stays the judge: whenever the kernel calls an output clean, the
reference must too, with the same classes, scores and encoded outputs, down
to the rows right at the sum tolerance and ties between classes; whenever
the reference counts something, the kernel must decline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from tensorflow_serving.apis import predict_pb2

from guard.dataplane import pipeline
from guard.dataplane.codec.tensor import Encoding, encode_output
from guard.dataplane.errors import GuardError, ResponseTooLargeError
from guard.dataplane.kernels import REFERENCE
from guard.dataplane.lanes import OutputSpec
from guard.dataplane.results import Action, OutputResult
from guard.dataplane.rules import apply_rule, label_table
from guard.dataplane.rulespec import OutputRule
from tests.dataplane.test_pipeline import Guard, response, tensor
from tests.dataplane.test_rules import arrays
from tests.dataplane.test_rules import rules as rule_strategy
from tests.native import native, same_outcome

Array = np.ndarray[Any, Any]


def reference(values: Array, rule: OutputRule) -> OutputResult | None:
    """The numpy reference's result, or ``None`` when the rule does not fit."""
    try:
        return apply_rule(values, rule, label_table(rule.labels), "m", "probs")
    except GuardError:
        return None


def kernel(values: Array, rule: OutputRule, encoding: Encoding = Encoding.TYPED) -> Any:
    """The lane's answer: ``"no lane"``, ``None`` (declined) or (classes, scores,
    entries) and, when it counted values, what it counted and repaired."""
    spec = OutputSpec("probs", rule, label_table(rule.labels), values.shape, values.dtype, encoding)
    lane = native().lane(spec)
    if lane is None or not values.flags.c_contiguous:
        return "no lane"
    return lane.encode(lane.checked(values))


def assert_kernel_agrees(
    values: Array, rule: OutputRule, encoding: Encoding = Encoding.TYPED
) -> Any:
    """Hold the kernel to the reference; returns the kernel's answer."""
    found = kernel(values, rule, encoding)
    expected = reference(values, rule)
    if found == "no lane" or found is None:
        # Declining is always allowed; an output the reference finds something
        # in must be declined.
        return found
    assert expected is not None, "the kernel took an output the reference refuses"
    assert (expected.classes is not None) == rule.derives
    assert_counted_alike(found, expected)
    if rule.activation != "none" and (len(found) == 3 or found[3][0] is None):
        # The tensor is rewritten with the activated values, the reference's bytes.
        spec = OutputSpec("probs", rule, None, values.shape, values.dtype, encoding)
        lane = native().lane(spec)
        assert lane is not None and expected.changed
        np.testing.assert_array_equal(
            np.asarray(lane.checked(values)).ravel().view(np.uint8),
            expected.values.ravel().view(np.uint8),
        )
    classes, scores, entries = found[:3]
    # A threshold's classes are every value's 0/1, a ranking's each row's best;
    # a rule that only checks predicts none (the lane's ranking is not counted).
    if expected.classes is not None:
        np.testing.assert_array_equal(np.frombuffer(classes, np.int64), expected.classes.ravel())
    # The histogram reads each row's best score before repair; with a threshold
    # the reference leaves it to the metrics, which take the row maximum. Equal
    # as values (NaN alike): np.max of 0.0 and -0.0 may give either zero, and
    # the histogram counts both alike.
    best = expected.confidence if expected.confidence is not None else row_max(expected.checked)
    got = np.frombuffer(scores, values.dtype)
    np.testing.assert_array_equal(got, best.ravel())
    written = b"".join(
        encode_output("probs" + d.suffix, d.array, encoding) for d in expected.derived
    )
    assert entries == written
    return found


def assert_counted_alike(found: Any, expected: OutputResult) -> None:
    """What the kernel counted (nothing, when it answers three items) and
    repaired is what the reference counted and repaired, byte for byte."""
    c = expected.counts
    if len(found) == 3:
        assert expected.action == Action.CLEAN and c.total == 0
        return
    repaired, below, above, inf, bad_rows = found[3]
    assert (below, above, inf, bad_rows) == (c.below_min, c.above_max, c.inf, c.bad_rows)
    assert c.nan == 0 and c.total > 0
    if repaired is None:
        assert expected.action == Action.OBSERVED
        return
    assert expected.action == Action.CLAMPED
    assert (
        repaired
        == np.ascontiguousarray(expected.values, "<" + expected.values.dtype.char).tobytes()
    )


def row_max(values: Array) -> Array:
    """Each row's largest value, the straightforward way."""
    c = values.shape[-1] if values.ndim >= 2 else 1
    out: Array = values.reshape(-1, c).max(axis=1)
    return out


def test_the_native_kernels_are_built_by_the_install() -> None:
    # `make test` installs a C compiler first; an install without one still
    # works (the reference alone), but this suite must exercise both.
    assert native().name == "native"


def test_clean_softmax_rows_take_the_native_path() -> None:
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(201), size=8).astype(np.float32)
    rule = OutputRule(check_sum=True, argmax=True, top_k=5)
    found = assert_kernel_agrees(x, rule)
    assert found not in ("no lane", None)
    expected = np.argsort(-x, axis=1, kind="stable")[:, 0]
    np.testing.assert_array_equal(np.frombuffer(found[0], np.int64), expected)


@pytest.mark.parametrize("policy", ["observe", "clamp"])
@pytest.mark.parametrize(
    "x",
    [
        np.array([[0.2], [1.0028], [0.5]], dtype=np.float32),  # seed 001: a sigmoid past 1
        np.random.default_rng(3).dirichlet(np.ones(6), size=4),  # float64 rows, one off its sum
    ],
)
def test_a_rule_that_only_checks_takes_the_native_path(x: Array, policy: str) -> None:
    """No argmax, top-k or threshold: the lane counts and repairs as the
    reference does, writes no derived output, and its scores are the rows'
    largest values (the histogram's); it predicts no class to count."""
    x = x.copy()
    if x.shape[1] > 1:
        x[1] *= 1.01
    rule = OutputRule(valid_range=(0.0, 1.0), check_sum=x.shape[1] > 1, on_violation=policy)  # type: ignore[arg-type]
    found = assert_kernel_agrees(x, rule)
    assert found not in ("no lane", None) and len(found) == 4, "counted by the lane"
    assert found[2] == b""
    result = reference(x, rule)
    assert result is not None and result.classes is None and result.counts.total > 0


#: What the kernel does with one bad value, by on_violation: "counts" (and,
#: with clamp, repairs) or declines (None: the reference decides).
_BAD_VALUES = [
    # value, observe, clamp, reject
    (np.nan, None, None, None),  # rejected by a clamp, ranked first by observe
    (np.inf, None, "counts", None),
    (-np.inf, None, "counts", None),
    (1.5, "counts", "counts", None),
    (-1e-7, "counts", "counts", None),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("bad", "observe", "clamp", "reject"), _BAD_VALUES)
def test_values_out_of_range_are_counted_or_declined_by_policy(
    dtype: Any, bad: float, observe: str | None, clamp: str | None, reject: str | None
) -> None:
    x = np.random.default_rng(1).dirichlet(np.ones(10), size=6).astype(dtype)
    x[2, 7] = bad
    for policy, expected in (("observe", observe), ("clamp", clamp), ("reject", reject)):
        rule = OutputRule(top_k=3, on_violation=policy)  # type: ignore[arg-type]
        found = assert_kernel_agrees(x, rule)
        assert (found is not None and len(found) == 4) == (expected == "counts"), policy
        result = reference(x, rule)
        assert result is not None and result.counts.total == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("policy", ["observe", "clamp", "reject"])
def test_rows_off_their_sum_are_counted_and_renormalised_or_declined_by_policy(
    dtype: Any, policy: Any
) -> None:
    x = np.random.default_rng(1).dirichlet(np.ones(10), size=6)
    x[4] *= 1.01  # the row sums to 1.01
    x[1, 3] = 1.5  # and one value out of range, in a row that sums to more than 1
    x[2] = 0.0  # a row of zeros: it becomes uniform
    x = x.astype(dtype)
    rule = OutputRule(check_sum=True, top_k=3, on_violation=policy)
    found = assert_kernel_agrees(x, rule)
    result = reference(x, rule)
    assert result is not None and result.counts.bad_rows == 3
    if policy == "reject":
        assert found is None  # the reference writes the reason
        return
    assert found is not None and found[3][1:] == (0, 1, 0, 3)
    if policy == "clamp":
        repaired = np.frombuffer(found[3][0], dtype).reshape(x.shape)
        np.testing.assert_array_equal(repaired[[0, 3, 5]], x[[0, 3, 5]])
        np.testing.assert_array_equal(repaired[2], np.full(10, 0.1, dtype))
        np.testing.assert_allclose(repaired.sum(axis=1), 1.0, rtol=1e-6)


@st.composite
def rows_off_their_sum(draw: st.DrawFn) -> Array:
    """Non-negative rows of 1 to 600 classes, each scaled off its sum (or left
    at 1): the pairwise sums of numpy's own, below 8, up to 128 and beyond."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    cols = draw(st.one_of(st.integers(1, 20), st.integers(120, 140), st.integers(250, 600)))
    rows = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.dirichlet(np.full(cols, draw(st.sampled_from([0.05, 1.0, 50.0]))), size=rows)
    scale = rng.choice([1.0, 0.5, 0.97, 1.03, 3.0, 1e-30, 0.0], size=(rows, 1))
    x = x * scale
    if draw(st.booleans()):
        x.flat[rng.integers(0, x.size, size=3)] = draw(st.sampled_from([1.5, 2.0, 1e30]))
    return x.astype(dtype)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows_off_their_sum(), st.sampled_from([1e-6, 1e-3, 0.05]))
def test_rows_off_their_sum_renormalise_to_numpys_bytes(values: Array, tolerance: float) -> None:
    rule = OutputRule(check_sum=True, sum_tolerance=tolerance, top_k=1, on_violation="clamp")
    found = assert_kernel_agrees(values, rule)
    expected = reference(values, rule)
    assert expected is not None
    # Declining is allowed only for a row too close to call: none is drawn here.
    assert found is not None and (len(found) == 4) == (expected.counts.total > 0)


def test_a_clamp_ranks_the_repaired_rows_and_reports_the_peaks_before_it() -> None:
    x = np.array([[0.2, 1.5, 0.3, 1.2], [0.1, 0.7, -0.5, 0.2], [np.inf, 0.1, 0.9, -np.inf]])
    rule = OutputRule(argmax=True, top_k=2, on_violation="clamp")
    for dtype in (np.float32, np.float64):
        values = x.astype(dtype)
        found = assert_kernel_agrees(values, rule)
        assert found is not None and len(found) == 4
        repaired, below, above, inf, bad_rows = found[3]
        assert (below, above, inf, bad_rows) == (1, 2, 2, 0)
        np.testing.assert_array_equal(
            np.frombuffer(repaired, dtype).reshape(3, 4), np.clip(values, 0.0, 1.0)
        )
        # Ties at the bound rank by index: class 1 (1.5 -> 1.0) before class 3.
        np.testing.assert_array_equal(np.frombuffer(found[0], np.int64), [1, 1, 0])
        np.testing.assert_array_equal(np.frombuffer(found[1], dtype), values.max(axis=1))
        assert np.frombuffer(found[1], dtype)[0] == 1.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_at_the_tolerance_agree(dtype: Any) -> None:
    # Rows whose sums sit a few ulps either side of 1 ± tolerance: the native
    # sum is not numpy's pairwise sum, so these must be declined, never differ.
    tolerance = 1e-3
    rule = OutputRule(check_sum=True, sum_tolerance=tolerance, top_k=1)
    for target in (1 - tolerance, 1 + tolerance):
        for ulps in range(-40, 41):
            s = target + ulps * np.spacing(target)
            row = np.full(7, s / 7, dtype=np.float64).astype(dtype)
            assert_kernel_agrees(row[None, :], rule)
            # One value a row: the kernel's column path.
            assert_kernel_agrees(np.full((3, 1), s, dtype=np.float64).astype(dtype), rule)


def test_ties_and_signed_zeros_rank_like_repeated_argmax() -> None:
    x = np.array([[0.0, -0.0, 0.25, 0.25, 0.5, 0.0]], dtype=np.float32)
    rule = OutputRule(valid_range=(-1.0, 1.0), top_k=6, argmax=True)
    assert assert_kernel_agrees(x, rule) not in ("no lane", None)
    result = reference(x, rule)
    assert result is not None
    top = {d.suffix: d.array for d in result.derived}["_top_k_class"]
    np.testing.assert_array_equal(top, [[4, 2, 3, 0, 1, 5]])


def test_a_threshold_rules_best_scores_agree_on_signed_zero_ties() -> None:
    # Found by hypothesis: np.max gave -0.0 for the tie of the second row, the
    # lane the first of the tied values, 0.0. The histogram counts both alike.
    x = np.array([[0.0, 0.0], [0.0, -0.0]], dtype=np.float32)
    rule = OutputRule(threshold=0.5, valid_range=(-100.0, 0.5), on_violation="observe")
    assert assert_kernel_agrees(x, rule) not in ("no lane", None)


def test_non_contiguous_and_other_dtypes_are_left_to_numpy() -> None:
    x = np.random.default_rng(2).dirichlet(np.ones(4), size=6)
    rule = OutputRule(check_sum=True, top_k=2)
    assert kernel(x[:, ::-1], rule) == "no lane"
    assert kernel(x.astype(np.float16), rule) == "no lane"
    assert kernel(x.astype(">f8"), rule) == "no lane"
    assert kernel(np.zeros((6, 40)), OutputRule(top_k=17)) == "no lane"


def _rank_encode(values: Any, itemsize: int, rows: int, cols: int, k: int) -> Any:
    entries = ((b"\x0a\x01a", b"\x08\x09", 0),)
    rank = native().rank_module
    return rank.clean_rank_encode(
        values, itemsize, rows, cols, k, 0.0, 1.0, True, 0.999, 1.001, False, 0x2A, entries
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_values_rank_as_aligned_ones(dtype: Any) -> None:
    # Values read in place from a response sit at any offset of its bytes.
    x = np.random.default_rng(3).dirichlet(np.ones(37), size=5).astype(dtype)
    expected = _rank_encode(x, x.itemsize, 5, 37, 4)
    assert expected is not None
    for shift in range(1, 9):
        misaligned = memoryview(b"\0" * shift + x.tobytes())[shift:]
        assert _rank_encode(misaligned, x.itemsize, 5, 37, 4) == expected


def test_the_kernel_refuses_arguments_that_do_not_describe_the_buffer() -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    for args in [
        (x, 4, 2, 4, 1),  # 8 values described, 6 given
        (x, 8, 2, 3, 1),  # float32 read as float64
        (x, 4, 2, 3, 4),  # k larger than the classes
        (x, 4, 2, 3, -1),
        (x, 4, 2, 3, 0),  # nothing to rank: the reference's case
        (x, 4, 2, 0, 0),
        (x, 2, 3, 2, 1),  # no such item size
    ]:
        with pytest.raises(ValueError, match="do not describe the buffer"):
            _rank_encode(*args)
    big = np.zeros((1, 40), dtype=np.float64)
    with pytest.raises(ValueError):
        _rank_encode(big, 8, 1, 40, native().max_k + 1)


@pytest.mark.parametrize("repair", [-1, 3])
def test_the_kernel_refuses_a_repair_mode_it_does_not_know(repair: int) -> None:
    x = np.full((2, 3), 1 / 3, dtype=np.float32)
    encode = native().rank_module.clean_rank_encode
    entries = ((b"\x0a\x01a", b"\x08\x09", 0),)
    args = (x, 4, 2, 3, 1, 0.0, 1.0, True, 0.999, 1.001, False, 0x2A, entries, None)
    assert encode(*args, 2) is not None
    with pytest.raises(ValueError, match="do not describe the buffer"):
        encode(*args, repair)


def test_the_encoder_refuses_entry_specs_it_cannot_write() -> None:
    x = np.full((2, 3), 1 / 3, dtype=np.float32)
    encode = native().rank_module.clean_rank_encode
    head = (b"\x0a\x01a", b"\x08\x09")
    labels = (b"\x42\x01x", b"\x42\x01y", b"\x42\x01z")
    good = encode(x, 4, 2, 3, 1, 0.0, 1.0, True, 0.999, 1.001, False, 0x2A, ((*head, 2, labels),))
    assert good is not None
    for entries, error in [
        (((*head, 2),), ValueError),  # a label entry without labels
        (((*head, 0, labels),), ValueError),  # labels on a class entry
        (((*head, 2, labels[:2]),), ValueError),  # fewer labels than classes
        (((*head, 2, (b"x", "y", b"z")),), TypeError),  # a label that is not bytes
        (((*head, 8),), ValueError),  # no such kind
        (((*head, 6),), ValueError),  # a threshold class without thresholds
        ([(*head, 0)], TypeError),  # entries must be a tuple
        (((*head, 0),) * 9, ValueError),  # more entries than outputs exist
        ((list((*head, 0)),), TypeError),
    ]:
        with pytest.raises(error):
            encode(x, 4, 2, 3, 1, 0.0, 1.0, True, 0.999, 1.001, False, 0x2A, entries)


@st.composite
def near_clean(draw: st.DrawFn) -> tuple[Array, OutputRule]:
    """Mostly clean softmax-like rows: sums near the tolerance, ties, zeros, and
    now and then values out of range."""
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
    threshold = draw(thresholds(x))
    if threshold is not None and labels is not None:
        labels = ("NO", "YES")  # a threshold labels its 0 and 1
    if draw(st.integers(0, 3)) == 0:
        x = with_bad_values(draw, x)
    rule = OutputRule(
        min_confidence=draw(confidence_floors(x, threshold)),
        abstain_label=draw(st.sampled_from(["unknown", "?"])),
        valid_range=(lo, draw(st.sampled_from([1.0, 0.5]))),
        check_sum=draw(st.booleans()),
        sum_tolerance=tolerance,
        on_violation=draw(st.sampled_from(["observe", "clamp", "reject"])),
        threshold=threshold,
        argmax=threshold is None and draw(st.booleans()),  # the config excludes both
        top_k=top_k,
        labels=labels,
        **draw(activations()),
    )
    return x, rule


@st.composite
def confidence_floors(
    draw: st.DrawFn, x: Array, threshold: float | tuple[float, ...] | None
) -> float | None:
    """No min_confidence (mostly, and always with one threshold per class, which
    the config refuses), a round one, or exactly a value of ``x`` or the
    float64 next to it (a float32 comparison rounds it back to the value)."""
    if (isinstance(threshold, tuple) and len(threshold) > 1) or draw(st.integers(0, 2)):
        return None
    flat = x.ravel()
    value = st.integers(0, flat.size - 1).map(lambda i: float(flat[i]))
    return draw(
        st.one_of(
            st.sampled_from([0.05, 0.3, 0.5, 0.9]),
            value.filter(lambda v: 0.0 < v <= 1.0),
            value.map(lambda v: float(np.nextafter(v, 1.0))).filter(lambda v: 0.0 < v <= 1.0),
        )
    )


#: Values outside some valid range: just past 1.0 in float32 and float64,
#: past 0.5, below 0 and -1, infinite, NaN.
_OUTSIDE = [1.5, float(np.nextafter(np.float32(1.0), np.float32(2.0))), 1.0 + 2**-52, 0.75,
            -0.25, -1.5, -1e-30, np.inf, -np.inf, np.nan]  # fmt: skip


def with_bad_values(draw: st.DrawFn, x: Array) -> Array:
    """``x`` with one to three values (a row's worth, at most) out of range."""
    x = x.copy()
    for _ in range(draw(st.integers(1, 3))):
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from(_OUTSIDE))
    return x


@st.composite
def out_of_range(draw: st.DrawFn) -> tuple[Array, OutputRule]:
    """Rows with values out of range, under a rule that observes or clamps
    them and derives outputs: what the lanes count and repair themselves."""
    x, rule = draw(near_clean())
    rule = dataclasses.replace(
        rule,
        activation="none",
        temperature=None,
        platt=None,
        on_violation=draw(st.sampled_from(["observe", "clamp"])),
        check_sum=rule.check_sum and draw(st.booleans()),
        argmax=rule.argmax or (rule.threshold is None and not rule.top_k),
    )
    return with_bad_values(draw, x), rule


@st.composite
def thresholds(draw: st.DrawFn, x: Array) -> float | tuple[float, ...] | None:
    """No threshold (mostly), one, or one per class; often exactly a value of
    ``x`` (a value at its threshold is class 0), or the float64 nearest a
    float32 value (only a float64 comparison tells them apart)."""
    kind = draw(st.sampled_from(["none", "none", "one", "per_class"]))
    if kind == "none":
        return None
    flat = x.ravel()
    picks = st.one_of(
        st.sampled_from([0.5, 0.0, 0.1, 0.3, 1.0]),
        st.integers(0, flat.size - 1).map(lambda i: float(flat[i])),
        # Just below a value in float64: a float32 comparison would round it up to the value.
        st.integers(0, flat.size - 1).map(lambda i: float(np.nextafter(float(flat[i]), -1.0))),
    )
    if kind == "one":
        return draw(picks)
    return tuple(draw(st.lists(picks, min_size=x.shape[-1], max_size=x.shape[-1])))


@st.composite
def activations(draw: st.DrawFn) -> dict[str, Any]:
    """No activation (mostly), or sigmoid / softmax with temperature or Platt
    scaling: those always take the reference (they rewrite the tensor)."""
    activation = draw(st.sampled_from(["none", "none", "none", "sigmoid", "softmax"]))
    if activation == "none":
        return {}
    scaling = draw(st.sampled_from(["none", "temperature"] + ["platt"] * (activation == "sigmoid")))
    if scaling == "temperature":
        return {"activation": activation, "temperature": draw(st.sampled_from([0.5, 2.0]))}
    if scaling == "platt":
        return {"activation": activation, "platt": (draw(st.sampled_from([1.5, -2.0])), 0.25)}
    return {"activation": activation}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_clean())
def test_near_clean_outputs_agree_with_numpy(case: tuple[Array, OutputRule]) -> None:
    values, rule = case
    for encoding in Encoding:
        assert_kernel_agrees(values, rule, encoding)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(out_of_range())
def test_values_out_of_range_are_counted_and_repaired_as_numpy_does(
    case: tuple[Array, OutputRule],
) -> None:
    values, rule = case
    for encoding in Encoding:
        assert_kernel_agrees(values, rule, encoding)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_output_and_rule_agree_with_numpy(data: st.DataObject) -> None:
    values = data.draw(arrays())
    classes = values.shape[-1] if values.ndim >= 2 else 1
    rule = data.draw(rule_strategy(classes, values.ndim))
    assert_kernel_agrees(values, rule)


# ------------------------------------------------------ the pipeline's native route


@st.composite
def rule_configs(draw: st.DrawFn) -> tuple[dict[str, Any], Array]:
    """A config rule for output ``probs``, and its values: mostly clean, or
    with values out of range."""
    values, rule = draw(st.one_of(near_clean(), out_of_range()))
    output: dict[str, Any] = {"name": "probs", "argmax": rule.argmax, "top_k": rule.top_k}
    output |= {"check_sum": rule.check_sum, "sum_tolerance": rule.sum_tolerance}
    output |= {"valid_range": list(rule.valid_range), "on_violation": rule.on_violation}
    output["activation"] = rule.activation
    if rule.temperature is not None:
        output["temperature"] = rule.temperature
    if rule.platt is not None:
        output["platt"] = list(rule.platt)
    if rule.threshold is not None:
        threshold = rule.threshold
        output["threshold"] = list(threshold) if isinstance(threshold, tuple) else threshold
    if rule.check_sum and rule.on_violation == "clamp":
        output["valid_range"] = [0.0, 1.0]  # the config refuses less (renormalising needs 1)
    if rule.labels is not None and rule.derives:
        output["labels"] = list(rule.labels)
    if (rule.argmax or rule.top_k or rule.threshold is not None) and draw(st.booleans()):
        # Abstaining rows, or values with a threshold (one threshold only).
        if not isinstance(rule.threshold, tuple) or len(rule.threshold) == 1:
            output["min_confidence"] = draw(st.sampled_from([0.05, 0.3, 0.9]))
    return output, values


@st.composite
def guarded_cases(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A config rule and a response of mostly clean outputs, or of outputs with
    values out of range, in any encoding."""
    output, values = draw(rule_configs())
    encoding = draw(st.sampled_from([Encoding.TYPED, Encoding.CONTENT]))
    outputs = {"probs": tensor(values, encoding, values.dtype.type)}
    if draw(st.booleans()):  # a second guarded output, and one left alone
        outputs["zeta"] = tensor(values[..., ::-1], encoding, values.dtype.type)
        outputs["other"] = tensor([1.5], encoding)
        output["name"] = "*"
    return output, response(outputs)


def run_pipeline(output: dict[str, Any], body: bytes, kernels: Any = None) -> tuple[Any, bytes]:
    guard = Guard([{"name": "wide_deep", "outputs": [output]}], kernels)
    guarded: Any
    try:
        guarded = guard(body)
    except GuardError as exc:
        guarded = (type(exc), exc.details)
    # _created timestamps differ between two registries; everything else must not.
    exposition = generate_latest(guard.registry).splitlines()
    return guarded, b"\n".join(line for line in exposition if b"_created" not in line)


_CLAMPED_AMONG_THREE = (  # found by hypothesis: protobuf writes the maps in its own order
    {"name": "*", "valid_range": [0.0, 1.0], "on_violation": "clamp"},
    b"\n\x17\n\x05other\x12\x0e\x08\x01\x12\x04\x12\x02\x08\x01*\x04\x00\x00\xc0?"
    b"\n\x1b\n\x05probs\x12\x12\x08\x01\x12\x08\x12\x02\x08\x01\x12\x02\x08\x01*\x04\xe7\xff\x7f?"
    b"\n\x1a\n\x04zeta\x12\x12\x08\x01\x12\x08\x12\x02\x08\x01\x12\x02\x08\x01*\x04\xe7\xff\x7f?"
    b"\x12 \n\twide_deep\x12\x02\x08\x03\x1a\x0fserving_default",
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(guarded_cases())
@example(_CLAMPED_AMONG_THREE)
def test_the_native_route_writes_the_bytes_and_metrics_of_the_reference(
    case: tuple[dict[str, Any], bytes],
) -> None:
    output, body = case
    fast, fast_metrics = run_pipeline(output, body, native())
    general, general_metrics = run_pipeline(output, body, REFERENCE)
    assert same_outcome(_outcome(fast), _outcome(general))
    assert fast_metrics == general_metrics


@pytest.mark.parametrize("policy", ["observe", "clamp"])
def test_a_rule_that_only_checks_is_decided_natively_as_the_reference_decides(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 001's WideDeep output at 1.0028 under a range rule alone: the
    native route's bytes and metrics are the reference's, and after the
    first response (which plans the layout) numpy decides nothing."""
    output = {"name": "probs", "valid_range": [0.0, 1.0], "on_violation": policy}
    body = response({"probs": tensor(np.array([[0.2], [1.0028], [0.5]], np.float32))})
    fast, fast_metrics = run_pipeline(output, body, native())
    general, general_metrics = run_pipeline(output, body, REFERENCE)
    assert same_outcome(_outcome(fast), _outcome(general))
    assert fast_metrics == general_metrics
    assert b"\nguard_predicted_class_total{" not in fast_metrics

    guard = Guard([{"name": "wide_deep", "outputs": [output]}], native())
    guard(body)  # plans the layout
    decided: list[str] = []

    def counted(*args: Any) -> OutputResult:
        decided.append("numpy")
        return apply_rule(*args)

    monkeypatch.setattr("guard.dataplane.evaluate.apply_rule", counted)
    assert _outcome(guard(body)) == _outcome(fast)
    assert decided == [], "numpy decided a response the lane takes"


def _outcome(guarded: Any) -> Any:
    if isinstance(guarded, pipeline.GuardedResponse):
        return guarded.body, guarded.action, guarded.violations
    return guarded


def test_fast_lane_outputs_read_back_with_the_official_classes() -> None:
    x = np.random.default_rng(5).dirichlet(np.ones(201), size=8).astype(np.float32)
    labels = [f"class-{i}" for i in range(201)]
    rule = {"name": "probs", "check_sum": True, "argmax": True, "top_k": 5, "labels": labels}
    guard = Guard([{"name": "wide_deep", "outputs": [rule]}])
    book_rules = guard.book.for_signature("wide_deep", "serving_default")
    assert book_rules is not None
    guarded = guard(response({"probs": tensor(x)}))
    assert guarded is not None and guarded.action == Action.CLEAN
    compiled = book_rules.rule_for("probs")
    assert compiled is not None
    lane = book_rules.lane("probs", compiled, x, Encoding.TYPED)
    assert lane is not None and lane.encode(x) is not None  # the lane, not numpy, decided
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


# ------------------------------------------------------------------ thresholds


def fired(values: Array, threshold: float | tuple[float, ...]) -> Array:
    """Each value's 0/1 class, the straightforward way: compared in float64."""
    out: Array = (values.astype(np.float64) > np.asarray(threshold, np.float64)).astype(np.int64)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize(
    ("shape", "rule"),
    [
        ((8, 1), OutputRule(threshold=0.5, labels=("negative", "positive"))),
        ((1024, 1), OutputRule(threshold=0.5)),
        ((5,), OutputRule(threshold=(0.5,), labels=("NO", "YES"))),
        ((6, 3), OutputRule(threshold=(0.2, 0.5, 0.9), labels=("NO", "YES"))),
        ((2, 2, 4), OutputRule(threshold=0.25, top_k=2)),
        ((4, 2), OutputRule(threshold=0.3, top_k=2, labels=("NO", "YES"))),
    ],
)
def test_clean_threshold_rules_take_the_native_path(
    dtype: Any, encoding: Encoding, shape: tuple[int, ...], rule: OutputRule
) -> None:
    x = np.random.default_rng(6).uniform(0, 1, shape).astype(dtype)
    found = assert_kernel_agrees(x, rule, encoding)
    assert found not in ("no lane", None)
    assert rule.threshold is not None
    np.testing.assert_array_equal(
        np.frombuffer(found[0], np.int64), fired(x, rule.threshold).ravel()
    )


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        # float32(0.1) is 0.100000001...: above the float64 threshold 0.1. A
        # comparison in float32 would call it equal, class 0.
        (np.float32, [[0, 1, 0, 1]]),
        (np.float64, [[0, 0, 0, 1]]),
    ],
)
def test_a_value_at_its_threshold_is_class_0_compared_in_float64(
    dtype: Any, expected: list[list[int]]
) -> None:
    x = np.array([[0.5, 0.1, 0.0, 1.0]], dtype=dtype)
    rule = OutputRule(threshold=(0.5, 0.1, 0.0, 0.5), valid_range=(0.0, 1.0))
    for encoding in Encoding:
        found = assert_kernel_agrees(x, rule, encoding)
        assert found not in ("no lane", None)
        np.testing.assert_array_equal(np.frombuffer(found[0], np.int64), np.ravel(expected))
    np.testing.assert_array_equal(fired(x, rule.threshold or 0.0), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("bad", "observe", "clamp", "reject"), _BAD_VALUES)
def test_a_threshold_rule_counts_or_declines_by_policy(
    dtype: Any, bad: float, observe: str | None, clamp: str | None, reject: str | None
) -> None:
    x = np.full((4, 1), 0.5, dtype=dtype)
    x[2, 0] = bad
    for policy, expected in (("observe", observe), ("clamp", clamp), ("reject", reject)):
        rule = OutputRule(threshold=0.5, labels=("NO", "YES"), on_violation=policy)  # type: ignore[arg-type]
        found = assert_kernel_agrees(x, rule)
        assert (found is not None and len(found) == 4) == (expected == "counts"), policy
        result = reference(x, rule)
        assert result is not None and result.counts.total == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_clamp_with_min_confidence_abstains_on_the_repaired_values(dtype: Any) -> None:
    x = np.array([[0.2, 1.5, 0.3], [0.4, 0.35, 0.25], [0.1, 0.2, 0.7]], dtype=dtype)
    labels = ("a", "b", "c")
    for rule in (
        OutputRule(argmax=True, top_k=2, on_violation="clamp", min_confidence=0.5, labels=labels),
        OutputRule(argmax=True, on_violation="observe", min_confidence=0.5, abstain_label="?"),
    ):
        found = assert_kernel_agrees(x, rule)
        assert found not in ("no lane", None) and len(found) == 4
        np.testing.assert_array_equal(np.frombuffer(found[0], np.int64), [1, -1, 2])


@pytest.mark.parametrize(
    "rule",
    [
        OutputRule(activation="sigmoid", threshold=0.5),
        OutputRule(activation="sigmoid", threshold=0.5, platt=(1.5, -0.25)),
        OutputRule(activation="sigmoid", temperature=2.0, top_k=1),
        OutputRule(activation="softmax", argmax=True),
        OutputRule(activation="softmax", temperature=0.5, top_k=2, check_sum=True),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activated_outputs_take_the_lane_with_numpys_activated_bytes(
    rule: OutputRule, dtype: Any
) -> None:
    x = np.random.default_rng(4).normal(0, 3, (16, 3)).astype(dtype)
    found = assert_kernel_agrees(x, rule)
    assert found not in ("no lane", None)
    spec = OutputSpec("probs", rule, None, x.shape, x.dtype, Encoding.TYPED)
    lane = native().lane(spec)
    assert lane is not None
    result = reference(x, rule)
    assert result is not None and result.changed
    assert np.asarray(lane.checked(x)).tobytes() == result.values.tobytes()


@pytest.mark.parametrize(
    "rule",
    [
        OutputRule(threshold=(0.5, 0.5)),  # two thresholds, three classes
        OutputRule(threshold=(0.5,)),  # one threshold in a list, three classes
        OutputRule(threshold=0.5, top_k=1, labels=("NO", "YES")),  # top-k labels 3 classes
        OutputRule(threshold=0.5, labels=("only",)),  # no label for a 1
    ],
)
def test_rules_left_to_the_reference_have_no_lane(rule: OutputRule) -> None:
    x = np.full((4, 3), 0.25, dtype=np.float32)
    assert kernel(x, rule) == "no lane"
    assert kernel(np.array(0.25, dtype=np.float32), OutputRule(threshold=0.5)) == "no lane"


HUGE_LOGITS = {
    np.float32: [[3e38, -3e38, 0.0], [1e30, 1e30, -np.inf], [88.8, -104.0, 0.5]],
    np.float64: [[1e308, -1e308, 0.0], [1e300, 1e300, -np.inf], [709.8, -746.0, 0.5]],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "output",
    [
        {"activation": "softmax", "argmax": True, "check_sum": True, "labels": ["a", "b", "c"]},
        {"activation": "softmax", "temperature": 0.5, "top_k": 2},
        {"activation": "sigmoid", "threshold": 0.5, "labels": ["NO", "YES"]},
        {"activation": "sigmoid", "platt": [2.0, -1.0], "threshold": [0.2, 0.5, 0.9]},
    ],
)
def test_activations_on_huge_logits_agree_on_both_routes(
    dtype: Any, output: dict[str, Any]
) -> None:
    body = response({"probs": tensor(HUGE_LOGITS[dtype], Encoding.CONTENT, dtype)})
    output = {"name": "probs", "on_violation": "observe", **output}
    fast, fast_metrics = run_pipeline(output, body, native())
    general, general_metrics = run_pipeline(output, body, REFERENCE)
    assert fast == general
    assert fast_metrics == general_metrics


def test_a_binary_threshold_reads_back_with_the_official_classes() -> None:
    # binary_mlp's rule (examples/guard.yaml), on the native lane.
    x = np.random.default_rng(7).uniform(0, 1, (8, 1)).astype(np.float32)
    x[3, 0] = 0.5  # at the threshold: class 0
    rule = {"name": "probability", "threshold": 0.5, "labels": ["negative", "positive"]}
    guard = Guard([{"name": "wide_deep", "outputs": [rule]}])
    book_rules = guard.book.for_signature("wide_deep", "serving_default")
    compiled = book_rules.rule_for("probability") if book_rules else None
    assert book_rules is not None and compiled is not None
    lane = book_rules.lane("probability", compiled, x, Encoding.TYPED)
    assert lane is not None and lane.encode(x) is not None  # the lane, not numpy, decided
    guarded = guard(response({"probability": tensor(x)}))
    assert guarded is not None and guarded.action == Action.CLEAN
    back = predict_pb2.PredictResponse.FromString(guarded.body)
    expected = (x.astype(np.float64) > 0.5).astype(np.int64)
    assert expected[3, 0] == 0
    np.testing.assert_array_equal(tf.make_ndarray(back.outputs["probability_class"]), expected)
    names = np.array([b"negative", b"positive"], dtype=object)[expected]
    assert tf.make_ndarray(back.outputs["probability_label"]).tolist() == names.tolist()
    np.testing.assert_array_equal(tf.make_ndarray(back.outputs["probability"]), x)


@pytest.mark.parametrize("encoding", [Encoding.TYPED, Encoding.CONTENT])
@pytest.mark.parametrize(
    ("classes", "output"),
    [
        (1, {"threshold": 0.5, "labels": ["negative", "positive"]}),
        (3, {"threshold": [0.2, 0.5, 0.9], "labels": ["NO", "YES"]}),
        (3, {"threshold": 0.4, "top_k": 2, "check_sum": True}),
    ],
)
def test_threshold_metrics_match_the_reference(
    encoding: Encoding, classes: int, output: dict[str, Any]
) -> None:
    # Multi-label outputs count each class that fired; binary ones their label.
    rng = np.random.default_rng(8)
    x = rng.uniform(0, 1, (16, 1)) if classes == 1 else rng.dirichlet(np.ones(classes), 16)
    body = response({"probs": tensor(x, encoding, np.float64)})
    output = {"name": "probs", **output}
    fast, fast_metrics = run_pipeline(output, body, native())
    general, general_metrics = run_pipeline(output, body, REFERENCE)
    assert fast == general and fast.action == Action.CLEAN
    assert fast_metrics == general_metrics
    assert b"guard_predicted_class_total{" in fast_metrics


@pytest.mark.parametrize(
    "output",
    [
        {"name": "p", "threshold": 0.5, "labels": ["negative", "positive"]},
        {"name": "p", "argmax": True, "labels": ["only"]},
    ],
)
def test_derived_outputs_that_could_pass_the_limit_are_refused_on_both_routes(
    output: dict[str, Any],
) -> None:
    # The reference refuses by its bound on the derived outputs (40 bytes a
    # value here) before making them; the lane's would fit (375 KB of 1 MiB).
    x = np.random.default_rng(9).uniform(0, 1, (25_000, 1)).astype(np.float32)
    body = response({"p": tensor(x)})
    for kernels in (native(), REFERENCE):
        guard = Guard([{"name": "wide_deep", "outputs": [output]}], kernels, max_message_mb=1)
        with pytest.raises(ResponseTooLargeError):
            guard(body)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("min_confidence", "abstains"),
    # Whether any value abstains, in float32 and in float64.
    [(0.6, (False, False)), (0.7, (False, False)), (0.8, (True, True)),
     (float(np.nextafter(0.7, 1.0)), (False, True))],
)  # fmt: skip
def test_a_threshold_abstains_alike_on_the_native_route(
    dtype: Any,
    min_confidence: float,
    abstains: tuple[bool, bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Predictions 0.9, 0.7 (1 - 0.3), 0.75 and 0.7. In float32, 1 - 0.3 is
    # 0.69999999 and min_confidence compares as a float32 too (a Python float
    # is weak in numpy 2): the float64 just past 0.7 does not abstain there.
    x = np.array([[0.9], [0.3], [0.75], [0.3]], dtype=dtype)
    expected_unsure = ~(np.where(x > 0.5, x, 1.0 - x) >= min_confidence)
    body = response({"p": tensor(x, Encoding.CONTENT, dtype)})
    output = {"name": "p", "threshold": 0.5, "labels": ["NO", "YES"]}
    output["min_confidence"] = min_confidence
    routes: list[str] = []
    reference_route = pipeline._reference

    def counted(*args: Any) -> Any:
        routes.append("reference")
        return reference_route(*args)

    monkeypatch.setattr(pipeline, "_reference", counted)
    fast, fast_metrics = run_pipeline(output, body, native())
    took_reference = bool(routes)
    general, general_metrics = run_pipeline(output, body, REFERENCE)
    assert fast == general and fast_metrics == general_metrics
    assert not took_reference
    assert bool(expected_unsure.any()) == abstains[dtype == np.float64]
    assert (b"guard_abstentions_total{" in fast_metrics) == bool(expected_unsure.any())
