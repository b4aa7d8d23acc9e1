"""Reading a whole response: its root and output member, each output's spans
in row or columnar format, and the native shortcut for a one-output body.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from guard.dataplane.codec.restjson.native import NumberScan, Scanned, TextWriter, ValueSkip
from guard.dataplane.codec.restjson.outputs import (
    RestOutput,
    _generic_output,
    _native_part,
    _numeric_output,
    _typed,
    _Where,
)
from guard.dataplane.codec.restjson.response import RestPredictResponse
from guard.dataplane.codec.restjson.shared import (
    STRING_TOKEN,
    Array,
    Format,
    OutputKey,
    RestJsonError,
)
from guard.dataplane.codec.restjson.structure import _Member, _Scanner, _Span
from guard.dataplane.dtypes import FLOAT32 as _FLOAT32
from guard.dataplane.dtypes import INT64 as _INT64
from guard.dataplane.errors import shown


def read_predict_response(
    body: bytes,
    fmt: Format,
    native: NumberScan | None = None,
    single: Scanned | None = None,
    writer: TextWriter | None = None,
    skip: ValueSkip | None = None,
) -> RestPredictResponse:
    """Read a TF Serving REST predict response (see the package docstring).
    ``native`` scans the numbers (:data:`NumberScan`); without it, numpy does.
    ``single`` is the body's :func:`scan_single_output`, where the caller has it.
    ``writer`` is the response's :class:`TextWriter` (None: Python writes).
    ``skip`` finds where non-numeric arrays end (:data:`ValueSkip`; None: Python)."""
    if single is None and native is not None:
        single = scan_single_output(body, fmt, native)
    if single is not None:
        return _single_output(body, fmt, single, writer)
    scanner = _Scanner(body, native, skip)
    start = scanner.ws(0)
    root = scanner.members(start)
    _check_nothing_after(scanner, root)
    member = _root_member(root, _ROOT_KEYS[fmt])
    reader = _Reader(body, scanner, native)
    if fmt == "row":
        reader.row(member.value)
    else:
        reader.columnar(member.value)
    return RestPredictResponse(
        body,
        fmt,
        reader.outputs,
        reader.where,
        root[-1].value.end,
        {m.key for m in root},
        reader.names_per_instance,
        writer,
    )


_ROOT_KEYS: dict[str, str] = {"row": "predictions", "columnar": "outputs"}
_UNTOLD = (
    "JSON readers differ on which one they take (json.loads and JSON.parse the last, "
    "rapidjson the first), so the guard cannot tell which one the client reads"
)


def _check_nothing_after(scanner: _Scanner, root: list[_Member]) -> None:
    """Only whitespace after the root object: a second document after it
    (``{...} {...}``) is read by stream readers (jq, ``raw_decode`` loops)
    and would pass unchecked."""
    if not root:
        return  # {}: no output member, refused as such
    after = scanner.ws(scanner.ws(root[-1].value.end) + 1)
    if after < len(scanner.body):
        raise RestJsonError(
            f"it goes on after its JSON object (at offset {after}); JSON readers differ on "
            "what they make of that (json.loads refuses it, a stream reader reads a second "
            "document), so the guard cannot tell what the client reads; TF Serving writes one "
            "object: fix the upstream"
        )


def _root_member(root: list[_Member], key: str) -> _Member:
    """The root's ``key`` member, the only output member: TF Serving writes
    ``predictions`` or ``outputs``, once. A second one would pass unchecked,
    also one spelled in other case (``Predictions``): Go's encoding/json
    matches member names without regard to case, and keeps the last."""
    found = [m for m in root if m.key.casefold() in _OUTPUT_MEMBERS]
    if len(found) > 1:
        first, second = found[0].key, found[1].key
        held = f"'{first}' twice" if first == second else f"both '{first}' and '{second}'"
        raise RestJsonError(
            f"it holds {held}; {_UNTOLD}; TF Serving writes one of them, once: fix the upstream"
        )
    if not found or found[0].key != key:
        raise RestJsonError(f"no '{key}' member in the response")
    return found[0]


_OUTPUT_MEMBERS = frozenset(_ROOT_KEYS.values())


def _check_names_once(names: Sequence[str], where: str) -> None:
    """An output named twice: a reader may take either value (:data:`_UNTOLD`);
    also in other case (``p`` and ``P``), which Go's encoding/json reads as one
    name, keeping the last."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.get(name.casefold())
        if other is not None:
            held = f"is named twice {where}; {_UNTOLD}"
            if other != name:
                held = (
                    f"and output '{shown(other)}' differ only in case {where}; readers that "
                    "ignore case (Go's encoding/json) read them as one, so the guard cannot "
                    "tell which the client reads"
                )
            raise RestJsonError(
                f"output '{shown(name)}' {held}; TF Serving names each output once: fix the "
                "upstream"
            )
        seen[name.casefold()] = name


