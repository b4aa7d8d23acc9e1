"""Structure: a small scanner for the few objects and arrays around the tensors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from guard.dataplane.codec.restjson.native import NumberScan, Scanned, ValueSkip
from guard.dataplane.codec.restjson.shared import STRING_TOKEN, RestJsonError

_WS_RE = re.compile(rb"[ \t\n\r]*")
_WS_BYTES = frozenset(b" \t\n\r")
_STRING_RE = re.compile(STRING_TOKEN, re.S)
_PLAIN_KEY_RE = re.compile(rb'"[\x20-\x21\x23-\x5b\x5d-\x7e]*"')
_SCALAR_RE = re.compile(rb"[^ \t\n\r,\]}]+")
_SKIP_TOKEN_RE = re.compile(STRING_TOKEN + rb'|[\[\]{}"]', re.S)
_CLOSES = {ord("]"): ord("["), ord("}"): ord("{")}
_SKIP_DEPTH = 512  # guard/dataplane/_walk.c's SKIP_DEPTH

# What the Python walk visits per response (objects, their members, arrays'
# elements outside numeric tensors): a TF Serving answer visits about one per
# instance and output; a hostile one with millions of tiny objects cost
# seconds of the event loop and gigabytes before this bound.
_VISITS_MAX = 1 << 16


def _skip_value(body: bytes, i: int) -> int:
    """One past the array or object opening at ``body[i]``: strings skipped,
    brackets matched by kind, at most 512 deep; -1 where it does not close
    (the reference of ``guard.dataplane._walk.skip_value``)."""
    if body[i : i + 1] not in (b"[", b"{"):
        return -1
    opened: list[int] = []
    for match in _SKIP_TOKEN_RE.finditer(body, i):
        token = match.group()
        if token[0] == 0x22:  # '"': a string, or one that does not close
            if len(token) == 1:
                return -1
            continue
        if token[0] in _CLOSES:
            if not opened or opened.pop() != _CLOSES[token[0]]:
                return -1
            if not opened:
                return match.end()
        elif len(opened) == _SKIP_DEPTH:
            return -1
        else:
            opened.append(token[0])
    return -1


@dataclass(slots=True)
class _Span:
    start: int
    end: int
    kind: str
    """object, array, numeric (an array holding numbers only), string or scalar."""
    scanned: Scanned | None = None
    """A numeric span's numbers, when the native scan found its end."""
    members: list[_Member] | None = None
    """An object's members, read once."""


@dataclass(slots=True)
class _Member:
    key: str
    value: _Span


