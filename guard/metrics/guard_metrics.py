"""The guard's metric set, declared once against an injectable registry.

Label values are bounded: a client can send any model name, method or
signature, and a model can emit any number of classes, but none of that may
create unbounded time series. Unknown model names become ``__other__``; every
other free-form label has a cap after which new values become ``__other__``.
It implements the data plane's :class:`~guard.dataplane.sink.MetricsSink`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from guard.dataplane.cache import BoundedCache
from guard.dataplane.dtypes import INT64
from guard.dataplane.kernels import row_entropy
from guard.dataplane.results import Action, Counts, OutputResult
from guard.dataplane.rules import ABSTAINED, class_axis_size
from guard.dataplane.rulespec import OutputRule
from guard.metrics.collectors import (
    LABEL_VALUE_MAX,
    OTHER,
    BoundedCombinations,
    BoundedLabel,
    DriftGauge,
    EntropyHistogram,
    LaneQueue,
    LatencyHistogram,
    LoopCounter,
    LoopValue,
    NameOf,
    OutputValueHistogram,
    PredictedClassCounter,
)

__all__ = [
    "LATENCY_BUCKETS",
    "OTHER",
    "OUTPUT_VALUE_BUCKETS",
    "GuardMetrics",
    "OutputRecorder",
]

#: Resolves the region above 1 and below 0 as well as [0, 1]: a sigmoid that
#: leaks to 1.0028 lands in (1.001, 1.01].
OUTPUT_VALUE_BUCKETS: tuple[float, ...] = (
    -1.0, -0.1, -0.01, -0.001, 0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
    0.9, 0.95, 0.99, 1.0, 1.001, 1.01, 1.1, 2.0, 10.0,
)  # fmt: skip

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class _GateCounts(Protocol):
    inflight: int
    pending: int
    inflight_bytes: int
    relayed: int


class GuardMetrics:
    """All of the guard's metrics, on one registry."""

    def __init__(
        self,
        registry: CollectorRegistry,
        model_names: Iterable[str] = (),
        max_class_label_values: int = 100,
    ) -> None:
        self.registry = registry
        self._models = frozenset(model_names)
        self._versions = BoundedLabel(256)
        self._model_versions: dict[str, list[str]] = {}  # per model label, oldest first
        # What the recorders of each (model label, version) kept share: marked
        # stale when its series are dropped, so the plans that hold them are
        # made again.
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._signatures = BoundedLabel(256)
        self._outputs = BoundedLabel(1024)
        self._response_series = BoundedCombinations(_RESPONSE_SERIES_MAX)
        self._output_series = BoundedCombinations(_OUTPUT_SERIES_MAX)
        # Keyed by the raw values: the label values are bounded when a recorder
        # is made, and the cache itself is bounded in entries and key bytes.
        self._recorders: BoundedCache[tuple[str, str, str, str], OutputRecorder] = BoundedCache(
            _RECORDERS_MAX, max_key_bytes=_RECORDER_KEY_BYTES, weigh=lambda k: sum(map(len, k))
        )
        self._declare_call_metrics()
        self._declare_output_metrics(max_class_label_values)
        self._declare_process_metrics()
        self._declare_health_metrics()
        self._show_models(frozenset())

    def _loop_counter(self, name: str, doc: str, labels: list[str]) -> LoopCounter:
        family = LoopCounter(name, doc, labels)
        self.registry.register(family)
        return family

    def _declare_call_metrics(self) -> None:
        """Counted on every call: lock-free children (see LoopCounter)."""
        self.requests = self._loop_counter(
            "guard_requests_total",
            "Calls through the guard (gRPC and REST), by TF Serving method and gRPC status "
            "code (for REST, the code TF Serving maps to the HTTP status).",
            ["protocol", "model", "method", "code"],
        )  # fmt: skip
        self.refusals = self._loop_counter(
            "guard_refused_requests_total",
            "Calls the guard refused to protect itself, by the limit that refused them "
            "(metadata, pending_requests, request_timeout, request_too_large, inflight_calls, "
            "relayed_streams, inflight_bytes, response_too_large, stream_idle, connections).",
            ["reason"],
        )
        self.upstream_duration = LatencyHistogram(
            "guard_upstream_duration_seconds", "Time waiting for the upstream, per call.",
            ["protocol", "method"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.registry.register(self.upstream_duration)
        self.overhead = LatencyHistogram(
            "guard_overhead_seconds",
            "Time spent in the guard itself per call (total minus the upstream wait).",
            ["protocol", "method"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.registry.register(self.overhead)

    def _declare_output_metrics(self, max_class_label_values: int) -> None:
        labels = ["model", "version", "signature", "output"]
        self.output_values = self._loop_counter(
            "guard_output_values_total", "Output values checked against their valid range.",
            labels,
        )  # fmt: skip
        self.output_violations = self._loop_counter(
            "guard_output_violations_total",
            "Output values outside the valid range (below_min, above_max), NaN or infinite.",
            [*labels, "kind"],
        )
        self.sum_violations = self._loop_counter(
            "guard_output_sum_violations_total",
            "Rows of a check_sum output whose sum is off 1 by more than the tolerance.",
            labels,
        )
        self.responses = self._loop_counter(
            "guard_responses_total",
            "Predict responses with rules applied, by what the guard did "
            "(clean, observed, clamped, rejected).",
            ["model", "version", "signature", "action"],
        )
        self.output_value = OutputValueHistogram(OUTPUT_VALUE_BUCKETS)
        self.registry.register(self.output_value)
        self.predicted_class = PredictedClassCounter(max_class_label_values)
        self.registry.register(self.predicted_class)
        self.lanes = LaneQueue()
        self.output_value.before_collect = self.predicted_class.before_collect = self.lanes.flush

    def _declare_health_metrics(self) -> None:
        """Whether a model's valid outputs are useful: abstentions, entropy, drift."""
        self.abstentions = self._loop_counter(
            "guard_abstentions_total",
            "Predictions below min_confidence, answered with class -1 and abstain_label.",
            ["model", "signature", "output"],
        )
        self.entropy = EntropyHistogram()
        self.registry.register(self.entropy)
        self.drift = DriftGauge()
        self.registry.register(self.drift)

    def _declare_process_metrics(self) -> None:
        """Rarely counted: plain prometheus_client types."""
        registry = self.registry
        self.decode_errors = Counter(
            "guard_decode_errors_total", "Upstream responses the guard could not decode.",
            ["model"], registry=registry,
        )  # fmt: skip
        self.config_reloads = Counter(
            "guard_config_reloads_total", "Config reloads by result (success, failure).",
            ["result"], registry=registry,
        )  # fmt: skip
        self.upstream_up = Gauge(
            "guard_upstream_up", "1 while the upstream answers, else 0.", registry=registry
        )
        self.model_info = Gauge(
            "guard_model_info",
            "1 for each model the config in effect names (wildcard rules aside).",
            ["model"], registry=registry,
        )  # fmt: skip
        self.inflight = Gauge(
            "guard_inflight_requests", "RPCs in flight through the guard.", registry=registry
        )
        """Read at scrape time from the server's own count (see :meth:`track_gate`)."""
        self.pending = Gauge(
            "guard_pending_requests",
            "Calls whose request message has not fully arrived yet.",
            registry=registry,
        )
        self.relayed_streams = Gauge(
            "guard_relayed_streams",
            "Streaming calls relayed now (counted in guard_inflight_requests too).",
            registry=registry,
        )
        self.inflight_bytes = Gauge(
            "guard_inflight_bytes",
            "Bytes of requests and responses held by calls in flight, and of answers their "
            "clients have not taken yet.",
            registry=registry,
        )
        self.memory_resets = Counter(
            "guard_memory_resets_total",
            "Times RSS passed max_memory_mb and every gRPC client connection was closed.",
            registry=registry,
        )
        self.server_restarts = Counter(
            "guard_server_restarts_total",
            "Times the gRPC server stopped by itself and was started again on the same port.",
            registry=registry,
        )

    # ----------------------------------------------------------------- labels

    def set_model_names(self, names: Iterable[str]) -> None:
        """Replace the configured model names (on config reload); the series
        of any other model go (see :meth:`_forget`)."""
        before, self._models = self._models, frozenset(names)
        self._forget(before - self._models)
        self._show_models(before)

    def _show_models(self, before: frozenset[str]) -> None:
        for model in before - self._models:
            self.model_info.remove(model)
        for model in self._models:
            self.model_info.labels(model).set(1)

    def _forget(self, retired: frozenset[str]) -> None:
        """Drop every series of a model not configured (those ``retired`` now,
        and any a call in flight across an earlier reload brought back), and
        free the label slots they held: reloads that rename models would
        otherwise pile up series nobody updates, until the caps turned the
        new models' series into ``__other__``. Prometheus marks the dropped
        series stale, as it does a removed target's."""
        keep = self._models
        self.lanes.flush()  # verdicts queued before the reload are counted first
        for family in (
            self.requests, self.output_values, self.output_violations, self.sum_violations,
            self.responses, self.abstentions, self.output_value, self.predicted_class,
            self.entropy, self.drift,
        ):  # fmt: skip
            family.forget(keep)
        for model in retired:
            self.decode_errors.remove(model)  # nothing if never counted
        self._model_versions = {
            m: v for m, v in self._model_versions.items() if m in keep or m == OTHER
        }
        for model, version in [k for k in self._tokens if k[0] not in keep and k[0] != OTHER]:
            self._stale(model, version)
        self._after_drop(self._response_series.forget(keep) | self._output_series.forget(keep))

    def _forget_version(self, model: str, version: str) -> None:
        """Drop the series of one version of ``model`` and free its label slots."""
        self.lanes.flush()

        def match(labels: tuple[str, ...]) -> bool:
            return labels[0] == model and labels[1] == version

        for family in (self.responses, self.output_values, self.output_violations,
                       self.sum_violations):  # fmt: skip
            family.drop(match)
        self._stale(model, version)
        self._after_drop(self._response_series.drop(match) | self._output_series.drop(match))

    def _stale(self, model: str, version: str) -> None:
        token = self._tokens.pop((model, version), None)
        if token is not None:
            token.stale = True

    def _after_drop(self, kept: set[tuple[str, ...]]) -> None:
        """Free the label values only dropped series held, and the recorders
        that hold the dropped series' children."""
        self._versions.keep_only({k[1] for k in kept})
        self._signatures.keep_only({k[2] for k in kept})
        self._outputs.keep_only({k[3] for k in kept if len(k) > 3})
        self._recorders.clear()

    def _version(self, model: str, version: str) -> str:
        """The ``version`` label of ``model``'s responses of ``version``. A
        model keeps the series of its last :data:`_VERSIONS_PER_MODEL`
        versions: TF Serving loads new versions without a restart, and the
        256 values of the label, shared by every model, filled up."""
        if len(version) > LABEL_VALUE_MAX:
            return OTHER
        seen = self._model_versions.setdefault(model, [])
        if version not in seen:
            if len(seen) >= _VERSIONS_PER_MODEL:
                self._forget_version(model, seen.pop(0))
            seen.append(version)
            self._tokens[(model, version)] = _Token()
        return self._versions(version)

    def model_label(self, name: str | None) -> str:
        """The configured name, or ``__other__`` for anything a client made up."""
        return name if name is not None and name in self._models else OTHER

    def track_gate(self, gate: _GateCounts) -> None:
        """Export the gate's counts as the in-flight, pending and bytes gauges,
        read at scrape time: the server already counts them, so no gauge
        update is paid per call."""
        self.inflight.set_function(lambda: gate.inflight)
        self.pending.set_function(lambda: gate.pending)
        self.inflight_bytes.set_function(lambda: gate.inflight_bytes)
        self.relayed_streams.set_function(lambda: gate.relayed)

    def record_refusal(self, reason: str) -> None:
        """Count one call refused by a limit."""
        self.refusals.labels(reason).inc()

    # -------------------------------------------------------------- recording

    def record_request(self, protocol: str, model: str, method: str, code: str) -> None:
        """Count one finished call (labels already bounded; ``protocol``: grpc or rest).
        A model a reload retired while the call ran counts as ``__other__``."""
        if model not in self._models:
            model = OTHER
        self.requests.labels(protocol, model, method, code).inc()

    def record_timing(
        self, protocol: str, method: str, upstream_s: float, overhead_s: float
    ) -> None:
        """Observe the upstream wait and the guard's own time for one call."""
        labels = (protocol, method)
        self.upstream_duration.observe(labels, upstream_s)
        self.overhead.observe(labels, overhead_s)

    def response_counter(
        self, model: str, version: str, signature: str, action: Action
    ) -> LoopValue:
        """The ``guard_responses_total`` child of one action."""
        labels = self._response_series(
            (model, self._version(model, version), self._signatures(signature))
        )
        return self.responses.labels(*labels, action.label)

    def count_decode_error(self, model: str) -> None:
        """Count one response that could not be decoded (``model`` already bounded)."""
        self.decode_errors.labels(model if model in self._models else OTHER).inc()

    def output_recorder(
        self, model: str, version: str, signature: str, output: str
    ) -> OutputRecorder:
        """The recorder of one output's series."""
        key = (model, version, signature, output)
        recorder: OutputRecorder | None = self._recorders.get(key)
        if recorder is None:
            bounded = (model, self._version(model, version), self._signatures(signature))
            m, v, s, o = self._output_series((*bounded, self._outputs(output)))
            recorder = OutputRecorder(self, m, v, s, o, self._tokens.get((model, version)))
            self._recorders.put(key, recorder)
        return recorder


_RECORDERS_MAX = 4096
_VERSIONS_PER_MODEL = 8
# Series per metric family, whatever the upstream or the clients name: an
# echoing upstream's 66,049 (version, signature) pairs made 380,000 samples
# in one worker, 7 s to scrape, and the aggregated /metrics came back empty.
_RESPONSE_SERIES_MAX = 1024
_OUTPUT_SERIES_MAX = 1024
_RECORDER_KEY_BYTES = 2048


class _Token:
    """Shared by the recorders of one (model, version): ``stale`` once its
    series were dropped."""

    __slots__ = ("stale",)

    def __init__(self) -> None:
        self.stale = False


class OutputRecorder:
    """The metric children of one (model, version, signature, output), looked up once.

    Creating the children makes every violation kind's series exist at 0 before
    the first violation (rate() and alerts need a starting point).
    """

    def __init__(
        self,
        metrics: GuardMetrics,
        model: str,
        version: str,
        signature: str,
        output: str,
        token: _Token | None = None,
    ) -> None:
        labels = (model, version, signature, output)
        self.values = metrics.output_values.labels(*labels)
        self.below_min, self.above_max, self.nan, self.inf = (
            metrics.output_violations.labels(*labels, kind)
            for kind in ("below_min", "above_max", "nan", "inf")
        )
        self.bad_rows = metrics.sum_violations.labels(*labels)
        self.series = (model, signature, output)
        self.histogram = metrics.output_value
        self.classes = metrics.predicted_class
        self.entropy = metrics.entropy
        self.drift = metrics.drift
        self._abstentions = metrics.abstentions
        self._lanes = metrics.lanes
        self._token = token
        self._abstained: Any = None  # made on the first abstention
        self._labels: np.ndarray[Any, Any] | None = None
        self._abstain: tuple[str, NameOf] | None = None
        self._name_of: NameOf = str

    @property
    def stale(self) -> bool:
        """Whether its series were dropped (see :class:`~guard.dataplane.sink.OutputSink`)."""
        return self._token is not None and self._token.stale

    def _namer(self, labels: np.ndarray[Any, Any] | None) -> NameOf:
        # One resolver per label table, so queued predictions fold in one batch.
        if labels is not self._labels:
            self._labels = labels
            table = labels

            def name_of(i: int) -> str:
                if table is not None and i < table.size:
                    label: bytes = table[i]
                    return label.decode("utf-8")
                return str(i)

            self._name_of = name_of if labels is not None else str
        return self._name_of

    def _record_health(
        self, rule: OutputRule, confidence: np.ndarray[Any, Any] | None, rows: Any
    ) -> None:
        if rows is not None and rows.shape[0]:
            entropy = row_entropy(rows)
            self.entropy.observe(self.series, entropy, rows.shape[1], rule.near_uniform_entropy)
        baseline = rule.baseline
        if baseline is not None and confidence is not None and confidence.size:
            pair = (baseline.edges, baseline.fractions)
            self.drift.observe(self.series, confidence, pair, rule.drift_window)

    def _count_abstained(self, n: int) -> None:
        if self._abstained is None:
            self._abstained = self._abstentions.labels(*self.series)
        self._abstained.inc(n)

    def record_clean(
        self,
        size: int,
        classes: np.ndarray[Any, Any],
        confidence: np.ndarray[Any, Any],
        labels: np.ndarray[Any, Any] | None,
        rule: OutputRule,
        rows: np.ndarray[Any, Any] | None = None,
        multi_label: bool = False,
        violations: Counts | None = None,
    ) -> None:
        """Record an output the native lane decided: ``size`` values checked,
        each row's best class (or, ``multi_label``, [rows, classes] of a
        threshold's 0/1), -1 where it abstained, and largest value before
        repair, the values as [rows, classes] when the rule tracks entropy,
        and what the lane counted. The same as :meth:`record` of the reference's result
        (tests/dataplane/test_rank.py compares the two)."""
        if self._lanes:
            self._lanes.flush()  # what came before is counted before
        self.values.inc(size)
        if violations is not None:
            self._count_violations(violations)
        self.histogram.observe(self.series, confidence)
        abstained = 0
        if rule.min_confidence is not None:
            abstained = int(np.count_nonzero(classes == ABSTAINED))
        self._record_health(rule, confidence, rows)
        if abstained:
            self._count_abstained(abstained)
        if multi_label:
            self._add_fired(classes)
        else:
            self._add_classes(classes, labels, abstained, rule)

    def record_lane(
        self,
        size: int,
        classes: bytes,
        scores: bytes,
        dtype: np.dtype[Any],
        labels: np.ndarray[Any, Any] | None,
    ) -> None:
        """:meth:`record_clean` of a verdict with nothing but classes and
        scores to count (``size`` values in range, no abstention, entropy,
        drift or multi-label rule), given as the lane wrote them: each row's
        best class (int64; empty where the rule predicts none) and largest
        value (``dtype``). Queued
        (:class:`~guard.metrics.collectors.LaneQueue`); folded by
        :meth:`fold_lane`."""
        self.values.inc(size)
        self._lanes.put(self, dtype, self._namer(labels), classes, scores)

    def fold_lane(
        self, dtype: np.dtype[Any], name_of: NameOf, classes: bytes, scores: bytes
    ) -> None:
        """Count queued lane verdicts, joined: their classes (none from a
        rule that predicts nothing) and scores."""
        self.histogram.observe(self.series, np.frombuffer(scores, dtype))
        if classes:
            self.classes.add(self.series, np.frombuffer(classes, INT64), name_of)

    def _add_fired(self, classes: np.ndarray[Any, Any]) -> None:
        """Threshold on a multi-label output: count each class index that fired."""
        fired = np.nonzero(classes.reshape(-1, classes.shape[-1]) == 1)[1]
        self.classes.add(self.series, fired, str)  # indices: no labels

    def record(
        self, result: OutputResult, labels: np.ndarray[Any, Any] | None, rule: OutputRule
    ) -> None:
        if self._lanes:
            self._lanes.flush()  # what came before is counted before
        c = result.counts
        self.values.inc(c.values)
        if c.total:
            self._count_violations(c)

        checked = result.checked
        if class_axis_size(checked.shape) == 1:
            per_row: np.ndarray[Any, Any] | None = checked
        elif result.confidence is not None:
            per_row = result.confidence  # the top values of the checked rows
        elif checked.size:
            with np.errstate(invalid="ignore"):
                per_row = checked.reshape(-1, checked.shape[-1]).max(axis=1)
        else:
            per_row = None
        if per_row is not None and per_row.size:
            self.histogram.observe(self.series, per_row)
        self._record_health(rule, per_row, result.entropy_rows)
        if result.abstained:
            self._count_abstained(result.abstained)
        self._record_classes(result, labels, rule)

    def _count_violations(self, c: Counts) -> None:
        for child, n in (
            (self.below_min, c.below_min),
            (self.above_max, c.above_max),
            (self.nan, c.nan),
            (self.inf, c.inf),
            (self.bad_rows, c.bad_rows),
        ):
            if n:
                child.inc(n)

    def _record_classes(
        self, result: OutputResult, labels: np.ndarray[Any, Any] | None, rule: OutputRule
    ) -> None:
        classes = result.classes
        if classes is None or not classes.size:
            return
        if result.multi_label:
            self._add_fired(classes)
            return
        self._add_classes(classes.ravel(), labels, result.abstained, rule)

    def _add_classes(
        self,
        flat: np.ndarray[Any, Any],
        labels: np.ndarray[Any, Any] | None,
        abstained: int,
        rule: OutputRule,
    ) -> None:
        """Count each prediction; abstained ones (-1) by name, under
        ``abstain_label``, never at an index a class could have."""
        if abstained:
            self.classes.add(
                self.series, np.zeros(abstained, np.int64), self._abstain_namer(rule.abstain_label)
            )
            flat = flat[flat != ABSTAINED]
        if flat.size:
            self.classes.add(self.series, flat, self._namer(labels))

    def _abstain_namer(self, label: str) -> NameOf:
        """One namer per abstain label, so queued abstentions fold together."""
        if self._abstain is None or self._abstain[0] != label:

            def name_of(_: int) -> str:
                return label

            self._abstain = (label, name_of)
        return self._abstain[1]
