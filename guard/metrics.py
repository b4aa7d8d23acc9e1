"""Prometheus metrics, declared once against an injectable registry.

Label values are bounded: a client can send any model name, method or
signature, and a model can emit any number of classes, but none of that may
create unbounded time series. Unknown model names become ``__other__``; every
other free-form label has a cap after which new values become ``__other__``.

``guard_output_value`` is fed by numpy (one ``searchsorted`` + ``bincount`` per
output), never by one ``observe()`` call per value, and exported by a custom
collector.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from guard.rules import OutputResult, class_axis_size

__all__ = ["OTHER", "OUTPUT_VALUE_BUCKETS", "GuardMetrics", "KNOWN_METHODS"]

OTHER = "__other__"

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

KNOWN_METHODS = frozenset(
    {
        "Predict",
        "Classify",
        "Regress",
        "MultiInference",
        "GetModelMetadata",
        "GetModelStatus",
        "HandleReloadConfigRequest",
    }
)


class BoundedLabel:
    """Admits the first ``cap`` distinct values of a label; later ones read ``__other__``."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= self._cap:
                return OTHER
            self._seen.add(value)
        return value


class _OutputValueHistogram(Collector):
    """``guard_output_value``: a histogram whose buckets are numpy arrays."""

    def __init__(self, edges: tuple[float, ...]) -> None:
        self._edges = np.asarray(edges, dtype=np.float64)
        self._le = [repr(float(e)) for e in edges] + ["+Inf"]
        self._data: dict[tuple[str, str, str], tuple[np.ndarray[Any, Any], list[float]]] = {}
        self._lock = threading.Lock()

    def observe(self, labels: tuple[str, str, str], values: np.ndarray[Any, Any]) -> None:
        v = values.ravel()
        if not np.isfinite(v).all():
            v = v[np.isfinite(v)]  # NaN/Inf are counted as violations, not as values
        # side="left" gives i with edges[i-1] < v <= edges[i]: Prometheus' "le".
        idx = np.searchsorted(self._edges, v, side="left")
        counts = np.bincount(idx, minlength=self._edges.size + 1)
        total = float(v.sum(dtype=np.float64))
        with self._lock:
            entry = self._data.get(labels)
            if entry is None:
                entry = (np.zeros(self._edges.size + 1, dtype=np.int64), [0.0])
                self._data[labels] = entry
            entry[0][:] += counts
            entry[1][0] += total

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "guard_output_value",
            "Output values seen by the guard, after activation and before repair: each value "
            "for one-value-per-row outputs, each row's top value for multi-class outputs.",
            labels=["model", "signature", "output"],
        )
        with self._lock:
            items = [(k, c.copy(), s[0]) for k, (c, s) in self._data.items()]
        for labels, counts, total in items:
            cumulative = np.cumsum(counts)
            family.add_metric(
                list(labels),
                buckets=list(zip(self._le, (float(x) for x in cumulative), strict=True)),
                sum_value=total,
            )
        yield family


