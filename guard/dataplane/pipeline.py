"""Guarding one PredictResponse: match rules, decode, apply, re-encode, record.

This is the data plane. It takes response bytes and returns response bytes;
it knows the wire views, the rule engine and the metrics, but not gRPC.
Responses are returned byte-identical unless a rule changed or added a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.control.config import ANY, SERVING_DEFAULT, Config, ModelRule, OutputRule
from guard.dataplane import wire
from guard.dataplane.errors import DecodeError, OutputShapeError, RejectedOutputError
from guard.dataplane.lanes import Lane, lane_for
from guard.dataplane.rules import OutputResult, apply_rule, label_table
from guard.metrics.guard_metrics import GuardMetrics, LoopValue, OutputRecorder

__all__ = ["GuardedResponse", "RuleBook", "guard_predict_response"]

_ACTION_RANK = {"clean": 0, "observed": 1, "clamped": 2, "rejected": 3}


@dataclass(frozen=True)
class _Compiled:
    rule: OutputRule
    labels: np.ndarray[Any, Any] | None


class _SignatureRules:
    """Rules resolved for one (model, signature): output name -> rule."""

    def __init__(self, candidates: list[ModelRule]) -> None:
        # ``candidates`` are ordered most specific first (exact model, then exact
        # signature); the first one with any match for an output wins, and within
        # it an exact output name beats ``*``.
        self._levels: list[tuple[dict[str, _Compiled], _Compiled | None]] = []
        for model_rule in candidates:
            exact: dict[str, _Compiled] = {}
            wildcard = None
            for rule in model_rule.outputs:
                compiled = _Compiled(rule, label_table(rule.labels))
                if rule.name == ANY:
                    wildcard = compiled
                else:
                    exact[rule.name] = compiled
            self._levels.append((exact, wildcard))
        self._lanes: dict[tuple[Any, ...], Lane | None] = {}

    def lane(
        self, name: str, compiled: _Compiled, values: np.ndarray[Any, Any], encoding: wire.Encoding
    ) -> Lane | None:
        """The native fast lane for this output's shape, dtype and encoding, if any."""
        key = (name, values.shape, values.dtype, encoding)
        try:
            return self._lanes[key]
        except KeyError:
            pass
        found = lane_for(name, compiled.rule, compiled.labels, values.shape, values.dtype, encoding)
        if len(self._lanes) >= _LANES_MAX:
            self._lanes.clear()  # batch sizes vary; keep the cache bounded
        self._lanes[key] = found
        return found

    def rule_for(self, output: str) -> _Compiled | None:
        for exact, wildcard in self._levels:
            found = exact.get(output)
            if found is not None:
                return found
            if wildcard is not None:
                return wildcard
        return None


_LANES_MAX = 256


class RuleBook:
    """The compiled, immutable rule set of one config. Swapped whole on reload,
    so one request always sees one consistent rule set."""

    _CACHE_LIMIT = 4096

    def __init__(self, config: Config) -> None:
        self.config = config
        self._models = config.models
        self._exact_names = config.model_names()
        self._has_wildcard_model = any(m.name == ANY for m in config.models)
        self._cache: dict[tuple[str, str], _SignatureRules | None] = {}
        self._plans: dict[tuple[Any, ...], _Plan | None] = {}

    def may_apply(self, model: str | None) -> bool:
        """Cheap pre-check before the upstream call: could any rule match this model?"""
        return self._has_wildcard_model or model in self._exact_names

    def for_signature(self, model: str, signature: str) -> _SignatureRules | None:
        """The rules for one model and signature, or ``None`` if no rule matches."""
        key = (model, signature)
        try:
            return self._cache[key]
        except KeyError:
            pass
        candidates = [
            m for m in self._models if m.name in (model, ANY) and m.signature in (signature, ANY)
        ]
        candidates.sort(key=lambda m: (m.name != ANY, m.signature != ANY), reverse=True)
        resolved = _SignatureRules(candidates) if candidates else None
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()  # clients choose model names; keep the cache bounded
        self._cache[key] = resolved
        return resolved

    def plan(
        self,
        body: bytes,
        walked: wire.Walked,
        request_spec: wire.ModelSpecInfo | None,
        metrics: GuardMetrics,
    ) -> _Plan | None:
        """The plan for responses laid out like ``walked``, if one applies."""
        spec_bytes, layout, _ = walked
        if len(layout) > _PLAN_OUTPUTS_MAX:
            return None
        # Responses of one model, version and batch size are laid out alike: the
        # offsets, and so every decision but the values' own checks, repeat.
        key = (metrics, request_spec, spec_bytes, layout)
        try:
            return self._plans[key]
        except KeyError:
            pass
        found = _make_plan(wire.read_predict_response(body, walked), request_spec, self, metrics)
        # The key holds the upstream's spec bytes and output names: only small
        # ones are kept, and so many keys at most, so the cache stays bounded.
        key_bytes = len(spec_bytes or b"") + sum([len(out[0]) for out in layout])
        if key_bytes <= _PLAN_KEY_BYTES_MAX:
            if len(self._plans) >= self._CACHE_LIMIT:
                self._plans.clear()
            self._plans[key] = found
        return found


