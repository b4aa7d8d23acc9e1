"""Peeking at a REST predict request: its ``signature_name`` and its format,
without parsing its inputs.

A request body can be tens of MB of numbers. The peek looks only at the
strings of the body: between two strings it counts brackets with
``bytes.count`` (C speed) to know the nesting depth, and a string at depth 1
followed by ``:`` is a top-level key. Numbers are never read. It is bounded:
it stops after :data:`PEEK_STRINGS_MAX` strings or :data:`PEEK_KEY_BYTES_MAX`
bytes of top-level keys, and once it knows both the signature and the format.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass

from guard.dataplane.codec.restjson import Format

__all__ = ["PEEK_KEY_BYTES_MAX", "PEEK_STRINGS_MAX", "RequestPeek", "inflate", "peek_request"]

#: Strings (keys and string values, at any depth) looked at before the peek gives up.
PEEK_STRINGS_MAX = 100_000
#: Bytes of top-level keys looked at before the peek gives up.
PEEK_KEY_BYTES_MAX = 4096
_SIGNATURE_MAX = 1024

_WS = re.compile(rb"[ \t\n\r]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_FORMATS: dict[str, Format] = {"instances": "row", "inputs": "columnar"}


@dataclass(frozen=True, slots=True)
class RequestPeek:
    """What the peek found."""

    signature: str | None
    """The request's ``signature_name`` (``None``: absent, or not found)."""
    format: Format | None
    """``row`` for ``"instances"``, ``columnar`` for ``"inputs"`` (``None``: neither found)."""
    complete: bool
    """Whether every top-level key was seen (or both answers were found)."""
    exceeded: bool = False
    """The peek stopped at its bound (not at the end of the object, nor at bad JSON)."""


class _Scan:
    """The peek's position and what it found so far."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.signature: str | None = None
        self.format: Format | None = None
        self.key_bytes = 0

    def ws(self, i: int) -> int:
        match = _WS.match(self.body, i)
        assert match is not None  # it matches the empty string
        return match.end()

    def key(self, start: int, end: int) -> int | None:
        """Take in the top-level key whose string spans ``start:end``; returns
        where to go on from (past a signature_name's value), or ``None`` when
        this string is not a key."""
        colon = self.ws(end)
        if self.body[colon : colon + 1] != b":":
            return None
        self.key_bytes += end - start
        name = _text(self.body[start:end])
        if name in _FORMATS:
            self.format = self.format or _FORMATS[name]
        if name != "signature_name":
            return end
        value_at = self.ws(colon + 1)
        value = _STRING.match(self.body, value_at)
        if value is None or value.end() - value_at > _SIGNATURE_MAX:
            return end  # not a string: the upstream answers that request
        self.signature = _text(value.group())
        return value.end()

    def done(self) -> bool:
        return self.signature is not None and self.format is not None


def _text(token: bytes) -> str:
    """A JSON string token's text ("" when it will not decode)."""
    if b"\\" not in token:
        return token[1:-1].decode("utf-8", "replace")
    try:
        text = json.loads(token)
    except ValueError:
        return ""
    return text if isinstance(text, str) else ""


def _depth_change(body: bytes, start: int, end: int) -> int:
    opens = body.count(b"[", start, end) + body.count(b"{", start, end)
    return opens - body.count(b"]", start, end) - body.count(b"}", start, end)


def peek_request(body: bytes) -> RequestPeek:
    """The signature name and format of a predict request body (see the module doc)."""
    scan = _Scan(body)
    at = scan.ws(0)
    if body[at : at + 1] != b"{":
        return RequestPeek(None, None, False)
    depth, pos, complete, exceeded = 1, at + 1, False, True
    for _ in range(PEEK_STRINGS_MAX):
        quote = body.find(b'"', pos)
        depth += _depth_change(body, pos, quote if quote >= 0 else len(body))
        if depth <= 0 or quote < 0:
            complete, exceeded = depth <= 0, False
            break
        string = _STRING.match(body, quote)
        if string is None:
            exceeded = False
            break
        pos = string.end()
        if depth == 1:
            pos = scan.key(quote, pos) or pos
            if scan.done():
                complete, exceeded = True, False
                break
            if scan.key_bytes > PEEK_KEY_BYTES_MAX:
                break
    return RequestPeek(scan.signature, scan.format, complete, exceeded)


def inflate(body: bytes, limit: int) -> bytes | None:
    """A gzip or zlib body decompressed up to ``limit`` bytes; ``None`` when
    it will not decompress or is larger."""
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib, by its header
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        return None
    return out if len(out) <= limit else None
