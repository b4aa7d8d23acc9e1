"""Guarding one REST predict response: the JSON body in, the guarded body out.

The same protocol-neutral steps as gRPC's (:mod:`guard.dataplane.evaluate`):
resolve the target, decode the outputs that have a rule, evaluate, count.
Decoding and encoding are :mod:`guard.dataplane.codec.restjson`'s: values
are read in place, and the body is returned byte-identical unless a rule
changed a value or derived an output. A one-output response goes to its
output's lane first (:mod:`guard.server.rest.plan`), as over gRPC; what the
lane leaves undecided takes these steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

from guard.dataplane.book import RuleBook
from guard.dataplane.codec.restjson import (
    NUMBER_BYTES,
    Format,
    OutputKey,
    RestJsonError,
    RestPredictResponse,
    Scanned,
    numbers_at_most,
    read_predict_response,
    scan_single_output,
)
from guard.dataplane.errors import (
    DecodeError,
    OutputShapeError,
    RejectedOutputError,
    ResponseTooLargeError,
    shown,
)
from guard.dataplane.evaluate import Target, Verdict, check_derived_names, evaluate, record, resolve
from guard.dataplane.kernels import Kernels
from guard.dataplane.results import CLEAN, Action, Array, verdict_headers
from guard.dataplane.sink import MetricsSink
from guard.server.rest.plan import express_plan, remember_express, rest_plan
from guard.server.rest.signatures import Metadata, OutputInfo

__all__ = ["RestGuarded", "RestRequest", "guard_rest_response"]

_FLOAT_KINDS = ("float32", "float64")
_FLOAT_DTYPES = frozenset({"DT_FLOAT", "DT_DOUBLE", "DT_HALF", "DT_BFLOAT16"})


@dataclass(frozen=True, slots=True)
class RestRequest:
    """Whose response it is: from the URL, the request body and the metadata."""

    model: str
    signature: str
    format: Format
    metadata: Metadata


class RestGuarded(NamedTuple):
    """A guarded response body and what the guard did."""

    body: bytes
    action: Action
    violations: int

    def headers(self) -> tuple[tuple[str, str], ...]:
        """The ``x-guard-*`` headers of this response."""
        return verdict_headers(self.action, self.violations)


def guard_rest_response(
    body: bytes, request: RestRequest, book: RuleBook, metrics: MetricsSink
) -> RestGuarded | None:
    """Apply the matching rules to a REST predict response body.

    Returns ``None`` when no rule matches (the body goes back as is). Raises
    :class:`~guard.dataplane.errors.GuardError` when the body cannot be read,
    a rule rejects it, or a rule does not fit its tensor.
    """
    target = resolve(book, request.model, request.signature, request.metadata.version, metrics)
    if target is None:
        return None
    _check_numbers(body, target, book)
    native = book.kernels.number_scan
    single = None if native is None else scan_single_output(body, request.format, native)
    if single is not None:
        express = _express(body, single, request, target, book, metrics)
        if express is not None:
            return express
    response = _read(body, request, target, metrics, book.kernels, single)
    names = _output_names(response, request, target)
    if response.unnamed:
        by_lane = _by_lane(response, names[None], request, target, book, metrics)
        if by_lane is not None:
            return by_lane
    decoded = _decoded(response, names, request, target)
    limit = book.max_message_bytes
    verdict = evaluate(target, [(names[key], values) for key, values in decoded], limit - len(body))
    if verdict.rejection is not None:
        record(verdict, target, metrics)
        raise RejectedOutputError(verdict.rejection, verdict.violations)
    if not verdict.outputs:
        record(verdict, target, metrics)
        return RestGuarded(body, CLEAN, 0)
    check_derived_names(verdict, set(names.values()), target.model)
    guarded = _rewrite(response, verdict, {names[key]: key for key, _ in decoded}, target)
    if len(guarded) > limit:
        raise ResponseTooLargeError(
            f"guard: model '{shown(target.model)}': the guarded response has {len(guarded)} "
            f"bytes, more than the max_message_mb limit ({limit} bytes); raise max_message_mb "
            "in the guard config, or derive less (threshold, argmax, top_k, labels)"
        )
    record(verdict, target, metrics)
    return RestGuarded(guarded, verdict.action, verdict.violations)


def _by_lane(
    response: RestPredictResponse,
    name: str,
    request: RestRequest,
    target: Target,
    book: RuleBook,
    metrics: MetricsSink,
) -> RestGuarded | None:
    """The native route (:mod:`guard.server.rest.plan`), where it decides."""
    if response.guard_outputs_taken:
        return None  # the lane would write a second one; the reference says why, or passes it
    info = (_signature_outputs(request, target) or {}).get(name)
    plan = rest_plan(response, name, info, target, book, metrics)
    found = None if plan is None else plan.run(response)
    if found is None:
        return None
    body, action, violations, remembered = found
    out = response.outputs[None]
    if plan is not None and remembered and out.kind == "float32":
        # Its text is remembered: the next response like it may need no read.
        remember_express(book, metrics, target, request.metadata, out.values.shape, plan)
    return RestGuarded(body, action, violations)


def _express(
    body: bytes,
    single: Scanned,
    request: RestRequest,
    target: Target,
    book: RuleBook,
    metrics: MetricsSink,
) -> RestGuarded | None:
    """The answer of a one-output float32 response that a plan already made
    decides from its scan alone (:meth:`~guard.server.rest.plan.RestPlan.express`)."""
    plan = express_plan(book, metrics, target, request.metadata, single[5])
    found = None if plan is None else plan.express(body, request.format, single)
    return None if found is None else RestGuarded(*found)


def _check_numbers(body: bytes, target: Target, book: RuleBook) -> None:
    """Numbers read from text take NUMBER_BYTES each: a body that may hold more
    than ``max_message_mb`` of them is refused before any is read (sixteen
    times its size for a body of one-digit integers). A body too short to
    hold that many (each number but the last takes a separator) is not counted."""
    limit = book.max_message_bytes
    enough = limit // NUMBER_BYTES
    if len(body) // 2 + 1 <= enough:
        return
    bound = book.kernels.numbers_at_most
    numbers = bound(body, enough) if bound is not None else numbers_at_most(body, enough)
    if numbers > enough:
        raise ResponseTooLargeError(
            f"guard: model '{shown(target.model)}': the REST predict response may hold "
            f"{numbers} numbers, and reading them from text takes "
            f"{NUMBER_BYTES} bytes each, more than max_message_mb ({limit} bytes) allows; "
            "raise max_message_mb in the guard config, or send smaller batches"
        )


def _read(
    body: bytes,
    request: RestRequest,
    target: Target,
    metrics: MetricsSink,
    kernels: Kernels,
    single: Scanned | None,
) -> RestPredictResponse:
    try:
        return read_predict_response(
            body,
            request.format,
            kernels.number_scan,
            single,
            kernels.rest_writer,
            kernels.value_skip,
        )
    except (RestJsonError, RecursionError) as exc:
        metrics.count_decode_error(target.model_label)
        reason = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise DecodeError(
            f"guard: cannot read the REST predict response of model '{shown(target.model)}' "
            f"from upstream: {reason}"
        ) from None


def _signature_outputs(request: RestRequest, target: Target) -> dict[str, OutputInfo] | None:
    return request.metadata.signatures.get(target.signature)


def _output_names(
    response: RestPredictResponse, request: RestRequest, target: Target
) -> dict[OutputKey, str]:
    """Each output's name; a single unnamed output gets its signature's one output alias."""
    names: dict[OutputKey, str] = {key: key for key in response.outputs if key is not None}
    if None in response.outputs:
        names[None] = _unnamed_output(request, target)
    return names


def _unnamed_output(request: RestRequest, target: Target) -> str:
    outputs = _signature_outputs(request, target)
    if outputs is not None and len(outputs) == 1:
        (alias,) = outputs
        return alias
    problem = request.metadata.problem
    if problem is None and outputs is None:
        problem = f"the model has no signature '{shown(target.signature)}'"
    elif problem is None:
        problem = f"its signature '{shown(target.signature)}' has {len(outputs or ())} outputs"
    raise DecodeError(
        f"guard: model '{shown(target.model)}': the REST response does not name its output, "
        f"and the guard cannot learn the name from the upstream's metadata: {problem}"
    )


def _decoded(
    response: RestPredictResponse,
    names: Mapping[OutputKey, str],
    request: RestRequest,
    target: Target,
) -> list[tuple[OutputKey, Array]]:
    """The floating-point outputs that have a rule (others are left untouched), by name."""
    found: list[tuple[OutputKey, Array]] = []
    signature = _signature_outputs(request, target) or {}
    for key in sorted(response.outputs, key=lambda k: names[k]):
        out = response.outputs[key]
        name = names[key]
        if target.rules.rule_for(name) is None:
            _check_not_a_ruled_name(name, signature, target)
            continue
        info = signature.get(name)
        if out.kind not in _FLOAT_KINDS:
            if info is None:
                _refuse_undeclared(out.kind, request, target, name)
            _check_not_declared_float(out.kind, info, target.model, name)
            continue
        if info is not None:
            _check_shape(out.values, info, target.model, name)
        found.append((key, out.values))
    return found


def _check_not_a_ruled_name(name: str, signature: Mapping[str, OutputInfo], target: Target) -> None:
    """An output the signature does not declare, named as one it does that a
    rule applies to but for case (``P`` for ``p``): Go's encoding/json reads
    it as that output, which would pass unchecked."""
    if not signature or name in signature:
        return
    for declared in signature:
        if declared.casefold() == name.casefold() and target.rules.rule_for(declared):
            raise OutputShapeError(
                f"guard: model '{shown(target.model)}' output '{shown(name)}': the signature "
                f"does not declare it, and declares '{shown(declared)}', which a rule applies "
                "to; readers that ignore case (Go's encoding/json) read one for the other, so "
                "the guard cannot check it: fix the upstream"
            )


def _refuse_undeclared(kind: str, request: RestRequest, target: Target, name: str) -> NoReturn:
    """A ruled output that is not floating-point numbers, whose dtype the
    metadata does not tell: integers for a float (``2`` for ``2.0``) or
    strings would pass unchecked, as they did when the metadata was 404."""
    problem = request.metadata.problem
    if problem is None:
        sig = shown(target.signature)
        has = _signature_outputs(request, target)
        problem = f"no signature '{sig}'" if has is None else f"'{sig}' has no such output"
    raise OutputShapeError(
        f"guard: model '{shown(target.model)}' output '{shown(name)}': the response holds "
        f"{_held(kind)}, and the guard cannot learn the output's dtype from the upstream's "
        f"metadata ({problem}); a rule applies to it: fix the upstream or its metadata, or "
        "give the rule to the floating-point outputs by name"
    )


def _held(kind: str) -> str:
    return "integers" if kind == "int" else "values that are not numbers"


def _check_not_declared_float(kind: str, info: OutputInfo, model: str, name: str) -> None:
    """An output its signature declares floating-point must come as JSON
    numbers that read as such: strings (``"2.0"``) or bare integers, which
    TF Serving never writes for a float (``2.0``), would pass unchecked, and
    lenient readers take them for numbers."""
    if info.dtype in _FLOAT_DTYPES:
        raise OutputShapeError(
            f"guard: model '{shown(model)}' output '{shown(name)}': the signature declares "
            f"{info.dtype}, but the response holds {_held(kind)}, which TF Serving never "
            "writes for it; the guard cannot check them: fix the upstream"
        )


def _check_shape(values: Array, info: OutputInfo, model: str, name: str) -> None:
    """The response's tensor must have the shape its signature declares."""
    if info.dims is not None and not info.fits(values.shape):
        raise OutputShapeError(
            f"guard: model '{shown(model)}' output '{shown(name)}': the response holds shape "
            f"{list(values.shape)}, but the signature declares {list(info.dims)}"
        )


def _rewrite(
    response: RestPredictResponse, verdict: Verdict, keys: Mapping[str, OutputKey], target: Target
) -> bytes:
    changed: dict[OutputKey, Array] = {}
    derived: dict[OutputKey, list[tuple[str, Array]]] = {}
    for out in verdict.outputs:
        key = keys[out.name]
        if out.result.changed:
            changed[key] = out.result.values
        if out.result.derived:
            derived[key] = [(out.name + d.suffix, d.array) for d in out.result.derived]
    try:
        return response.rewrite(changed, derived)
    except RestJsonError as exc:
        raise OutputShapeError(
            f"guard: model '{shown(target.model)}': cannot add the derived outputs to the "
            f"REST response: {exc}"
        ) from None