@dataclass
class GuardedResponse:
    """The outcome of guarding one response."""

    body: bytes
    action: str
    violations: int

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """The ``x-guard-*`` trailing metadata for this response."""
        return (("x-guard-action", self.action), ("x-guard-violations", str(self.violations)))


@dataclass(frozen=True, slots=True)
class _Resolved:
    """Whose response it is, and the rules that apply to it."""

    rules: _SignatureRules
    model: str
    signature: str
    version: str
    model_label: str


def _resolve(
    spec: wire.ModelSpecInfo | None,
    request_spec: wire.ModelSpecInfo | None,
    book: RuleBook,
    metrics: GuardMetrics,
) -> _Resolved | None:
    model = (spec.name if spec and spec.name else request_spec.name if request_spec else "") or ""
    signature = (
        (spec.signature_name if spec else "")
        or (request_spec.signature_name if request_spec else "")
        or SERVING_DEFAULT
    )
    rules = book.for_signature(model, signature)
    if rules is None:
        return None
    version = str(spec.version) if spec and spec.version is not None else ""
    return _Resolved(rules, model, signature, version, metrics.model_label(model))


@dataclass(frozen=True, slots=True)
class _PlannedOutput:
    name: str
    lane: Lane
    start: int
    end: int
    size: int
    recorder: OutputRecorder
    labels: np.ndarray[Any, Any] | None


class _Plan:
    """How to guard a response of one layout when every checked output is clean.

    Made once per layout from the general path's own decisions (rules, decoding
    checks, lanes, metric series), so a clean response costs the native calls
    and little else. Anything to count sends the response down the general path.
    """

    __slots__ = ("outputs", "_clean", "_labels", "_metrics")

    def __init__(
        self,
        outputs: tuple[_PlannedOutput, ...],
        metrics: GuardMetrics,
        labels: tuple[str, str, str],
    ) -> None:
        self.outputs = outputs
        self._metrics = metrics
        self._labels = labels
        # Made on the first clean response, as the general path makes it.
        self._clean: LoopValue | None = None

    def run(self, body: bytes) -> GuardedResponse | str:
        """The guarded response, or the name of the first output with something
        to count: the general path then decides, without asking its lane again."""
        view = memoryview(body)
        done = []
        for out in self.outputs:
            found = out.lane.encode(view[out.start : out.end])
            if found is None:
                return out.name
            done.append(found)
        # Recorded only once every output was clean: otherwise the general path
        # records them all.
        for out, (classes, scores, _) in zip(self.outputs, done, strict=True):
            out.recorder.record_clean(
                out.size,
                np.frombuffer(classes, dtype=np.int64),
                np.frombuffer(scores, dtype=out.lane.dtype),
                out.labels,
            )
        clean = self._clean
        if clean is None:
            clean = self._clean = self._metrics.response_counter(*self._labels, "clean")
        clean.inc()
        return GuardedResponse(body + b"".join([entries for *_, entries in done]), "clean", 0)


_PLAN_OUTPUTS_MAX = 16
_PLAN_KEY_BYTES_MAX = 1024


def _make_plan(
    response: wire.Response,
    request_spec: wire.ModelSpecInfo | None,
    book: RuleBook,
    metrics: GuardMetrics,
) -> _Plan | None:
    """A plan for ``response``'s layout, when its checked outputs all have a
    lane and decode cleanly; ``None`` otherwise (the general path then runs,
    and raises what there is to raise)."""
    resolved = _resolve(response.spec, request_spec, book, metrics)
    if resolved is None or response.layout is None:
        return None
    budget = book.config.max_message_bytes
    outputs = []
    for name, _, _, _, offset, length in sorted(response.layout):
        compiled = resolved.rules.rule_for(name)
        if compiled is None:
            continue
        try:
            decoded = response.decode(name, budget)
        except DecodeError:
            return None
        if decoded is None:
            continue
        values, encoding = decoded
        budget -= values.nbytes
        lane = resolved.rules.lane(name, compiled, values, encoding)
        if lane is None or any(n in response.names for n in lane.names):
            return None
        if length != values.nbytes:
            return None  # values filled in by TF's convention: the general path fills

        recorder = metrics.output_recorder(
            resolved.model_label, resolved.version, resolved.signature, name
        )
        outputs.append(
            _PlannedOutput(
                name, lane, offset, offset + length, values.size, recorder, compiled.labels
            )
        )
    if not outputs:
        return None
    labels = (resolved.model_label, resolved.version, resolved.signature)
    return _Plan(tuple(outputs), metrics, labels)


