"""One output's share of a native plan: its lane, its metric series, and how
to count what the lane decided.

A plan is made once per response layout from the reference route's own
decisions, so that a response the lanes decide costs the native calls and
little else. The gRPC pipeline (:mod:`guard.dataplane.pipeline`) and the REST
front-end (:mod:`guard.server.rest.plan`) make their plans of these parts;
what each output counts is the reference's count, as the tests check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from guard.dataplane.book import CompiledRule
from guard.dataplane.codec.tensor import Encoding
from guard.dataplane.dtypes import INT64
from guard.dataplane.evaluate import Target
from guard.dataplane.lanes import Buffer, Counted, Lane, LaneResult
from guard.dataplane.results import CLAMPED, CLEAN, OBSERVED, Action, Array, Counts
from guard.dataplane.rules import class_axis_size
from guard.dataplane.rulespec import OutputRule
from guard.dataplane.sink import Counter, LabelTable, MetricsSink, OutputSink

__all__ = ["ActionCounters", "LaneOutput", "lane_output"]


@dataclass(frozen=True, slots=True)
class LaneOutput:
    """One output a lane decides, with what counting its verdict needs."""

    name: str
    lane: Lane
    size: int
    sink: OutputSink
    labels: LabelTable | None
    rule: OutputRule
    entropy_shape: tuple[int, int] | None
    """[rows, classes] when the rule tracks entropy, else ``None``."""
    derived: int
    """The reference's bound on what the derived outputs take (rules.derived_bytes)."""
    plain: bool
    """A verdict with nothing out of range has only classes and scores to
    count: no abstention, entropy, drift or multi-label rule."""
    predicts: bool
    """Whether the rule derives outputs, and so predicts classes the metrics
    count; one that only checks the values counts none (as the reference)."""

    def classes(self, found: bytes) -> Array:
        """The lane's classes: a row's best, or [rows, classes] of a threshold's
        0/1; none where the rule predicts nothing."""
        classes = np.frombuffer(found if self.predicts else b"", INT64)
        if self.lane.multi_label:
            return classes.reshape(-1, self.lane.multi_label)
        return classes

    def rows(self, checked: Buffer) -> Array | None:
        """The checked values as [rows, classes], for the entropy."""
        if self.entropy_shape is None:
            return None
        return self.array(checked).reshape(self.entropy_shape)

    def array(self, checked: Buffer) -> Array:
        """The checked values as an array (read in place when not activated)."""
        if isinstance(checked, np.ndarray):
            return checked
        return np.frombuffer(checked, self.lane.dtype)

    def rewritten(self, found: LaneResult, checked: Buffer) -> bytes | memoryview | None:
        """The values to write over the old ones: clamped or activated; ``None``
        when the tensor stays as it came."""
        if len(found) == 4 and found[3][0] is not None:
            return found[3][0]
        # An activation's values, C-contiguous and little-endian (the lanes' dtypes).
        return checked.data if isinstance(checked, np.ndarray) else None

    def record(self, found: LaneResult, checked: Buffer) -> tuple[Action, int]:
        """Count the lane's verdict on this output; its action and violations."""
        if self.plain and len(found) == 3:
            classes = found[0] if self.predicts else b""
            self.sink.record_lane(self.size, classes, found[1], self.lane.dtype, self.labels)
            return CLEAN, 0
        counts = None
        action = CLEAN
        if len(found) == 4:
            counts = _counts(self.size, found[3])
            action = OBSERVED if found[3][0] is None else CLAMPED
        self.sink.record_clean(
            self.size,
            self.classes(found[0]),
            np.frombuffer(found[1], self.lane.dtype),
            self.labels,
            self.rule,
            self.rows(checked),
            multi_label=self.lane.multi_label > 0,
            violations=counts,
        )
        return action, 0 if counts is None else counts.total


def _counts(size: int, counted: Counted) -> Counts:
    """What a lane counted (its repaired values aside), as the reference counts it."""
    _, below, above, inf, bad_rows = counted
    return Counts(values=size, below_min=below, above_max=above, inf=inf, bad_rows=bad_rows)


def lane_output(
    target: Target,
    name: str,
    compiled: CompiledRule,
    values: Array,
    encoding: Encoding,
    metrics: MetricsSink,
) -> LaneOutput | None:
    """The planned output for ``values`` (decoded by the reference route), or
    ``None`` when no lane takes its rule, shape and dtype."""
    lane = target.rules.lane(name, compiled, values, encoding)
    if lane is None:
        return None
    sink = metrics.output_recorder(target.model_label, target.version, target.signature, name)
    c = class_axis_size(values.shape)
    entropy_shape = (values.size // c, c) if compiled.rule.tracks_entropy and c >= 2 else None
    derived = compiled.derived_bytes(values.shape, values.itemsize)
    rule = compiled.rule
    plain = (
        entropy_shape is None
        and rule.baseline is None
        and rule.min_confidence is None
        and not lane.multi_label
    )
    return LaneOutput(
        name, lane, values.size, sink, compiled.labels, rule, entropy_shape, derived, plain,
        rule.derives,
    )  # fmt: skip


class ActionCounters:
    """The response counter of each action, made on the first response of that
    action (as the reference route makes them)."""

    __slots__ = ("_make", "_counters")

    def __init__(self, target: Target, metrics: MetricsSink) -> None:
        labels = (target.model_label, target.version, target.signature)
        self._make: Callable[[Action], Counter] = lambda a: metrics.response_counter(*labels, a)
        self._counters: dict[Action, Counter] = {}

    def inc(self, action: Action) -> None:
        """Count one response of ``action``."""
        counter = self._counters.get(action)
        if counter is None:
            counter = self._counters[action] = self._make(action)
        counter.inc()
