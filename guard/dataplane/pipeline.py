"""Guarding one serialized PredictResponse: bytes in, bytes out.

Two routes. The native one: the kernels' walker reads the layout, a plan made
once per layout hands each output to its lane, and a clean response (or one
whose values out of range and rows off their sum the lanes count and repair,
or whose predictions abstain) costs a native call per output. The reference
one, for everything else: read the response (walked or protobuf), decode the
outputs, :func:`evaluate` them, count, and re-encode only what a rule
changed; derived outputs are appended as encoded map entries. Responses are
returned byte-identical unless a rule changed or added a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.dataplane.book import RuleBook
from guard.dataplane.codec import tensor
from guard.dataplane.codec.response import (
    ModelSpecInfo,
    OutputLayout,
    Response,
    Walked,
    read_predict_response,
)
from guard.dataplane.codec.tensor import Encoding
from guard.dataplane.errors import (
    DecodeError,
    GuardError,
    RejectedOutputError,
    ResponseTooLargeError,
    shown,
)
from guard.dataplane.evaluate import (
    OutputVerdict,
    Target,
    Verdict,
    check_derived_names,
    evaluate,
    record,
    resolve,
)
from guard.dataplane.lanes import Buffer, LaneResult
from guard.dataplane.planned import ActionCounters, LaneOutput, lane_output
from guard.dataplane.results import CLEAN, Action, Array, verdict_headers
from guard.dataplane.rulespec import SERVING_DEFAULT
from guard.dataplane.sink import MetricsSink

__all__ = ["GuardedResponse", "guard_predict_response"]


@dataclass
class GuardedResponse:
    """The outcome of guarding one response."""

    body: bytes
    action: Action
    violations: int

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """The ``x-guard-*`` trailing metadata for this response."""
        return verdict_headers(self.action, self.violations)


def guard_predict_response(
    body: bytes,
    request_spec: ModelSpecInfo | None,
    book: RuleBook,
    metrics: MetricsSink,
) -> GuardedResponse | None:
    """Apply the matching rules to a serialized PredictResponse.

    Returns ``None`` when no rule matches (the caller returns ``body`` as is).
    Raises :class:`~guard.dataplane.errors.GuardError` (already counted) when the
    response cannot be decoded, a rule rejects it, or a rule does not fit the tensor.
    """
    walked = book.kernels.walk(body)
    if walked is not None:
        plan = _plan(body, walked, request_spec, book, metrics)
        if plan is not None:
            guarded = plan.run(body)
            if guarded is not None:
                return guarded
    try:
        return _reference(body, walked, request_spec, book, metrics)
    except GuardError as exc:
        # Raised on without the frames it came through: they hold the decoded
        # outputs (TF's fill convention lets 60 bytes declare max_message_mb
        # of them), and the server's handling keeps an error in a reference
        # cycle until a full collection, which the guard holds off.
        exc.with_traceback(None)
        raise


# ------------------------------------------------------------ the reference route


def _target(
    response: Response, request_spec: ModelSpecInfo | None, book: RuleBook, metrics: MetricsSink
) -> Target | None:
    """The upstream's spec decides; the request's fills in what it lacks."""
    spec = response.spec
    if spec is not None and request_spec is not None:
        _check_answered_as_asked(spec, request_spec, metrics)
    model = (spec.name if spec and spec.name else request_spec.name if request_spec else "") or ""
    signature = (spec.signature_name if spec else "") or (
        request_spec.signature_name if request_spec else ""
    )
    version = spec.version if spec else None
    return resolve(book, model, signature, version, metrics)


def _check_answered_as_asked(
    spec: ModelSpecInfo, asked: ModelSpecInfo, metrics: MetricsSink
) -> None:
    """TF Serving answers with the request's model name, and its signature
    (``serving_default`` where it names none): an answer naming another would
    choose another model's rules (a reject rule failed open that way)."""
    signature = asked.signature_name or SERVING_DEFAULT
    if (not spec.name or spec.name == asked.name) and (
        not spec.signature_name or spec.signature_name == signature
    ):
        return
    metrics.count_decode_error(metrics.model_label(asked.name))
    raise DecodeError(
        f"guard: the upstream answered for model '{shown(spec.name)}' signature "
        f"'{shown(spec.signature_name)}', and the request asked for model "
        f"'{shown(asked.name)}' signature '{shown(signature)}'; TF Serving answers for the "
        "model and signature asked: fix the upstream, or the hop that changed the answer"
    )