def guard_predict_response(
    body: bytes,
    request_spec: wire.ModelSpecInfo | None,
    book: RuleBook,
    metrics: GuardMetrics,
) -> GuardedResponse | None:
    """Apply the matching rules to a serialized PredictResponse.

    Returns ``None`` when no rule matches (the caller returns ``body`` as is).
    Raises :class:`~guard.dataplane.errors.GuardError` (already counted) when the response
    cannot be decoded, a rule rejects it, or a rule does not fit the tensor.
    """
    walked = wire.walk_predict_response(body)
    unclean: str | None = None  # the output whose lane a plan found something to count in
    if walked is not None:
        plan = book.plan(body, walked, request_spec, metrics)
        if plan is not None:
            guarded = plan.run(body)
            if isinstance(guarded, GuardedResponse):
                return guarded
            unclean = guarded
    req_model = request_spec.name if request_spec else ""
    try:
        response = wire.read_predict_response(body, walked)
    except DecodeError:
        metrics.decode_errors.labels(metrics.model_label(req_model)).inc()
        raise
    resolved = _resolve(response.spec, request_spec, book, metrics)
    if resolved is None:
        return None
    rules, model, signature = resolved.rules, resolved.model, resolved.signature
    version, model_label = resolved.version, resolved.model_label
    # One budget for the whole response: TF's fill convention lets a few bytes
    # declare a huge tensor, and many outputs must not add up past the limit.
    budget = book.config.max_message_bytes

    action = "clean"
    violations = 0
    rejection: str | None = None
    upstream_names = response.names
    # Per output: the rule's result, and the derived outputs if the lane wrote them.
    results: list[tuple[str, OutputResult, wire.Encoding, Lane | None, bytes]] = []
    for name in sorted(upstream_names):
        compiled = rules.rule_for(name)
        if compiled is None:
            continue
        try:
            decoded = response.decode(name, budget)
        except DecodeError as exc:
            metrics.decode_errors.labels(model_label).inc()
            raise DecodeError(
                f"guard: cannot decode output '{name}' of model '{model}' from upstream: "
                f"{exc.details.removeprefix('guard: ')}"
            ) from None
        if decoded is None:
            continue  # not floating point: left untouched
        values, encoding = decoded
        budget -= values.nbytes
        lane = rules.lane(name, compiled, values, encoding)
        fast = lane.run(values) if lane is not None and name != unclean else None
        if fast is not None:
            result, lane_entries = fast
        else:
            result = apply_rule(
                values, compiled.rule, compiled.labels, model, name, known_unclean=lane is not None
            )
            lane, lane_entries = None, b""
        metrics.record_output(model_label, version, signature, name, result, compiled.labels)
        violations += result.counts.total
        if _ACTION_RANK[result.action] > _ACTION_RANK[action]:
            action = result.action
        if result.rejection and rejection is None:
            rejection = result.rejection
        results.append((name, result, encoding, lane, lane_entries))

    metrics.record_response(model_label, version, signature, action)
    if rejection is not None:
        raise RejectedOutputError(rejection)

    if not results:
        return GuardedResponse(body, "clean", 0)
    modified = any(result.changed for _, result, _, _, _ in results)
    # Derived outputs are appended as encoded map entries: protobuf merges
    # concatenated messages (map entries included), so ``body + entries`` is the
    # guarded response, and the upstream's bytes, often megabytes of floats, are
    # serialized again only when a rule changed one of its tensors.
    entries: list[bytes] = []
    for name, result, encoding, lane, lane_entries in results:
        if result.changed:
            wire.set_tensor(response.view().outputs[name], result.values, encoding)
        names = lane.names if lane is not None else [name + d.suffix for d in result.derived]
        for out_name in names:
            if out_name in upstream_names:
                raise OutputShapeError(
                    f"guard: model '{model}' output '{name}': the derived output '{out_name}' "
                    "would replace an output the model returns; drop the rule's "
                    "threshold/argmax/top_k or rename the model's output"
                )
        if lane is not None:
            entries.append(lane_entries)
        for derived in result.derived:
            entries.append(wire.encode_output(name + derived.suffix, derived.array, encoding))
    base = response.view().SerializeToString() if modified else body
    return GuardedResponse(base + b"".join(entries), action, violations)
