"""What the lanes and their cache hold is bounded, whatever shapes the upstream declares.

TF's fill convention lets a TensorProto of one value declare any shape: a
60-byte answer can claim [1, 16,000,000]. One threshold used to become a
float64 table as wide as the classes, kept with the lane in the rule book's
cache (128 MB per such answer, a different width each time), even for
answers refused as too large. Now one threshold stays one number, a lane is
made only for values that lie in the bytes and whose derived outputs fit,
and the cache of lanes is bounded in bytes as well as entries.
"""

from __future__ import annotations

import gc
import hashlib
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from tensorflow.core.framework import tensor_pb2, types_pb2

from guard.dataplane import book as book_module
from guard.dataplane.cache import BoundedCache
from guard.dataplane.codec.tensor import Encoding
from guard.dataplane.errors import GuardError
from guard.dataplane.lanes import OutputSpec
from guard.dataplane.rules import label_table
from guard.dataplane.rulespec import OutputRule
from tests.dataplane.test_pipeline import CONTENT, Guard, response, tensor
from tests.native import REFERENCE, native

MB = 1 << 20


def filled(width: int, value: float) -> tensor_pb2.TensorProto:
    """A float32 [1, width] in TF's fill convention: one value stands for all."""
    t = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    t.tensor_shape.dim.add(size=1)
    t.tensor_shape.dim.add(size=width)
    t.float_val.append(value)
    return t


def outcome(guard: Guard, body: bytes) -> tuple[Any, ...]:
    """What ``guard`` made of ``body``, small enough to keep: the guarded
    body's digest, action and violations, or the error."""
    try:
        found = guard(body)
    except GuardError as exc:
        return (type(exc).__name__, str(exc))
    assert found is not None
    return (hashlib.sha256(found.body).hexdigest(), found.action, found.violations)