def _read(
    body: bytes, walked: Walked | None, request_spec: ModelSpecInfo | None, metrics: MetricsSink
) -> Response:
    try:
        return read_predict_response(body, walked)
    except DecodeError:
        metrics.count_decode_error(metrics.model_label(request_spec.name if request_spec else ""))
        raise


_Decoded = list[tuple[str, Array, Encoding]]


def _decode_outputs(
    response: Response, target: Target, budget: int, metrics: MetricsSink
) -> _Decoded:
    """The floating-point outputs that have a rule, decoded within one budget.

    One budget for the whole response: TF's fill convention lets a few bytes
    declare a huge tensor, and many outputs must not add up past the limit.
    """
    decoded: _Decoded = []
    for name in sorted(response.names):
        if target.rules.rule_for(name) is None:
            continue
        try:
            found = response.decode(name, budget)
        except DecodeError as exc:
            metrics.count_decode_error(target.model_label)
            raise DecodeError(
                f"guard: cannot decode output '{shown(name)}' of model '{shown(target.model)}' "
                "from upstream: "
                f"{exc.details.removeprefix('guard: ')}"
            ) from None
        if found is None:
            continue  # not floating point: left untouched
        values, encoding = found
        budget -= values.nbytes
        decoded.append((name, values, encoding))
    return decoded


def _reference(
    body: bytes,
    walked: Walked | None,
    request_spec: ModelSpecInfo | None,
    book: RuleBook,
    metrics: MetricsSink,
) -> GuardedResponse | None:
    response = _read(body, walked, request_spec, metrics)
    target = _target(response, request_spec, book, metrics)
    if target is None:
        return None
    limit = book.max_message_bytes
    decoded = _decode_outputs(response, target, limit, metrics)
    room = limit - len(body)  # what the guarded response may still grow by
    verdict = evaluate(target, [(name, values) for name, values, _ in decoded], room)
    if verdict.rejection is not None:
        record(verdict, target, metrics)
        raise RejectedOutputError(verdict.rejection, verdict.violations)
    if not verdict.outputs:
        record(verdict, target, metrics)
        return GuardedResponse(body, CLEAN, 0)
    check_derived_names(verdict, response.names, target.model)
    encodings = {name: encoding for name, _, encoding in decoded}
    guarded = _encode(response, verdict, encodings)
    _check_size(guarded, limit, target)
    # Counted once the response is sure to go out as the client will see it.
    record(verdict, target, metrics)
    return GuardedResponse(guarded, verdict.action, verdict.violations)


def _check_size(guarded: bytes, limit: int, target: Target) -> None:
    """The guarded response must fit the message limit the client is sent with."""
    if len(guarded) > limit:
        raise ResponseTooLargeError(
            f"guard: model '{shown(target.model)}': the guarded response has {len(guarded)} "
            f"bytes, more than the max_message_mb limit ({limit} bytes); raise max_message_mb "
            "in the guard config, or derive less (threshold, argmax, top_k, labels)"
        )


def _encode(response: Response, verdict: Verdict, encodings: dict[str, Encoding]) -> bytes:
    """Derived outputs are appended as encoded map entries: protobuf merges
    concatenated messages (map entries included), so ``body + entries`` is the
    guarded response. A tensor a rule changed is written over its old values
    where they lie fixed-width in the bytes (same length, same place); only
    where they do not is the response, often megabytes of floats, serialized
    again by protobuf."""
    entries = [
        tensor.encode_output(out.name + derived.suffix, derived.array, encodings[out.name])
        for out in verdict.outputs
        for derived in out.result.derived
    ]
    return _rewritten(response, verdict, encodings, b"".join(entries))


