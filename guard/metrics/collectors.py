"""The collectors behind the guard's metrics, cheap enough for every call.

Every metric recorded per call or per output is kept cheap, because a proxy
hop costs well under a millisecond: the counters are lock-free children
(:class:`LoopValue`, written by the event loop only), the timing histograms a
``bisect`` per observation, and ``guard_output_value`` and
``guard_predicted_class_total`` queue numpy arrays that a scrape folds in with
one ``searchsorted``/``bincount`` per batch.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

logger = logging.getLogger("guard.metrics")

__all__ = [
    "ENTROPY_BUCKETS",
    "LABEL_VALUE_MAX",
    "OTHER",
    "PENDING_ARRAYS_MAX",
    "PENDING_VALUES_MAX",
    "BoundedCombinations",
    "BoundedLabel",
    "DriftGauge",
    "EntropyHistogram",
    "LaneFold",
    "LaneQueue",
    "LatencyHistogram",
    "LoopCounter",
    "LoopValue",
    "NameOf",
    "OutputValueHistogram",
    "PredictedClassCounter",
    "psi",
]

OTHER = "__other__"


#: Label values longer than this read ``__other__``: a series per client-chosen
#: megabyte name would bloat every scrape.
LABEL_VALUE_MAX = 128


class BoundedLabel:
    """Admits the first ``cap`` distinct values of a label, each of at most
    :data:`LABEL_VALUE_MAX` characters; others read ``__other__``."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(value) > LABEL_VALUE_MAX:
            return OTHER
        with self._lock:
            if len(self._seen) >= self._cap:
                return OTHER
            self._seen.add(value)
        return value

    def keep_only(self, values: set[str]) -> None:
        """Forget every admitted value not in ``values``, freeing its slot."""
        with self._lock:
            self._seen &= values