class _Scanner:
    """Finds values' spans; arrays of numbers are skipped without looking inside,
    or read by the native scan when there is one (then read once); other
    arrays are skipped whole (natively with ``skip``). At most
    ``_VISITS_MAX`` values are visited one by one."""

    def __init__(
        self, body: bytes, native: NumberScan | None = None, skip: ValueSkip | None = None
    ) -> None:
        self.body = body
        self.native = native
        self.skip = skip
        self.visits = 0

    def visit(self) -> None:
        self.visits += 1
        if self.visits > _VISITS_MAX:
            raise RestJsonError(
                f"it holds more than {_VISITS_MAX} objects, members and elements outside "
                "numeric tensors, the most the guard reads (a TF Serving answer has about "
                "one per instance and output); send smaller batches"
            )

    def ws(self, i: int) -> int:
        if i < len(self.body) and self.body[i] not in _WS_BYTES:
            return i  # most values follow their separator directly
        match = _WS_RE.match(self.body, i)
        assert match is not None  # the pattern matches the empty string
        return match.end()

    def expect(self, i: int, char: bytes) -> int:
        i = self.ws(i)
        if self.body[i : i + 1] != char:
            raise RestJsonError(f"expected {char.decode()!r} at offset {i}")
        return i + 1

    def value(self, i: int) -> _Span:
        self.visit()
        i = self.ws(i)
        head = self.body[i : i + 1]
        if head == b"{":
            found = self.members(i)
            end = found[-1].value.end if found else self.ws(i + 1)
            return _Span(i, self.expect(end, b"}"), "object", members=found)
        if head == b"[":
            return self._array(i)
        if head == b'"':
            return _Span(i, self.string_end(i), "string")
        match = _SCALAR_RE.match(self.body, i)
        if match is None:
            raise RestJsonError(f"expected a value at offset {i}")
        return _Span(i, match.end(), "scalar")

    def _array(self, i: int) -> _Span:
        scanned = self.native(self.body, i, len(self.body)) if self.native else None
        if scanned is not None:
            return _Span(i, scanned[6], "numeric", scanned)
        if self.skip is not None:  # one native pass finds its end either way
            end = self.container_end(i)
            return _Span(i, end, "numeric" if end <= self._stop(i) else "array")
        end = self.numeric_end(i)
        if end >= 0:
            return _Span(i, end, "numeric")
        return _Span(i, self.container_end(i), "array")

    def string_end(self, i: int) -> int:
        match = _STRING_RE.match(self.body, i)
        if match is None:
            raise RestJsonError(f"unterminated string at offset {i}")
        return match.end()

    def numeric_end(self, i: int) -> int:
        """End of the array at ``i`` when it holds only numbers (and arrays of them).

        Only called where the array is an object member's value: after it come a
        comma and a key string, or ``}``. So the run of bytes up to the next
        ``"``/``{``/``}`` holds this array and nothing else with brackets.
        """
        body, stop = self.body, self._stop(i)
        end = body.rfind(b"]", i, stop) + 1
        return end if end > i and _one_array(body, i, end) else -1

    def _stop(self, i: int) -> int:
        """The first ``"``, ``{`` or ``}`` from ``i``: an array that ends before
        it holds only numbers and arrays of them."""
        body = self.body
        stops = [p for p in (body.find(b'"', i), body.find(b"{", i), body.find(b"}", i)) if p >= 0]
        return min(stops) if stops else len(body)

    def members(self, i: int) -> list[_Member]:
        out: list[_Member] = []
        i = self.expect(i, b"{")
        if self.body[self.ws(i) : self.ws(i) + 1] == b"}":
            return out
        while True:
            key_start = self.ws(i)
            key_end = self.string_end(key_start)
            key = _decode_key(self.body[key_start:key_end])
            span = self.value(self.expect(key_end, b":"))
            out.append(_Member(key, span))
            i = self.ws(span.end)
            if self.body[i : i + 1] == b"}":
                return out
            i = self.expect(i, b",")

    def members_of(self, span: _Span) -> list[_Member]:
        return span.members if span.members is not None else self.members(span.start)

    def container_end(self, i: int) -> int:
        """End of the array or object at ``i``, its elements not visited."""
        end = self.skip(self.body, i) if self.skip is not None else _skip_value(self.body, i)
        if end < 0:
            raise RestJsonError(
                f"the value at offset {i} does not close, or nests deeper than {_SKIP_DEPTH}"
            )
        return end

    def elements(self, i: int) -> list[_Span]:
        out: list[_Span] = []
        i = self.expect(i, b"[")
        if self.body[self.ws(i) : self.ws(i) + 1] == b"]":
            return out
        while True:
            span = self.element(i)
            out.append(span)
            i = self.ws(span.end)
            if self.body[i : i + 1] == b"]":
                return out
            i = self.expect(i, b",")

    def element(self, i: int) -> _Span:
        """An array element: like :meth:`value`, without the numeric shortcut."""
        i = self.ws(i)
        if self.body[i : i + 1] == b"[":
            self.visit()
            return _Span(i, self.container_end(i), "array")
        return self.value(i)

    def first_element(self, i: int) -> _Span | None:
        """The first element of the array at ``i`` (None: it is empty)."""
        i = self.expect(i, b"[")
        return None if self.body[self.ws(i) : self.ws(i) + 1] == b"]" else self.element(i)


def _one_array(body: bytes, start: int, end: int) -> bool:
    """Whether the brackets of ``body[start:end]`` nest as one array (``[a],[b]``
    holds two, and ``[[a]`` none)."""
    region = np.frombuffer(body, np.uint8, count=end - start, offset=start)
    brackets = region[np.flatnonzero((region == 0x5B) | (region == 0x5D))]
    depth = np.cumsum(np.where(brackets == 0x5B, 1, -1))
    return bool(depth[-1] == 0 and (depth[:-1] > 0).all())


def _decode_key(token: bytes) -> str:
    if _PLAIN_KEY_RE.fullmatch(token):
        return token[1:-1].decode("ascii")  # no escapes: json.loads would give the same
    try:
        key = json.loads(token)
    except ValueError as exc:
        raise RestJsonError(f"bad object key {token[:40]!r}") from exc
    if not isinstance(key, str):
        raise RestJsonError(f"bad object key {token[:40]!r}")
    return key