class _ClassCounts:
    """Per-class counts of one output, accumulated in numpy, with bounded names.

    The first ``cap`` distinct classes get their own ``class`` label value; later
    ones share ``__other__``. A response costs a bincount, not one counter
    increment per class.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.names: list[str] = []
        self.counts = np.zeros(cap + 1, dtype=np.int64)  # the last slot is __other__
        self.slot_of = np.full(0, -1, dtype=np.int64)  # class index -> slot, -1 = unseen

    def add(self, per_class: np.ndarray[Any, Any], name_of: Callable[[int], str]) -> None:
        """Add counts indexed by class (``per_class[i]`` = how often class i won)."""
        if per_class.size > self.slot_of.size:
            grown = np.full(per_class.size, -1, dtype=np.int64)
            grown[: self.slot_of.size] = self.slot_of
            self.slot_of = grown
        present = np.flatnonzero(per_class)
        slots = self.slot_of[present]
        for pos in np.flatnonzero(slots < 0):  # only classes never seen before
            cls = int(present[pos])
            if len(self.names) < self.cap:
                self.slot_of[cls] = len(self.names)
                self.names.append(name_of(cls))
            else:
                self.slot_of[cls] = self.cap
            slots[pos] = self.slot_of[cls]
        np.add.at(self.counts, slots, per_class[present])

    def samples(self) -> list[tuple[str, int]]:
        """(class label value, count) for every class seen."""
        out = [(n, int(c)) for n, c in zip(self.names, self.counts, strict=False)]
        if self.counts[self.cap]:
            out.append((OTHER, int(self.counts[self.cap])))
        return out


class _PredictedClassCounter(Collector):
    """``guard_predicted_class_total``, fed by numpy."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._data: dict[tuple[str, str, str], _ClassCounts] = {}
        self._lock = threading.Lock()

    def add(
        self,
        labels: tuple[str, str, str],
        per_class: np.ndarray[Any, Any],
        name_of: Callable[[int], str],
    ) -> None:
        with self._lock:
            entry = self._data.get(labels)
            if entry is None:
                entry = self._data[labels] = _ClassCounts(self._cap)
            entry.add(per_class, name_of)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "guard_predicted_class",
            "Predicted classes (the label, else the class index), capped per output; "
            "later new classes count as __other__.",
            labels=["model", "signature", "output", "class"],
        )
        with self._lock:
            items = [(k, v.samples()) for k, v in self._data.items()]
        for labels, samples in items:
            for name, count in samples:
                family.add_metric([*labels, name], count)
        yield family


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
        self._max_classes = max_class_label_values
        self._versions = BoundedLabel(256)
        self._signatures = BoundedLabel(256)
        self._outputs = BoundedLabel(1024)
        self._children: dict[tuple[Any, ...], Any] = {}

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.requests = counter(
            "guard_requests_total", "RPCs through the guard, by gRPC status code.",
            ["model", "method", "code"],
        )  # fmt: skip
        self.output_values = counter(
            "guard_output_values_total", "Output values checked against their valid range.",
            ["model", "version", "signature", "output"],
        )  # fmt: skip
        self.output_violations = counter(
            "guard_output_violations_total",
            "Output values outside the valid range (below_min, above_max), NaN or infinite.",
            ["model", "version", "signature", "output", "kind"],
        )
        self.sum_violations = counter(
            "guard_output_sum_violations_total",
            "Rows of a check_sum output whose sum is off 1 by more than the tolerance.",
            ["model", "version", "signature", "output"],
        )
        self.responses = counter(
            "guard_responses_total",
            "Predict responses with rules applied, by what the guard did "
            "(clean, observed, clamped, rejected).",
            ["model", "version", "signature", "action"],
        )
        self.decode_errors = counter(
            "guard_decode_errors_total", "Upstream responses the guard could not decode.",
            ["model"],
        )  # fmt: skip
        self.config_reloads = counter(
            "guard_config_reloads_total", "Config reloads by result (success, failure).",
            ["result"],
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "guard_upstream_duration_seconds", "Time waiting for the upstream, per RPC.",
            ["method"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.overhead = Histogram(
            "guard_overhead_seconds",
            "Time spent in the guard itself per RPC (total minus the upstream wait).",
            ["method"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.upstream_up = Gauge(
            "guard_upstream_up", "1 while the upstream answers, else 0.", registry=registry
        )
        self.inflight = Gauge(
            "guard_inflight_requests", "RPCs in flight through the guard.", registry=registry
        )
        self.output_value = _OutputValueHistogram(OUTPUT_VALUE_BUCKETS)
        registry.register(self.output_value)
        self.predicted_class = _PredictedClassCounter(max_class_label_values)
        registry.register(self.predicted_class)

    # ----------------------------------------------------------------- labels

    def set_model_names(self, names: Iterable[str]) -> None:
        """Replace the configured model names (on config reload)."""
        self._models = frozenset(names)

    def model_label(self, name: str | None) -> str:
        """The configured name, or ``__other__`` for anything a client made up."""
        return name if name is not None and name in self._models else OTHER

    @staticmethod
    def method_label(method: str) -> str:
        """The short method name for TF Serving's methods, else ``__other__``."""
        short = method.rsplit("/", 1)[-1]
        return short if short in KNOWN_METHODS else OTHER

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            self._children[key] = child
        return child

    # -------------------------------------------------------------- recording

    def record_request(self, model: str, method: str, code: str) -> None:
        """Count one finished RPC (labels already bounded)."""
        self._child(self.requests, model, method, code).inc()

    def record_timing(self, method: str, upstream_s: float, overhead_s: float) -> None:
        """Observe the upstream wait and the guard's own time for one RPC."""
        self._child(self.upstream_duration, method).observe(upstream_s)
        self._child(self.overhead, method).observe(overhead_s)

    def record_response(self, model: str, version: str, signature: str, action: str) -> None:
        """Count one guarded Predict response by action."""
        version, signature = self._versions(version), self._signatures(signature)
        self._child(self.responses, model, version, signature, action).inc()

    def record_output(
        self,
        model: str,
        version: str,
        signature: str,
        output: str,
        result: OutputResult,
        labels: np.ndarray[Any, Any] | None,
    ) -> None:
        """Record the counts, histogram and classes of one checked output."""
        version = self._versions(version)
        signature = self._signatures(signature)
        output = self._outputs(output)
        c = result.counts
        self._child(self.output_values, model, version, signature, output).inc(c.values)
        for kind, n in (
            ("below_min", c.below_min),
            ("above_max", c.above_max),
            ("nan", c.nan),
            ("inf", c.inf),
        ):
            # Creating the child makes every kind's series exist at 0 before the first
            # violation (rate() and alerts need a starting point); only counts add.
            child = self._child(self.output_violations, model, version, signature, output, kind)
            if n:
                child.inc(n)
        child = self._child(self.sum_violations, model, version, signature, output)
        if c.bad_rows:
            child.inc(c.bad_rows)

        checked = result.checked
        per_row = checked if class_axis_size(checked.shape) == 1 else None
        if per_row is None and checked.size:
            if result.confidence is not None:
                per_row = result.confidence  # the top values of the checked rows
            else:
                with np.errstate(invalid="ignore"):
                    per_row = checked.reshape(-1, checked.shape[-1]).max(axis=1)
        if per_row is not None:
            self.output_value.observe((model, signature, output), per_row)

        if result.classes is not None and result.classes.size:
            self._record_classes(model, signature, output, result, labels)

    def _record_classes(
        self,
        model: str,
        signature: str,
        output: str,
        result: OutputResult,
        labels: np.ndarray[Any, Any] | None,
    ) -> None:
        assert result.classes is not None
        classes = result.classes

        def name_of(i: int) -> str:
            if labels is not None and not result.multi_label and i < labels.size:
                label: bytes = labels[i]
                return label.decode("utf-8")
            return str(i)

        if result.multi_label:
            # Threshold on a multi-label output: count each class index that fired.
            per_class = classes.reshape(-1, classes.shape[-1]).sum(axis=0)
        else:
            per_class = np.bincount(classes.ravel())
        self.predicted_class.add((model, signature, output), per_class, name_of)