_SINGLE_HEAD = {
    fmt: re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"' + key.encode() + rb'"[ \t\n\r]*:[ \t\n\r]*\[')
    for fmt, key in _ROOT_KEYS.items()
}
_ROOT_TAIL = re.compile(rb"[ \t\n\r]*\}[ \t\n\r]*\Z")


NUMBER_BYTES = 32
"""What reading one number from text holds while the response is guarded:
its value, its text's start and end, and its integer (8 bytes each)."""


def numbers_at_most(body: bytes, enough: int) -> int:
    """An upper bound on the numbers in a JSON text (every number follows a
    ``[``, ``,`` or ``:``): the count of those where it is at most ``enough``,
    else of the tokens that start like a number right after one, outside
    strings (the reference of ``guard.dataplane._walk.numbers_at_most``)."""
    heads = body.count(b"[") + body.count(b",") + body.count(b":")
    if heads <= enough:
        return heads
    return sum(1 for m in _NUMBER_START_RE.finditer(body) if m.group()[0] != 0x22)


_NUMBER_START_RE = re.compile(STRING_TOKEN + rb"|[\[,:][ \t\n\r]*[-0-9NI]", re.S)


def scan_single_output(body: bytes, fmt: Format, native: NumberScan) -> Scanned | None:
    """TF Serving's answer with one output (a root holding only that output's
    dense numeric tensor), scanned natively; ``None`` for any other body,
    which the general reader reads. Its values are float32 as written where
    the scan's ``single`` (index 7) is set and nothing was integral or
    suspect (:func:`float32_values`)."""
    head = _SINGLE_HEAD[fmt].match(body)
    if head is None:
        return None
    scanned = native(body, head.end() - 1, len(body))
    if scanned is None or _ROOT_TAIL.match(body, scanned[6]) is None:
        return None
    return scanned


def float32_values(scanned: Scanned) -> bytearray | None:
    """A single output's values as float32 (native byte order), where every
    token was read as a float32 exactly as written; else ``None``."""
    single = scanned[7]
    return None if scanned[3] or scanned[8] else single


def _single_output(
    body: bytes, fmt: Format, scanned: Scanned, writer: TextWriter | None = None
) -> RestPredictResponse:
    """The response of a body :func:`scan_single_output` read. A shortcut
    only: it is what the general reader returns
    (tests/dataplane/test_restjson_native.py)."""
    _, starts, ends, _, _, shape, end, _, _ = scanned
    single = float32_values(scanned)
    if single is None:
        part = _native_part(body, scanned)
        values, kind = _typed([part])
        where = _Where(part.starts, part.ends, [])
    else:  # float32 tokens, each read as float32 already: _typed's answer, made directly
        values, kind = np.frombuffer(single, _FLOAT32), "float32"
        where = _Where(np.frombuffer(starts, _INT64), np.frombuffer(ends, _INT64), [])
    return RestPredictResponse(
        body, fmt, {None: RestOutput(None, values.reshape(shape), kind)}, {None: where}, end,
        {_ROOT_KEYS[fmt]}, [], writer,
    )  # fmt: skip


# A non-numeric output (strings, b64, booleans) with more text than this is
# not read: no rule applies to it, and json.loads of short strings takes about
# 15 times the text's size in objects.
_GENERIC_READ_MAX = 1 << 20


class _Reader:
    def __init__(self, body: bytes, scanner: _Scanner, native: NumberScan | None) -> None:
        self.body = body
        self.scanner = scanner
        self.native = native
        self.outputs: dict[OutputKey, RestOutput] = {}
        self.where: dict[OutputKey, _Where] = {}
        self.names_per_instance: list[set[str]] = []

    def add(self, key: OutputKey, spans: Sequence[_Span], batched: bool, after: list[int]) -> None:
        numeric = None
        if _may_be_numeric(spans):
            numeric = _numeric_output(self.body, spans, batched, self.native)
        if numeric is None and sum(s.end - s.start for s in spans) > _GENERIC_READ_MAX:
            values, kind = np.empty(0, object), "unread"
            where = _Where(None, None, after)
        elif numeric is None:
            values, kind = self._generic(spans, batched)
            where = _Where(None, None, after)
        else:
            values, kind, starts, ends = numeric
            where = _Where(starts, ends, after)
        self.outputs[key] = RestOutput(key, values, kind)
        self.where[key] = where

    def _generic(self, spans: Sequence[_Span], batched: bool) -> tuple[Array, str]:
        if not batched:
            return _generic_output(self.body, spans[0])
        parts = [_generic_output(self.body, s) for s in spans]
        if not parts:
            return np.zeros(0, np.float32), "float32"
        kinds = {k for _, k in parts}
        stacked = np.stack([v for v, _ in parts]) if len({v.shape for v, _ in parts}) == 1 else None
        if stacked is None:
            raise RestJsonError("instances of one output differ in shape")
        return stacked, kinds.pop() if len(kinds) == 1 else "other"

    def row(self, span: _Span) -> None:
        if span.kind == "numeric":
            self.add(None, [span], False, [])
            return
        if span.kind != "array":
            raise RestJsonError("'predictions' is not a list")
        # Instances are objects (named outputs) or none is; only then are they all visited.
        first = self.scanner.first_element(span.start)
        if first is not None and first.kind == "object" and not self._is_b64(first):
            instances = self.scanner.elements(span.start)
            if all(s.kind == "object" for s in instances):
                self._named_rows(instances)
                return
        self.add(None, [span], False, [])

    def _is_b64(self, span: _Span) -> bool:
        members = self.scanner.members_of(span)
        return len(members) == 1 and members[0].key == "b64" and members[0].value.kind == "string"

    def _named_rows(self, instances: list[_Span]) -> None:
        per_instance = [self.scanner.members_of(s) for s in instances]
        names = [m.key for m in per_instance[0]]
        _check_names_once(names, "in an instance of 'predictions'")
        self.names_per_instance = [{m.key for m in members} for members in per_instance]
        for members in per_instance:
            if [m.key for m in members] != names:
                raise RestJsonError("instances name different outputs")
        for column, name in enumerate(names):
            spans = [members[column].value for members in per_instance]
            self.add(name, spans, True, [s.end for s in spans])

    def columnar(self, span: _Span) -> None:
        if span.kind == "object":
            members = self.scanner.members_of(span)
            b64 = (
                len(members) == 1 and members[0].key == "b64" and members[0].value.kind == "string"
            )
            if not b64:
                _check_names_once([m.key for m in members], "in 'outputs'")
                for m in members:
                    self.add(m.key, [m.value], False, [m.value.end])
                return
        self.add(None, [span], False, [])


def _may_be_numeric(spans: Sequence[_Span]) -> bool:
    return all(s.kind in ("numeric", "scalar") for s in spans)