def held_after(run: Callable[[], object]) -> int:
    """The bytes still allocated (tracemalloc) once ``run`` is done, its
    result included."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = run()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del kept
    return held


def test_fill_convention_answers_under_one_threshold_leave_little_held() -> None:
    # The red team's attack, in process: twenty 40-byte answers, each
    # declaring [1, ~1e6] (a different width each time) under `threshold: 0.5`.
    # Before: each left an 8 MB table in the lane cache, 153 MB in all.
    models = [{"name": "m", "outputs": [{"name": "p", "threshold": 0.5}]}]
    guard = Guard(models, native())
    judge = Guard(models, REFERENCE)
    bodies = [
        response({"p": filled(1_000_000 - i, 0.7 if i % 2 else 0.25)}, model="m") for i in range(20)
    ]
    expected = [outcome(judge, body) for body in bodies]
    guard(response({"p": tensor([[0.2, 0.9]])}, model="m"))  # first-use allocations

    found: list[tuple[Any, ...]] = []
    held = held_after(lambda: found.extend(outcome(guard, body) for body in bodies))

    assert found == expected
    assert all(len(o) == 3 for o in found)  # guarded, not refused, at this width
    assert held < 16 * MB, f"{held / MB:.1f} MB held after 20 answers"


def test_plans_keep_no_more_lanes_than_their_byte_bound() -> None:
    # Found (red team): the lane cache let its lanes go at 4 MiB, but the
    # plans kept each one: 210 shapes of one 20,000-class per-class
    # threshold (an upstream's, or a client's batch sizes) held 31 MB, and
    # 4096 would have held 640 MB. Plans are weighed by their lanes now.
    classes = 20_000
    models = [{"name": "m", "outputs": [{"name": "p", "threshold": [0.5] * classes}]}]
    guard = Guard(models, native())
    values = np.full(2 * classes, 0.25, np.float32)

    # 210 ways to lay out [2, classes] among up to 19 dimensions of 1.
    shapes = [[1] * i + [2] + [1] * (r - i) + [classes] for r in range(20) for i in range(r + 1)]
    bodies = (response({"p": tensor(values.reshape(s), CONTENT)}, model="m") for s in shapes)
    held = held_after(lambda: [outcome(guard, body)[1] for body in bodies])
    assert held < 24 * MB, f"{held / MB:.1f} MB held after 210 shapes"
    assert guard.book.plans.value_bytes <= 16 * MB


def test_fill_convention_answers_refused_as_too_large_make_no_lane() -> None:
    # Declaring more classes than the derived outputs may take: refused, as
    # before, and nothing is kept for them.
    models = [{"name": "m", "outputs": [{"name": "p", "threshold": 0.5}]}]
    guard = Guard(models, native(), max_message_mb=4)
    bodies = [response({"p": filled(600_000 - i, 0.0)}, model="m") for i in range(5)]
    found: list[tuple[Any, ...]] = []
    held = held_after(lambda: found.extend(outcome(guard, body) for body in bodies))
    assert {o[0] for o in found} == {"ResponseTooLargeError"}
    assert held < 2 * MB, f"{held / MB:.1f} MB held after 5 refused answers"
    rules = guard.book.for_signature("m", "serving_default")
    assert rules is not None and len(rules._lanes) == 0


def test_an_error_kept_after_a_refusal_does_not_keep_the_decoded_values() -> None:
    # The server's handling keeps a refusal's error in a reference cycle until
    # a full collection (which the guard holds off); its frames held the 64 MB
    # of values a 60-byte answer had declared, one more set each answer.
    models = [{"name": "m", "outputs": [{"name": "p", "threshold": 0.5}]}]
    guard = Guard(models, native())
    kept: list[GuardError] = []

    def refuse() -> None:
        for i in range(3):
            try:
                guard(response({"p": filled(16_000_000 - i, 0.0)}, model="m"))
            except GuardError as exc:
                kept.append(exc)

    held = held_after(refuse)
    assert len(kept) == 3 and all("max_message_mb" in str(e) for e in kept)
    assert held < 2 * MB, f"{held / MB:.1f} MB held by 3 errors"  # before: 549 MB


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_threshold_lane_holds_no_table_as_wide_as_the_classes(dtype: Any) -> None:
    rule = OutputRule(name="p", threshold=0.5)
    shape = (1, 4_000_000)
    spec = OutputSpec("p", rule, None, shape, np.dtype(dtype), Encoding.TYPED)
    lanes: list[Any] = []
    held = held_after(lambda: lanes.append(native().lane(spec)))
    (lane,) = lanes
    assert lane is not None
    assert held < 256 * 1024, f"{held / MB:.1f} MB held by one lane"  # before: 32 MB
    assert lane.held < 4096


@pytest.mark.parametrize(
    "threshold", [0.5, 0.25, float(np.float32(0.3)), float(np.nextafter(0.7, 1.0))]
)
@pytest.mark.parametrize("encoding", [Encoding.TYPED, Encoding.CONTENT])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_threshold_taken_as_a_number_agrees_with_the_reference(
    threshold: float, encoding: Encoding, dtype: Any
) -> None:
    # Values right at the threshold and one float32 step either side: the
    # kernel compares in float64 against the number, as numpy does.
    rng = np.random.default_rng(7)
    x = rng.random((6, 50)).astype(dtype)
    near = np.float32(threshold) if dtype == np.float32 else np.float64(threshold)
    x[0, :3] = [near, np.nextafter(near, dtype(0)), np.nextafter(near, dtype(1))]
    models = [
        {"name": "m", "outputs": [{"name": "p", "threshold": threshold, "labels": ["n", "y"]}]}
    ]
    guard, judge = Guard(models, native()), Guard(models, REFERENCE)
    body = response({"p": tensor(x, encoding, dtype)}, model="m")
    assert outcome(guard, body) == outcome(judge, body)
    rules = guard.book.for_signature("m", "serving_default")
    assert rules is not None
    compiled = rules.rule_for("p")
    assert compiled is not None
    lane = rules.lane("p", compiled, x, encoding)
    assert lane is not None and lane.encode(x) is not None  # the lane, not numpy, decided


def test_per_class_thresholds_still_take_the_lane_and_weigh_their_table() -> None:
    thresholds = [0.1, 0.5, 0.9]
    models = [{"name": "m", "outputs": [{"name": "p", "threshold": thresholds}]}]
    guard, judge = Guard(models, native()), Guard(models, REFERENCE)
    x = np.array([[0.05, 0.5, 0.95], [0.2, 0.4, 0.4], [0.1, 0.6, 0.3]], np.float32)
    body = response({"p": tensor(x)}, model="m")
    assert outcome(guard, body) == outcome(judge, body)
    rules = guard.book.for_signature("m", "serving_default")
    assert rules is not None
    compiled = rules.rule_for("p")
    assert compiled is not None
    lane = rules.lane("p", compiled, x, Encoding.TYPED)
    assert lane is not None and lane.encode(x) is not None
    assert lane.held >= 3 * 8
    # A tuple that does not fit the classes is the reference's to refuse.
    wrong = response({"p": tensor(np.full((2, 4), 0.25))}, model="m")
    assert outcome(guard, wrong) == outcome(judge, wrong)
    assert outcome(guard, wrong)[0].endswith("Error")


def test_the_lane_cache_is_bounded_in_bytes() -> None:
    # One threshold per class of 20,000 classes, and a lane per batch size the
    # upstream answers with: 256 lanes held 41 MB before; now the cache holds
    # at most its byte budget.
    c = 20_000
    thresholds = np.linspace(0.1, 0.9, c).tolist()
    guard = Guard([{"name": "m", "outputs": [{"name": "p", "threshold": thresholds}]}], native())
    rules = guard.book.for_signature("m", "serving_default")
    assert rules is not None
    compiled = rules.rule_for("p")
    assert compiled is not None
    shapes = [(batch, c) for batch in range(1, 257)]

    def make_lanes() -> None:
        for shape in shapes:
            values = np.broadcast_to(np.float32(0.5), shape)
            assert rules.lane("p", compiled, values, Encoding.TYPED) is not None

    held = held_after(make_lanes)
    budget = book_module._LANES_MAX_BYTES
    assert 0 < rules._lanes.value_bytes <= budget
    assert held < budget + 2 * MB, f"{held / MB:.1f} MB held by the lanes"


def test_lanes_of_one_label_table_share_its_encoded_fields() -> None:
    # A lane per batch size used to encode every label again.
    c = 20_000
    labels = [f"class-{i}" for i in range(c)]
    rule = OutputRule(name="p", argmax=True, labels=tuple(labels))
    table = label_table(rule.labels)
    specs = [
        OutputSpec("p", rule, table, (batch, c), np.dtype(np.float32), Encoding.TYPED)
        for batch in range(1, 33)
    ]
    native().lane(specs[0])  # the fields, made once
    lanes: list[Any] = []
    held = held_after(lambda: lanes.extend(native().lane(spec) for spec in specs))
    assert all(lane is not None for lane in lanes)
    assert held < 2 * MB, f"{held / MB:.1f} MB held by 32 lanes"  # before: 50 MB


# ------------------------------------------------------------- BoundedCache's weights


def weighed(max_entries: int = 100, max_value_bytes: int = 100) -> BoundedCache[str, bytes]:
    return BoundedCache(max_entries, max_value_bytes=max_value_bytes, weigh_value=len)


def test_a_weighed_cache_is_cleared_when_the_next_value_would_pass_its_budget() -> None:
    cache = weighed()
    cache.put("a", b"x" * 40)
    cache.put("b", b"x" * 40)
    assert len(cache) == 2 and cache.value_bytes == 80
    cache.put("c", b"x" * 30)  # 110 > 100: cleared first, as when full
    assert len(cache) == 1 and cache.get("c") == b"x" * 30 and cache.value_bytes == 30


def test_a_weighed_cache_never_stores_a_value_over_its_budget() -> None:
    cache = weighed()
    cache.put("a", b"x" * 10)
    assert cache.get_or_make("big", lambda: b"x" * 101) == b"x" * 101
    assert cache.get("big") is None and cache.get("a") == b"x" * 10
    cache.put("a", b"x" * 101)  # a replacement too heavy drops the old value too
    assert cache.get("a") is None and cache.value_bytes == 0


def test_a_weighed_cache_replacing_a_value_counts_only_the_new_one() -> None:
    cache = weighed()
    cache.put("a", b"x" * 60)
    cache.put("a", b"x" * 70)
    assert cache.value_bytes == 70 and len(cache) == 1
    cache.put("b", b"x" * 30)
    assert cache.value_bytes == 100 and len(cache) == 2


def test_a_weighed_cache_still_counts_entries() -> None:
    cache = weighed(max_entries=2, max_value_bytes=1000)
    for key in "abc":
        cache.put(key, b"x")
    assert len(cache) == 1 and cache.get("c") == b"x" and cache.value_bytes == 1
    cache.clear()
    assert len(cache) == 0 and cache.value_bytes == 0


def test_a_weighed_cache_wants_both_settings() -> None:
    with pytest.raises(ValueError, match="together"):
        BoundedCache(10, max_value_bytes=10)
    with pytest.raises(ValueError, match="together"):
        BoundedCache[str, bytes](10, weigh_value=len)


def test_label_tables_are_made_once_per_book_not_per_signature() -> None:
    """Each resolved signature compiled its rules again: a '*' signature rule
    with 100,000 labels made a 5 MB table for every signature name answered,
    up to 4,096 of them. Rules sharing one labels tuple (one labels_file named
    twice) share one table too."""
    import tracemalloc

    from guard.dataplane.book import RuleBook
    from guard.dataplane.rulespec import ModelRule, OutputRule

    labels = tuple(f"class-{i}" for i in range(100_000))
    rules = (OutputRule(name="p", argmax=True, labels=labels),
             OutputRule(name="q", argmax=True, labels=labels))  # fmt: skip
    book = RuleBook([ModelRule(name="m", signature="*", outputs=rules)], 64 << 20)
    tracemalloc.start()
    try:
        found = [book.for_signature("m", f"sig-{i}") for i in range(40)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 16 * 1024 * 1024, f"{held} bytes for 40 signatures"
    tables = {id(s.rule_for(name).labels) for s in found if s for name in ("p", "q")}  # type: ignore[union-attr]
    assert len(tables) == 1
