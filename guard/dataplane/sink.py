"""What the data plane counts into: the metric set's interface, as protocols.

:class:`guard.metrics.guard_metrics.GuardMetrics` implements these; the data
plane never imports Prometheus.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from guard.dataplane.results import Action, Array, Counts, OutputResult
from guard.dataplane.rulespec import OutputRule

__all__ = ["Counter", "LabelTable", "MetricsSink", "OutputSink"]

#: Class labels encoded once, as an object array of ``bytes``.
LabelTable = np.ndarray[Any, Any]


class Counter(Protocol):
    """One counter series."""

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount``."""


class OutputSink(Protocol):
    """The metric series of one (model, version, signature, output)."""

    @property
    def stale(self) -> bool:
        """Whether its series were dropped (an old version of its model): a
        plan that holds it is made again, with series of its own."""

    def record(self, result: OutputResult, labels: LabelTable | None, rule: OutputRule) -> None:
        """Record the counts, histograms, classes, abstentions and drift of one
        checked output."""

    def record_clean(
        self,
        size: int,
        classes: Array,
        confidence: Array,
        labels: LabelTable | None,
        rule: OutputRule,
        rows: Array | None = None,
        multi_label: bool = False,
        violations: Counts | None = None,
    ) -> None:
        """Record an output the native route decided: ``size`` values, each
        row's best class (or, ``multi_label``, [rows, classes] of a threshold's
        0/1), -1 where it abstained, and largest value before repair, the
        values as [rows, classes] when the rule tracks entropy, and the values
        it counted outside the range (the same as :meth:`record` of the
        reference's result)."""

    def record_lane(
        self,
        size: int,
        classes: bytes,
        scores: bytes,
        dtype: np.dtype[Any],
        labels: LabelTable | None,
    ) -> None:
        """:meth:`record_clean` of a verdict with only classes and scores to
        count (no violation, abstention, entropy, drift or multi-label rule),
        as the lane wrote them: each row's best class (int64; empty where the
        rule predicts none) and largest value (``dtype``)."""


class MetricsSink(Protocol):
    """Where guarded responses are counted."""

    def model_label(self, name: str | None) -> str:
        """The bounded ``model`` label value for a model name."""

    def output_recorder(self, model: str, version: str, signature: str, output: str) -> OutputSink:
        """The series of one output."""

    def response_counter(self, model: str, version: str, signature: str, action: Action) -> Counter:
        """The ``guard_responses_total`` series of one action."""

    def count_decode_error(self, model: str) -> None:
        """Count one response that could not be decoded (``model`` already bounded)."""