class BoundedCombinations:
    """Admits the first ``cap`` distinct combinations of (already bounded)
    label values: each label bounded alone still lets their product grow
    (256 versions x 256 signatures x 1024 outputs). Past the cap a
    combination keeps its first value (the model, from the config) and reads
    ``__other__`` in the rest."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._seen: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def __call__(self, values: tuple[str, ...]) -> tuple[str, ...]:
        if values in self._seen:
            return values
        with self._lock:
            if len(self._seen) < self._cap:
                self._seen.add(values)
                return values
        return (values[0], *(OTHER for _ in values[1:]))

    def forget(self, keep: frozenset[str]) -> set[tuple[str, ...]]:
        """Free the combinations of models (first value) not in ``keep``; the ones kept."""
        return self.drop(lambda v: v[0] not in keep and v[0] != OTHER)

    def drop(self, match: Callable[[tuple[str, ...]], bool]) -> set[tuple[str, ...]]:
        """Free the combinations ``match`` takes; the ones kept."""
        with self._lock:
            self._seen = {v for v in self._seen if not match(v)}
            return set(self._seen)


def _nothing() -> None:
    return None


def _drop_models(series: dict[Any, Any], keep: frozenset[str], at: int = 0) -> list[Any]:
    """Remove the entries of ``series`` whose model label, at position ``at``
    of their label values, is neither in ``keep`` nor ``__other__``; the
    values removed."""
    gone = [key for key in series if key[at] not in keep and key[at] != OTHER]
    return [series.pop(key) for key in gone]


#: Values and arrays queued by the numpy-fed collectors before they are folded
#: in: a scrape folds everything queued, and so does a call that goes past
#: either bound. They bound the memory held between scrapes (about 1 MiB).
PENDING_VALUES_MAX = 1 << 16
PENDING_ARRAYS_MAX = 4096


class _Queued:
    """What a numpy-fed collector has queued since its last fold."""

    __slots__ = ("arrays", "values")

    def __init__(self) -> None:
        self.values = self.arrays = 0

    def add(self, size: int) -> bool:
        """Count one queued array of ``size`` values; True when it is time to fold."""
        self.values += size
        self.arrays += 1
        return self.values > PENDING_VALUES_MAX or self.arrays > PENDING_ARRAYS_MAX

    def reset(self) -> None:
        """Everything queued was folded."""
        self.values = self.arrays = 0


class LaneFold(Protocol):
    """Where a queued lane verdict is folded in (an output's recorder)."""

    def fold_lane(
        self, dtype: np.dtype[Any], name_of: NameOf, classes: bytes, scores: bytes
    ) -> None:
        """Count the joined classes (int64) and scores (``dtype``) of queued verdicts."""


class LaneQueue:
    """The native lanes' plain verdicts (no violation, abstention or health
    series to count), queued as the lane gave them: per response, its
    output's recorder, classes (int64 bytes) and top scores (bytes of the
    values' dtype).

    Counting one one-value response straight into the value histogram and
    the class counter took two arrays, two locks and a dozen calls, half of
    what guarding it cost. Queued, each output's verdicts are joined and
    counted in one pass: before either collector is read
    (``before_collect``), before that output counts anything else (order
    matters to the class counter's cap), and whenever the queue passes
    :data:`PENDING_ARRAYS_MAX` responses or :data:`PENDING_VALUES_MAX` values.
    """

    def __init__(self) -> None:
        self._items: deque[tuple[LaneFold, np.dtype[Any], NameOf, bytes, bytes]] = deque()
        self._values = 0  # queued since the loop's last flush: the memory bound
        self._lock = threading.Lock()  # one flush at a time, in order

    def __len__(self) -> int:
        return len(self._items)

    def put(
        self, sink: LaneFold, dtype: np.dtype[Any], name_of: NameOf, classes: bytes, scores: bytes
    ) -> None:
        """Queue one verdict (called from the event loop only)."""
        self._items.append((sink, dtype, name_of, classes, scores))
        self._values += len(scores) // dtype.itemsize  # one score per row (a class too, or none)
        if self._values > PENDING_VALUES_MAX or len(self._items) > PENDING_ARRAYS_MAX:
            self._values = 0
            self.flush()

    def flush(self) -> None:
        """Fold everything queued (from any thread); returns once a fold
        another thread began is done too."""
        with self._lock:
            if not self._items:
                return
            runs: dict[tuple[LaneFold, np.dtype[Any], NameOf], tuple[list[bytes], list[bytes]]]
            runs = {}
            items = self._items
            while items:
                sink, dtype, name_of, classes, scores = items.popleft()
                run = runs.get((sink, dtype, name_of))
                if run is None:
                    run = runs[(sink, dtype, name_of)] = ([], [])
                run[0].append(classes)
                run[1].append(scores)
            for (sink, dtype, name_of), (classes_run, scores_run) in runs.items():
                sink.fold_lane(dtype, name_of, b"".join(classes_run), b"".join(scores_run))


class OutputValueHistogram(Collector):
    """``guard_output_value``: a histogram whose buckets are numpy arrays.

    ``observe`` only queues the array; queued arrays are folded into the buckets
    in one ``searchsorted`` + ``bincount`` per label set, at scrape time or when
    :data:`PENDING_VALUES_MAX` values wait. Per response that is one list append
    instead of half a dozen numpy calls, which dominated small responses.
    """

    def __init__(self, edges: tuple[float, ...]) -> None:
        self.before_collect: Callable[[], None] = _nothing
        """Called before a scrape reads the buckets (the lanes' queue flushes)."""
        self._edges = np.asarray(edges, dtype=np.float64)
        self._le = [repr(float(e)) for e in edges] + ["+Inf"]
        self._data: dict[tuple[str, str, str], tuple[np.ndarray[Any, Any], list[float]]] = {}
        self._pending: dict[tuple[str, str, str], list[np.ndarray[Any, Any]]] = {}
        self._queued = _Queued()
        self._lock = threading.Lock()

    def observe(self, labels: tuple[str, str, str], values: np.ndarray[Any, Any]) -> None:
        """Count ``values`` (NaN and ±Inf are skipped: they are violations, not values).

        ``values`` must not be modified afterwards; it is read when folded.
        """
        with self._lock:
            queue = self._pending.get(labels)
            if queue is None:
                queue = self._pending[labels] = []
            queue.append(values)
            if self._queued.add(values.size):
                self._fold()

    def _fold(self) -> None:
        """Fold the queued values into the buckets (the caller holds the lock)."""
        for labels, queue in self._pending.items():
            # Widening a signalling NaN (float32 -> float64) raises "invalid": it
            # is a NaN like any other here, skipped just below (found by fuzzing).
            with np.errstate(invalid="ignore"):
                v = np.concatenate([q.ravel() for q in queue]) if len(queue) > 1 else queue[0]
            v = v.ravel()
            finite = np.isfinite(v)
            if not finite.all():
                v = v[finite]
            # side="left" gives i with edges[i-1] < v <= edges[i]: Prometheus' "le".
            idx = np.searchsorted(self._edges, v, side="left")
            counts = np.bincount(idx, minlength=self._edges.size + 1)
            entry = self._data.get(labels)
            if entry is None:
                entry = self._data[labels] = (np.zeros(self._edges.size + 1, np.int64), [0.0])
            entry[0][:] += counts
            # Finite float64 values near their maximum can add up past it: the
            # sum is then +Inf, as Python's float sum of prometheus_client would
            # be, without numpy's warning (found by fuzzing).
            with np.errstate(over="ignore"):
                entry[1][0] += float(v.sum(dtype=np.float64))
        self._pending.clear()
        self._queued.reset()

    def forget(self, keep: frozenset[str]) -> None:
        """Drop the series of models not in ``keep`` (retired by a reload)."""
        with self._lock:
            _drop_models(self._pending, keep)
            _drop_models(self._data, keep)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "guard_output_value",
            "Output values seen by the guard, after activation and before repair: each value "
            "for one-value-per-row outputs, each row's top value for multi-class outputs.",
            labels=["model", "signature", "output"],
        )
        self.before_collect()
        with self._lock:
            self._fold()
            items = [(k, c.copy(), s[0]) for k, (c, s) in self._data.items()]
        for labels, counts, total in items:
            cumulative = np.cumsum(counts)
            family.add_metric(
                list(labels),
                buckets=list(zip(self._le, (float(x) for x in cumulative), strict=True)),
                sum_value=total,
            )
        yield family