def _rewritten(
    response: Response, verdict: Verdict, encodings: dict[str, Encoding], entries: bytes
) -> bytes:
    changed = [out for out in verdict.outputs if out.result.changed]
    if not changed:
        return response.data + entries
    patches: list[_Patch] = []
    for out in changed:
        span = response.span(out.name, out.result.values)
        if span is None:
            return _serialized(response, changed, encodings) + entries
        patches.append((*span, _little_endian(out.result.values)))
    return _patched(response.data, patches, entries)


#: Bytes ``[start, end)`` of a response to be replaced by as many new ones.
_Patch = tuple[int, int, bytes | memoryview]


def _patched(data: bytes, patches: list[_Patch], tail: bytes) -> bytes:
    """``data`` with each patch written over its span (same length, same
    place: fixed-width values), then ``tail``; one copy in all."""
    view, at = memoryview(data), 0
    pieces: list[bytes | memoryview] = []
    for start, end, new in sorted(patches, key=lambda patch: patch[0]):
        pieces += [view[at:start], new]
        at = end
    pieces += [view[at:], tail]
    return b"".join(pieces)


def _serialized(
    response: Response, changed: list[OutputVerdict], encodings: dict[str, Encoding]
) -> bytes:
    view = response.view()
    for out in changed:
        tensor.set_tensor(view.outputs[out.name], out.result.values, encodings[out.name])
    return bytes(view.SerializeToString())


def _little_endian(values: Array) -> bytes:
    return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()


# --------------------------------------------------------------- the native route


@dataclass(frozen=True, slots=True)
class _PlannedOutput:
    """A planned output, and where its values lie in responses of this layout."""

    start: int
    end: int
    output: LaneOutput


class _Plan:
    """How to guard a response of one layout when the lanes can decide it.

    Made once per layout from the reference route's own decisions (rules,
    decoding checks, lanes, metric series), so a response the lanes decide
    (clean, or with values out of range and rows off their sum that they
    counted, and repaired where the rule says) costs the native calls and
    little else. Anything else sends the response down the reference route.
    """

    __slots__ = ("outputs", "_counters", "_limit", "_derived", "_sink")

    def __init__(
        self, outputs: tuple[_PlannedOutput, ...], counters: ActionCounters, limit: int
    ) -> None:
        self.outputs = outputs
        self._counters = counters
        self._limit = limit
        self._derived = sum(out.output.derived for out in outputs)
        self._sink = outputs[0].output.sink  # all of one model version

    @property
    def stale(self) -> bool:
        """Whether the series it counts into were dropped: it is made again."""
        return self._sink.stale

    @property
    def held(self) -> int:
        """What its lanes hold (the book's plan cache weighs it)."""
        return sum(out.output.lane.held for out in self.outputs)

    def run(self, body: bytes) -> GuardedResponse | None:
        """The guarded response, or ``None`` when a lane leaves it to the reference."""
        if len(body) + self._derived > self._limit:
            # The reference refuses derived outputs that could take the response
            # past the limit before it makes them (evaluate): it says why.
            return None
        view = memoryview(body)
        done = []
        rewrites = False
        # Per call on every response: the clean case stays a few attribute reads.
        for out in self.outputs:
            raw = view[out.start : out.end]
            lane = out.output.lane
            checked = raw if lane.activation is None else lane.checked(raw)
            found = lane.encode(checked)
            if found is None:
                return None
            rewrites = rewrites or checked is not raw or len(found) == 4
            done.append((found, checked))
        entries = b"".join([found[2] for found, _ in done])
        patches = self._patches(done) if rewrites else []
        # Nothing to write over nor add (a rule that only observes): the body as it came.
        guarded = _patched(body, patches, entries) if patches else body + entries
        if len(guarded) > self._limit:
            return None  # the reference route refuses it, and says why
        # Recorded only once every lane decided: otherwise the reference
        # route records them all.
        action, violations = CLEAN, 0
        for out, (found, checked) in zip(self.outputs, done, strict=True):
            acted, counted = out.output.record(found, checked)
            action = max(action, acted)
            violations += counted
        self._counters.inc(action)
        return GuardedResponse(guarded, action, violations)

    def _patches(self, done: list[tuple[LaneResult, Buffer]]) -> list[_Patch]:
        """Each clamped or activated output's new values, over its old ones."""
        patches = []
        for out, (found, checked) in zip(self.outputs, done, strict=True):
            new = out.output.rewritten(found, checked)
            if new is not None:
                patches.append((out.start, out.end, new))
        return patches


