"""REST's native route: a one-output response that the output's lane decides.

TF Serving answers a model with one output with that tensor alone
(``{"predictions": [[0.73]]}``); restjson reads such a body in one native
scan. Its values then go to the output's lane, as a gRPC response's do: the
plan, made once per model, signature, version, shape and dtype, holds the
lane and the metric series. The lane's derived outputs are read back from
its encoded entries (tensor_content, read in place), their labels taken from
the rule's table, and written into the body by restjson, as the reference
route writes them. Whatever the lane leaves undecided (a NaN, a rejection,
a response near the size limit), the reference route decides
(:mod:`guard.server.rest.guarding`); the tests hold both to the same bytes
and metrics.

Once a plan has decided a float32 response of one shape, the next ones like
it take its express route: the scan's float32 values go to the lane as they
are, and where the lane keeps them and the ``guard_outputs`` text is
remembered, that text is spliced in after the root's value, with no response
read at all. Reading a one-value response whole (a dozen objects, three
arrays) took 4-6 us in a loop, about what the lane and the metrics took
together, and in a loaded guard the step's cost is mostly such first touches
of code and data (bench/findings.md, the fifth pass).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from guard.dataplane.book import RuleBook
from guard.dataplane.cache import BoundedCache
from guard.dataplane.codec import tensor
from guard.dataplane.codec.response import Walked
from guard.dataplane.codec.restjson import (
    Format,
    OutputKey,
    RestOutput,
    RestPredictResponse,
    Scanned,
    apply_edits,
    float32_values,
    value_edits,
)
from guard.dataplane.codec.tensor import Encoding
from guard.dataplane.dtypes import INT64
from guard.dataplane.evaluate import Target
from guard.dataplane.planned import ActionCounters, LaneOutput, lane_output
from guard.dataplane.results import Action, Array
from guard.dataplane.rules import labels_for
from guard.dataplane.sink import MetricsSink
from guard.server.rest.signatures import OutputInfo

__all__ = ["RestPlan", "express_plan", "remember_express", "rest_plan"]

# The lane's numeric entries: classes (int64) and scores (the values' dtype).
_NUMPY = {
    tensor.DT_INT64: INT64,
    **{enum: dt.numpy for enum, dt in tensor.FLOAT_DTYPES.items()},
}


@dataclass(frozen=True, slots=True, eq=False)
class RestPlan:
    """How to guard one-output responses of one model version, shape and dtype."""

    output: LaneOutput
    counters: ActionCounters
    walk: Callable[[bytes], Walked | None]
    """The kernels' walker, which reads the lane's entries back."""
    limit: int
    texts: BoundedCache[tuple[Any, ...], str]
    """The book's remembered texts: this plan's ``guard_outputs`` text for each
    format and lane entries seen, where the text is theirs alone (no scores).
    Classes and labels repeat, and writing them was half of this route's cost
    on a one-value response."""
    serial: int
    """This plan's part of its texts' keys."""

    @property
    def held(self) -> int:
        """What its lane holds (the book's plan cache weighs it)."""
        return self.output.lane.held

    @property
    def stale(self) -> bool:
        """Whether the series it counts into were dropped: it is made again."""
        return self.output.sink.stale

    def run(self, response: RestPredictResponse) -> tuple[bytes, Action, int, bool] | None:
        """The guarded body, its action and violations, and whether its
        ``guard_outputs`` text is remembered (then :meth:`express` can answer
        the next such response); ``None`` when the reference route must decide."""
        values = response.outputs[None].values
        if len(response.body) + self.output.derived > self.limit:
            return None  # the reference refuses it before deriving, and says why
        if response.guard_outputs_taken:
            return None  # the reference passes it where nothing is derived, else says why
        raw = np.ascontiguousarray(values).data.cast("B")
        lane = self.output.lane
        checked = raw if lane.activation is None else lane.checked(raw)
        found = lane.encode(checked)
        if found is None:
            return None
        made = self._text(response, found[2])
        if made is None:
            return None
        text, remembered = made
        changed = self.output.rewritten(found, checked)
        new: dict[OutputKey, Array] = {} if changed is None else {None: _as(values, changed)}
        body = response.rewrite(new, guard_outputs=text or None)
        if len(body) > self.limit:
            return None
        action, violations = self.output.record(found, checked)
        self.counters.inc(action)
        return body, action, violations, remembered

    def express(self, body: bytes, fmt: Format, scan: Scanned) -> tuple[bytes, Action, int] | None:
        """:meth:`run`'s answer where the ``guard_outputs`` text is remembered,
        made from the native ``scan`` alone, with no response read: its
        float32 values go to the lane, the values the lane repaired (clamped)
        are written over their text where the scan found it, and the text is
        spliced in where the root's value ends. ``None`` where :meth:`run`
        must decide (an activation rewrites every value)."""
        lane = self.output.lane
        values = float32_values(scan)
        if values is None or lane.activation is not None:
            return None
        if len(body) + self.output.derived > self.limit:
            return None
        found = lane.encode(values)
        if found is None:
            return None
        text = self.texts.get((self.serial, fmt, found[2]))
        if text is None:
            return None
        edits = [(scan[6], scan[6], text)]
        repaired = self.output.rewritten(found, values)
        if repaired is not None:
            edits += _repaired_edits(scan, values, repaired)
        guarded = apply_edits(body, edits)
        if len(guarded) > self.limit:
            return None
        action, violations = self.output.record(found, values)
        self.counters.inc(action)
        return guarded, action, violations

    def _text(self, response: RestPredictResponse, entries: bytes) -> tuple[str, bool] | None:
        """The ``guard_outputs`` member for the lane's ``entries``, remembered
        where it can be, and whether it is."""
        key = (self.serial, response.format, entries)
        text = self.texts.get(key)
        if text is not None:
            return text, True
        derived = self._derived(entries) if entries else []
        if derived is None:
            return None
        # A rule that derives nothing writes no member (as the reference).
        text = response.guard_outputs_text(derived) if derived else ""
        floats = any(array.dtype.kind == "f" for _, array in derived)
        kept = not floats and len(entries) <= _ENTRIES_KEPT_MAX and len(text) <= _TEXT_KEPT_MAX
        if kept:
            self.texts.put(key, text)
        return text, kept

    def _derived(self, entries: bytes) -> list[tuple[str, Array]] | None:
        """The lane's derived outputs as arrays: numbers read in place from its
        entries; each label from the classes before it, as the reference labels."""
        walked = self.walk(entries)
        if walked is None:
            return None
        items: list[tuple[str, Array]] = []
        classes: Array | None = None
        for entry in walked[1]:
            dtype = _NUMPY.get(entry.dtype)
            if dtype is None:
                if classes is None or self.output.labels is None:
                    return None
                items.append(
                    (entry.name, labels_for(classes, self.output.labels, self.output.rule))
                )
                continue
            count = math.prod(entry.shape)
            array = np.frombuffer(entries, dtype, count, entry.offset).reshape(entry.shape)
            if dtype.kind == "i":
                classes = array
            items.append((entry.name, array))
        return items


# The texts a plan remembers: of at most this many bytes of lane entries (a
# small batch's classes and labels), and at most this long.
_ENTRIES_KEPT_MAX = 512
_TEXT_KEPT_MAX = 4096


def _repaired_edits(
    scan: Scanned, values: bytearray, repaired: bytes | memoryview
) -> list[tuple[int, int, str]]:
    """The edits writing the lane's repaired float32 values over the text the scan read."""
    old, new = np.frombuffer(values, np.float32), np.frombuffer(repaired, np.float32)
    starts, ends = np.frombuffer(scan[1], INT64), np.frombuffer(scan[2], INT64)
    return value_edits(old, new, starts, ends)


def _as(values: Array, changed: bytes | memoryview) -> Array:
    """The lane's new values, shaped as the old ones."""
    return np.frombuffer(changed, values.dtype).reshape(values.shape)


def rest_plan(
    response: RestPredictResponse,
    name: str,
    info: OutputInfo | None,
    target: Target,
    book: RuleBook,
    metrics: MetricsSink,
) -> RestPlan | None:
    """The plan for ``response`` (one unnamed output, which the signature
    calls ``name`` and describes by ``info``), made on the first response
    like it; ``None`` where only the reference route applies."""
    out = response.outputs[None]
    key = (_REST, metrics, target.model, target.signature, target.version, name, info,
           out.kind, out.values.shape)  # fmt: skip
    found = book.plans.get(key, _MISSING)
    if found is _MISSING or (found is not None and found.stale):
        found = _make(out, name, info, target, book, metrics)
        dims = 0 if info is None or info.dims is None else len(info.dims)
        if len(name) + len(target.model) + len(target.signature) + dims <= _KEY_SIZE_MAX:
            book.plans.put(key, found)
    plan: RestPlan | None = found
    return plan


def express_plan(
    book: RuleBook, metrics: MetricsSink, target: Target, metadata: object, shape: tuple[int, ...]
) -> RestPlan | None:
    """The plan :func:`remember_express` kept for float32 responses of this
    shape, to this target, read with this ``metadata`` (the output's name and
    signature come from it), for :meth:`RestPlan.express`."""
    found = book.plans.get(_express_key(metrics, target, shape))
    if found is None or found.metadata is not metadata or found.plan.stale:
        return None
    plan: RestPlan = found.plan
    return plan


def remember_express(
    book: RuleBook,
    metrics: MetricsSink,
    target: Target,
    metadata: object,
    shape: tuple[int, ...],
    plan: RestPlan,
) -> None:
    """Keep ``plan``, which decided a float32 response of ``shape``, for
    :func:`express_plan`."""
    if len(target.model) + len(target.signature) + len(shape) <= _KEY_SIZE_MAX:
        book.plans.put(_express_key(metrics, target, shape), _Express(metadata, plan))


class _Express(NamedTuple):
    """An express plan, and the metadata it was made with."""

    metadata: object
    plan: RestPlan

    @property
    def held(self) -> int:
        return self.plan.held


def _express_key(metrics: MetricsSink, target: Target, shape: tuple[int, ...]) -> tuple[Any, ...]:
    return (_EXPRESS, metrics, target.model, target.signature, target.version, shape)


_REST = "rest"
_EXPRESS = "rest-express"
_MISSING: Any = object()
_KEY_SIZE_MAX = 1024  # names' characters and dimensions: bigger keys are not kept
_SERIALS = itertools.count()
_FLOAT_KINDS = ("float32", "float64")


def _make(
    out: RestOutput, name: str, info: OutputInfo | None, target: Target, book: RuleBook,
    metrics: MetricsSink,
) -> RestPlan | None:  # fmt: skip
    compiled = target.rules.rule_for(name)
    values = out.values
    if compiled is None or out.kind not in _FLOAT_KINDS:
        return None
    if info is not None and not info.fits(values.shape):
        return None  # the reference refuses it, and says why
    output = lane_output(target, name, compiled, values, Encoding.CONTENT, metrics)
    if output is None:
        return None
    counters = ActionCounters(target, metrics)
    walk = book.kernels.walk
    return RestPlan(output, counters, walk, book.max_message_bytes, book.texts, next(_SERIALS))