class LoopValue:
    """One counter value, incremented without a lock by the event loop only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (non-negative)."""
        self.value += amount


class LoopCounter(Collector):
    """A labelled counter family for the per-RPC and per-output counts.

    prometheus_client's ``Counter.inc`` takes a lock and checks its argument on
    every call; these are incremented only from the event loop thread, so a
    plain attribute update suffices, and a scrape (another thread) reads each
    value once. The rarely-counted metrics stay prometheus_client Counters.
    """

    def __init__(self, name: str, documentation: str, labelnames: list[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._children: dict[tuple[str, ...], LoopValue] = {}
        self._model_at = labelnames.index("model") if "model" in labelnames else -1

    def forget(self, keep: frozenset[str]) -> None:
        """Drop the series of models not in ``keep`` (retired by a reload): a
        child still held counts into nothing."""
        if self._model_at >= 0:
            _drop_models(self._children, keep, self._model_at)

    def drop(self, match: Callable[[tuple[str, ...]], bool]) -> None:
        """Drop the series whose label values ``match`` takes."""
        for key in [key for key in self._children if match(key)]:
            del self._children[key]

    def labels(self, *values: str) -> LoopValue:
        """The child for ``values`` (created at 0, so the series exists before counts)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}")
            child = self._children[values] = LoopValue()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class LatencyHistogram(Collector):
    """A histogram with a few (bounded) labels, for the per-RPC timings.

    ``observe`` is a ``bisect`` and two list updates. prometheus_client's
    ``Histogram.observe`` walks the buckets in Python and takes a lock per
    update, which is a measurable share of a proxy hop that costs well under a
    millisecond. Only the event loop observes; a scrape copies each row.
    """

    def __init__(
        self, name: str, documentation: str, labels: list[str], buckets: tuple[float, ...]
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = labels
        self._bounds = list(buckets)
        self._le = [repr(float(b)) for b in buckets] + ["+Inf"]
        # Per label values: one count per bucket (+Inf last), then the sum.
        self._rows: dict[tuple[str, ...], list[float]] = {}

    def observe(self, label_values: tuple[str, ...], amount: float) -> None:
        """Count one observation of ``amount`` seconds."""
        row = self._rows.get(label_values)
        if row is None:
            if len(label_values) != len(self._labels):
                raise ValueError(f"{self._name}: expected labels {self._labels}")
            row = self._rows[label_values] = [0] * (len(self._bounds) + 1) + [0.0]
        # bisect_left: the first bucket whose upper bound is >= amount ("le").
        row[bisect.bisect_left(self._bounds, amount)] += 1
        row[-1] += amount

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        for label_values, row in list(self._rows.items()):
            snapshot = list(row)  # one atomic copy: counts and sum agree
            cumulative = itertools.accumulate(snapshot[:-1])
            family.add_metric(
                list(label_values),
                buckets=list(zip(self._le, (float(c) for c in cumulative), strict=True)),
                sum_value=snapshot[-1],
            )
        yield family


NameOf = Callable[[int], str]


#: Class indices below this get a dense index -> slot table per namer (2
#: bytes each); larger ones, from wide outputs, are looked up by value.
_DENSE_CLASSES = 4096
#: Wide class indices remembered per namer (each with a name of its own).
_SPARSE_MAX = 1024
#: Label tables (namers) whose index -> slot lookups one output keeps: one
#: per rule set in steady traffic, a few across reloads.
_NAMERS_MAX = 8


class _Slots:
    """Which ``class`` slot each class index of one namer (label table) has."""

    __slots__ = ("dense", "sparse")

    def __init__(self) -> None:
        self.dense = np.full(0, -1, dtype=np.int16)  # index -> slot, -1 = unseen
        self.sparse: dict[int, int] = {}  # indices past _DENSE_CLASSES that got a name

    def of(self, present: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The slots of sorted class indices ``present``, -1 where unseen."""
        slots = np.full(present.size, -1, dtype=np.int64)
        dense = present < self.dense.size
        slots[dense] = self.dense[present[dense]]
        if self.sparse:
            known = np.fromiter(self.sparse, dtype=np.int64, count=len(self.sparse))
            at = np.searchsorted(present, known)
            found = at < present.size
            found[found] = present[at[found]] == known[found]
            slots[at[found]] = np.fromiter(self.sparse.values(), np.int64)[found]
        return slots

    def keep(self, cls: int, slot: int) -> None:
        if cls < _DENSE_CLASSES:
            if cls >= self.dense.size:
                grown = np.full(min(max(cls + 1, 2 * self.dense.size), _DENSE_CLASSES), -1,
                                dtype=np.int16)  # fmt: skip
                grown[: self.dense.size] = self.dense
                self.dense = grown
            self.dense[cls] = slot
        elif len(self.sparse) < _SPARSE_MAX:
            self.sparse[cls] = slot


class _ClassCounts:
    """Per-class counts of one output, accumulated in numpy, with bounded names.

    The first ``cap`` distinct class names, in the order they were first
    predicted, get their own ``class`` label value; later ones share
    ``__other__``. A class is known by its name, which its namer (the label
    table of the rule that counted it) gives its index: two rule sets or two
    models under one series (``__other__``) never mix their indices up.
    Predictions are queued and folded in batches: one ``bincount`` (or, for
    very wide outputs, one ``unique``) per batch, not one counter increment
    per class; memory is bounded by ``cap`` and the namers kept, whatever
    the class indices.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.names: list[str] = []
        self.counts = np.zeros(cap + 1, dtype=np.int64)  # the last slot is __other__
        self._slot_of_name: dict[str, int] = {}
        self._slots: dict[NameOf, _Slots] = {}
        self.pending: list[tuple[np.ndarray[Any, Any], NameOf]] = []

    def fold(self) -> None:
        """Count the queued predictions, in order, naming new classes as they come."""
        i = 0
        while i < len(self.pending):
            # Consecutive batches share a name_of (one per rule set): fold them together.
            name_of = self.pending[i][1]
            j = i + 1
            while j < len(self.pending) and self.pending[j][1] is name_of:
                j += 1
            run = [a for a, _ in self.pending[i:j]]
            self._add(np.concatenate(run) if len(run) > 1 else run[0], name_of)
            i = j
        self.pending.clear()

    def _add(self, classes: np.ndarray[Any, Any], name_of: NameOf) -> None:
        if not classes.size:
            return
        first = None
        if int(classes.max()) < _DENSE_CLASSES:
            per_class = np.bincount(classes)
            present = np.flatnonzero(per_class)
            counted = per_class[present]
        else:  # a bincount would be as long as the largest index
            present, first, counted = np.unique(classes, return_index=True, return_counts=True)
        table = self._slots.get(name_of)
        if table is None:
            if len(self._slots) >= _NAMERS_MAX:
                self._slots.clear()
            table = self._slots[name_of] = _Slots()
        slots = table.of(present)
        unseen = np.flatnonzero(slots < 0)
        if unseen.size:
            self._name(classes, first, present, unseen, slots, table, name_of)
        np.add.at(self.counts, slots, counted)

    def _name(
        self,
        classes: np.ndarray[Any, Any],
        first: np.ndarray[Any, Any] | None,
        present: np.ndarray[Any, Any],
        unseen: np.ndarray[Any, Any],
        slots: np.ndarray[Any, Any],
        table: _Slots,
        name_of: NameOf,
    ) -> None:
        """Give the unseen classes their slots, in the order first predicted.
        A dense index is named once per namer; of the wide ones, at most
        ``2 * cap`` a batch (the names are full after ``cap``), the rest
        counting as ``__other__`` at numpy speed, remembered nowhere."""
        order = unseen
        if len(self.names) < self.cap:
            if first is None:  # where each class was first predicted, by class
                first = np.unique(classes, return_index=True)[1]
            order = unseen[np.argsort(first[unseen], kind="stable")]
        wide = present[order] >= _DENSE_CLASSES
        order = order[~wide | (np.cumsum(wide) <= 2 * self.cap)]
        for pos in order:
            cls = int(present[pos])
            name = name_of(cls)
            slot = self._slot_of_name.get(name)
            if slot is None:
                slot = self.cap
                if len(self.names) < self.cap:
                    slot = self._slot_of_name[name] = len(self.names)
                    self.names.append(name)
            slots[pos] = slot
            if slot < self.cap or cls < _DENSE_CLASSES:
                table.keep(cls, slot)
        slots[slots < 0] = self.cap

    def samples(self) -> list[tuple[str, int]]:
        """(class label value, count) for every class seen (fold first)."""
        out = [(n, int(c)) for n, c in zip(self.names, self.counts, strict=False)]
        if self.counts[self.cap]:
            out.append((OTHER, int(self.counts[self.cap])))
        return out


class PredictedClassCounter(Collector):
    """``guard_predicted_class_total``, fed by numpy (see :class:`_ClassCounts`)."""

    def __init__(self, cap: int) -> None:
        self.before_collect: Callable[[], None] = _nothing
        """Called before a scrape reads the counts (the lanes' queue flushes)."""
        self._cap = cap
        self._data: dict[tuple[str, str, str], _ClassCounts] = {}
        self._queued = _Queued()
        self._lock = threading.Lock()

    def add(
        self,
        labels: tuple[str, str, str],
        classes: np.ndarray[Any, Any],
        name_of: NameOf,
    ) -> None:
        """Count predictions: ``classes`` holds class indices (non-negative integers),
        one per prediction. It must not be modified afterwards."""
        with self._lock:
            entry = self._data.get(labels)
            if entry is None:
                entry = self._data[labels] = _ClassCounts(self._cap)
            entry.pending.append((classes, name_of))
            if self._queued.add(classes.size):
                self._fold()

    def _fold(self) -> None:
        for entry in self._data.values():
            entry.fold()
        self._queued.reset()

    def forget(self, keep: frozenset[str]) -> None:
        """Drop the series of models not in ``keep`` (retired by a reload)."""
        with self._lock:
            _drop_models(self._data, keep)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "guard_predicted_class",
            "Predicted classes (the label, else the class index), capped per output; "
            "later new classes count as __other__.",
            labels=["model", "signature", "output", "class"],
        )
        self.before_collect()
        with self._lock:
            self._fold()
            items = [(k, v.samples()) for k, v in self._data.items()]
        for labels, samples in items:
            for name, count in samples:
                family.add_metric([*labels, name], count)
        yield family


#: ``guard_output_entropy`` buckets: coarse below 0.9, fine up to 1 (an
#: untrained 201-way softmax sits at 0.99+).
ENTROPY_BUCKETS: tuple[float, ...] = (
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99,
    0.995, 0.999, 1.0,
)  # fmt: skip


class _EntropySeries:
    """One output's entropy counts: buckets (+Inf last), sum, near-uniform rows."""

    __slots__ = ("buckets", "classes", "near_uniform", "pending", "threshold", "total")

    def __init__(self, n_buckets: int) -> None:
        self.buckets = np.zeros(n_buckets + 1, dtype=np.int64)
        self.total = 0.0
        self.near_uniform = 0
        self.classes = 0
        self.threshold = 1.0
        self.pending: list[np.ndarray[Any, Any]] = []


class EntropyHistogram(Collector):
    """``guard_output_entropy``, ``guard_near_uniform_rows_total`` and
    ``guard_output_classes``.

    ``observe`` queues each row's entropy (measured by the caller, in the
    response's pass); queued values are folded into the buckets in one
    ``searchsorted`` + ``bincount`` per output, as in
    :class:`OutputValueHistogram`.
    """

    def __init__(self, edges: tuple[float, ...] = ENTROPY_BUCKETS) -> None:
        self._edges = np.asarray(edges, dtype=np.float64)
        self._le = [repr(float(e)) for e in edges] + ["+Inf"]
        self._data: dict[tuple[str, str, str], _EntropySeries] = {}
        self._queued = _Queued()
        self._lock = threading.Lock()

    def observe(
        self,
        labels: tuple[str, str, str],
        entropy: np.ndarray[Any, Any],
        classes: int,
        near_uniform: float,
    ) -> None:
        """Count each row's normalised ``entropy`` (NaN: a row without one) of
        an output with ``classes`` per row. ``entropy`` must not be modified."""
        with self._lock:
            series = self._data.get(labels)
            if series is None:
                series = self._data[labels] = _EntropySeries(self._edges.size)
            if series.pending and series.threshold != near_uniform:
                self._fold()  # a reload changed the threshold: count the rows before
            series.threshold = near_uniform
            series.classes = classes
            series.pending.append(entropy)
            if self._queued.add(entropy.size):
                self._fold()

    def _fold(self) -> None:
        for series in self._data.values():
            if not series.pending:
                continue
            queue = series.pending
            series.pending = []
            h = np.concatenate(queue) if len(queue) > 1 else queue[0]
            h = h[~np.isnan(h)]
            idx = np.searchsorted(self._edges, h, side="left")
            series.buckets += np.bincount(idx, minlength=self._edges.size + 1)
            series.total += float(h.sum())
            series.near_uniform += int(np.count_nonzero(h >= series.threshold))
        self._queued.reset()

    def forget(self, keep: frozenset[str]) -> None:
        """Drop the series of models not in ``keep`` (retired by a reload)."""
        with self._lock:
            _drop_models(self._data, keep)

    def collect(self) -> Iterator[Metric]:
        labelnames = ["model", "signature", "output"]
        histogram = HistogramMetricFamily(
            "guard_output_entropy",
            "Each row's normalised entropy H/ln(classes) of a multi-class output, "
            "0 one-hot to 1 uniform.",
            labels=labelnames,
        )
        near = CounterMetricFamily(
            "guard_near_uniform_rows",
            "Rows whose normalised entropy is at or above near_uniform_entropy.",
            labels=labelnames,
        )
        classes = GaugeMetricFamily(
            "guard_output_classes", "Classes per row of a multi-class output.", labels=labelnames
        )
        with self._lock:
            self._fold()
            items = [
                (k, s.buckets.copy(), s.total, s.near_uniform, s.classes)
                for k, s in self._data.items()
            ]
        for key, counts, total, near_uniform, n_classes in items:
            cumulative = np.cumsum(counts)
            histogram.add_metric(
                list(key),
                buckets=list(zip(self._le, (float(x) for x in cumulative), strict=True)),
                sum_value=total,
            )
            near.add_metric(list(key), near_uniform)
            classes.add_metric(list(key), n_classes)
        yield histogram
        yield near
        yield classes


#: Fractions below this are raised to it before the PSI's logarithm: an empty
#: bin on either side would otherwise make the index infinite.
PSI_EPSILON = 1e-4
#: Rows the window must hold before its PSI is exported.
PSI_MIN_ROWS = 100


def psi(actual: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> float:
    """Population stability index of two fraction vectors (bins alike), each
    fraction raised to :data:`PSI_EPSILON` first."""
    a = np.maximum(actual, PSI_EPSILON)
    e = np.maximum(expected, PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


#: Rows all drift windows together may hold (2 bytes each): a hundred
#: outputs at the default drift_window, or eight at the largest. A window
#: past it is not made, and its output reports no PSI (logged once).
DRIFT_ROWS_MAX = 8 * 1024 * 1024


class _Window:
    """The bins of one output's last ``size`` confidences, in a numpy ring,
    with each bin's count kept as rows come and go: a scrape reads the
    counts, not the rows (0.76 s a scrape for 150 windows of a million,
    with the event loop waiting on the lock)."""

    __slots__ = ("baseline", "counts", "edges", "expected", "filled", "ring", "start")

    def __init__(self, size: int, baseline: tuple[tuple[float, ...], tuple[float, ...]]):
        self.baseline = baseline
        self.edges = np.asarray(baseline[0], np.float64)
        self.expected = np.asarray(baseline[1], np.float64)
        # Bins 0..len(edges), then one for NaN and infinities (not in the PSI).
        self.counts = np.zeros(self.edges.size + 2, dtype=np.int64)
        self.ring = np.empty(size, dtype=np.uint16)  # baselines have at most 1,001 bins
        self.start = 0
        self.filled = 0

    def push(self, values: np.ndarray[Any, Any]) -> None:
        size = self.ring.size
        v = values.ravel()[-size:]
        bins = np.searchsorted(self.edges, v, side="left").astype(np.uint16)
        bins[~np.isfinite(v)] = self.edges.size + 1
        end = self.start + v.size
        head = min(end, size) - self.start
        wrapped = v.size - head  # rows written at the ring's start, over earlier rows
        if self.filled == size:  # the rows overwritten leave their bins
            self._forget(self.ring[self.start : self.start + head])
        if wrapped:
            self._forget(self.ring[:wrapped])
        self.ring[self.start : self.start + head] = bins[:head]
        self.ring[:wrapped] = bins[head:]
        self.counts += np.bincount(bins, minlength=self.counts.size)
        self.start = end % size
        self.filled = min(size, self.filled + v.size)

    def _forget(self, bins: np.ndarray[Any, Any]) -> None:
        if bins.size:
            self.counts -= np.bincount(bins, minlength=self.counts.size)

    def psi(self) -> float | None:
        if self.filled < min(PSI_MIN_ROWS, self.ring.size):
            return None
        finite = self.counts[:-1]
        total = int(finite.sum())
        if not total:
            return None
        return psi(finite / total, self.expected)


class DriftGauge(Collector):
    """``guard_output_drift_psi``: the PSI of each output's recent confidences
    against its baseline, from counts kept as rows arrive. Windows hold at
    most :data:`DRIFT_ROWS_MAX` rows together, and none is kept for the
    ``__other__`` output series (outputs past the label caps, mixed)."""

    def __init__(self, rows_max: int = DRIFT_ROWS_MAX) -> None:
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._rows = 0
        self._rows_max = rows_max
        self._refused = False
        self._lock = threading.Lock()

    def observe(
        self,
        labels: tuple[str, str, str],
        values: np.ndarray[Any, Any],
        baseline: tuple[tuple[float, ...], tuple[float, ...]],
        size: int,
    ) -> None:
        """Push ``values`` (one confidence per row) into the output's window."""
        with self._lock:
            window = self._windows.get(labels)
            if window is None or window.ring.size != size or window.baseline != baseline:
                # A reload that changes the baseline or the window starts afresh.
                window = self._window(labels, size, baseline, window)
                if window is None:
                    return
            window.push(values)

    def _window(
        self,
        labels: tuple[str, str, str],
        size: int,
        baseline: tuple[tuple[float, ...], tuple[float, ...]],
        old: _Window | None,
    ) -> _Window | None:
        if old is not None:
            self._rows -= old.ring.size
            del self._windows[labels]
        if labels[2] == OTHER or self._rows + size > self._rows_max:
            if labels[2] != OTHER and not self._refused:
                self._refused = True
                logger.warning(
                    "no drift window for model %r output %r: the windows hold %d of the %d "
                    "rows they may; lower drift_window", labels[0], labels[2], self._rows,
                    self._rows_max,
                )  # fmt: skip
            return None
        self._rows += size
        window = self._windows[labels] = _Window(size, baseline)
        return window

    def forget(self, keep: frozenset[str]) -> None:
        """Drop the windows of models not in ``keep`` (retired by a reload),
        and their rows."""
        with self._lock:
            for window in _drop_models(self._windows, keep):
                self._rows -= window.ring.size
                self._refused = False  # the next window refused is news again

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "guard_output_drift_psi",
            "Population stability index of the last drift_window confidences against the "
            "configured baseline.",
            labels=["model", "signature", "output"],
        )
        with self._lock:
            values = [(k, w.psi()) for k, w in self._windows.items()]
        for key, value in values:
            if value is not None:
                family.add_metric(list(key), value)
        yield family