_PLAN_OUTPUTS_MAX = 16
_PLAN_KEY_BYTES_MAX = 1024


def _plan(
    body: bytes,
    walked: Walked,
    request_spec: ModelSpecInfo | None,
    book: RuleBook,
    metrics: MetricsSink,
) -> _Plan | None:
    """The plan for responses laid out like ``walked``, if one applies.

    Responses of one model, version and batch size are laid out alike: the
    offsets, and so every decision but the values' own checks, repeat. The key
    holds the upstream's spec bytes and output names: only small ones are
    kept, so the cache stays bounded.
    """
    spec_bytes, layout, _ = walked
    key = (metrics, request_spec, spec_bytes, layout)
    found: _Plan | None | object = book.plans.get(key, _MISSING)
    if found is None or (isinstance(found, _Plan) and not found.stale):
        return found
    if len(layout) > _PLAN_OUTPUTS_MAX:
        return None
    plan = _make_plan(read_predict_response(body, walked), request_spec, book, metrics)
    if _key_bytes(spec_bytes, layout) <= _PLAN_KEY_BYTES_MAX:
        book.plans.put(key, plan)
    return plan


_MISSING = object()


def _key_bytes(spec_bytes: bytes | None, layout: tuple[OutputLayout, ...]) -> int:
    return len(spec_bytes or b"") + sum([len(out.name) for out in layout])


class _NoPlan(Exception):
    """This layout cannot have a plan: the reference route decides every time."""


def _make_plan(
    response: Response,
    request_spec: ModelSpecInfo | None,
    book: RuleBook,
    metrics: MetricsSink,
) -> _Plan | None:
    """A plan for ``response``'s layout, when its checked outputs all have a
    lane and decode cleanly; ``None`` otherwise (the reference route then
    runs, and raises what there is to raise)."""
    target = _target(response, request_spec, book, metrics)
    if target is None or response.layout is None:
        return None
    budget = book.max_message_bytes
    room = budget - len(response.data)  # what derived outputs may take, as the reference's
    outputs = []
    try:
        for out in sorted(response.layout):
            planned = _plan_output(response, target, out, budget, room, metrics)
            if planned is not None:
                budget -= planned.end - planned.start
                room -= planned.output.derived
                outputs.append(planned)
    except _NoPlan:
        return None
    if not outputs:
        return None
    return _Plan(tuple(outputs), ActionCounters(target, metrics), book.max_message_bytes)


def _plan_output(
    response: Response,
    target: Target,
    out: OutputLayout,
    budget: int,
    room: int,
    metrics: MetricsSink,
) -> _PlannedOutput | None:
    """One output's part of a plan; ``None`` when it has no rule or is not
    floating point. Raises :class:`_NoPlan` when the layout cannot have one.

    Checked before the lane is made (and kept in the rule book's cache): the
    values lie in the bytes as they are (not filled in by TF's convention,
    where a few bytes declare any shape), and the derived outputs fit the
    ``room`` the response leaves (else the reference route refuses it)."""
    compiled = target.rules.rule_for(out.name)
    if compiled is None:
        return None
    try:
        decoded = response.decode(out.name, budget)
    except DecodeError:
        raise _NoPlan from None
    if decoded is None:
        return None
    values, encoding = decoded
    if out.length != values.nbytes:
        raise _NoPlan  # values filled in by TF's convention: the reference route fills
    if compiled.derived_bytes(values.shape, values.itemsize) > room:
        raise _NoPlan  # the reference route refuses it, and says why
    output = lane_output(target, out.name, compiled, values, encoding, metrics)
    if output is None or any(n in response.names for n in output.lane.names):
        raise _NoPlan
    return _PlannedOutput(out.offset, out.offset + out.length, output)
