"""Peeking at a REST predict request: its ``signature_name`` and its format,
without parsing its inputs.

A request body can be tens of MB of numbers. The peek looks only at the
strings of the body: between two strings it counts brackets with
``bytes.count`` (C speed) to know the nesting depth, and a string at depth 1
followed by ``:`` is a top-level key. Numbers are never read. It is bounded:
it stops after :data:`PEEK_STRINGS_MAX` strings or :data:`PEEK_KEY_BYTES_MAX`
bytes of top-level keys, and once it knows both the signature and the format.

This walk is the reference; the native module walks the same way
(``guard.dataplane._walk.peek_request``, through the kernels) and is tried
first, leaving escaped keys and signatures to this one.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field

from guard.dataplane.codec.restjson import STRING_TOKEN, Format, RequestPeekScan

__all__ = [
    "PEEK_KEY_BYTES_MAX", "PEEK_STRINGS_MAX", "NotInflated", "RequestPeek", "inflate",
    "peek_request",
]  # fmt: skip

#: Strings (keys and string values, at any depth) looked at before the peek gives up.
PEEK_STRINGS_MAX = 100_000
#: Bytes of top-level keys looked at before the peek gives up.
PEEK_KEY_BYTES_MAX = 4096
_SIGNATURE_MAX = 1024

_WS = re.compile(rb"[ \t\n\r]*")
_COLON = re.compile(rb"[ \t\n\r]*:[ \t\n\r]*")
_STRING = re.compile(STRING_TOKEN, re.S)
_FORMATS: dict[str, Format] = {"instances": "row", "inputs": "columnar"}
_SIGNATURE = "signature_name"
_BOM = b"\xef\xbb\xbf"
_FORMAT_CODES: tuple[Format | None, ...] = (None, "row", "columnar")  # the native peek's codes
# The keys the peek looks for, as plain tokens: no need to decode those.
_PLAIN_KEYS = {f'"{name}"'.encode(): name for name in (*_FORMATS, _SIGNATURE)}


@dataclass(slots=True)
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
    signature_seen: bool = field(default=False, compare=False)
    """The walk's own state: a ``signature_name`` key was seen. TF Serving
    reads the first (rapidjson's ``FindMember``): a later one must not choose
    the rules."""

    def key(self, body: bytes, start: int, end: int) -> int | None:
        """Take in the top-level key whose string spans ``start:end``; returns
        where to go on from (past a signature_name's value), or ``None`` when
        this string is not a key."""
        colon = _COLON.match(body, end)
        if colon is None:
            return None
        token = body[start:end]
        name = _PLAIN_KEYS.get(token) or _text(token)
        if name in _FORMATS:
            self.format = self.format or _FORMATS[name]
        if name != _SIGNATURE or self.signature_seen:
            return end
        self.signature_seen = True
        value = _STRING.match(body, colon.end())
        if value is None or value.end() - colon.end() > _SIGNATURE_MAX:
            return end  # not a string: the upstream answers that request
        self.signature = _text(value.group())
        return value.end()


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
    if start == end:
        return 0
    opens = body.count(b"[", start, end) + body.count(b"{", start, end)
    return opens - body.count(b"]", start, end) - body.count(b"}", start, end)


def peek_request(body: bytes, native: RequestPeekScan | None = None) -> RequestPeek:
    """The signature name and format of a predict request body (see the module
    doc); ``native`` peeks first (:data:`~guard.dataplane.codec.restjson.RequestPeekScan`),
    this walk is its reference. A leading UTF-8 byte order mark is skipped,
    as TF Serving's rapidjson skips it: a body behind one was peeked as not
    an object, and guarded by serving_default's rules."""
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    if native is not None:
        peeked = native(body, PEEK_STRINGS_MAX, PEEK_KEY_BYTES_MAX, _SIGNATURE_MAX)
        if peeked is not None:
            signature, code, complete, exceeded = peeked
            return RequestPeek(signature, _FORMAT_CODES[code], complete, exceeded)
    return _walk(body)


def _walk(body: bytes) -> RequestPeek:
    found = RequestPeek(None, None, False, True)
    at = _WS.match(body).end()  # type: ignore[union-attr]  # it matches the empty string
    if body[at : at + 1] != b"{":
        found.exceeded = False
        return found
    depth, pos, key_bytes = 1, at + 1, 0
    for _ in range(PEEK_STRINGS_MAX):
        quote = body.find(b'"', pos)
        depth += _depth_change(body, pos, quote if quote >= 0 else len(body))
        if depth <= 0 or quote < 0:
            found.complete, found.exceeded = depth <= 0, False
            break
        string = _STRING.match(body, quote)
        if string is None:
            found.exceeded = False
            break
        pos = string.end()
        if depth == 1:
            taken = found.key(body, quote, pos)
            if taken is not None:
                key_bytes += pos - quote
                pos = taken
            if found.signature is not None and found.format is not None:
                found.complete, found.exceeded = True, False
                break
            if key_bytes > PEEK_KEY_BYTES_MAX:
                break
    return found


class NotInflated(ValueError):
    """A gzip body the peek cannot read whole: its signature is unknown."""

    def __init__(self, why: str, too_large: bool = False) -> None:
        super().__init__(why)
        self.too_large = too_large


def inflate(body: bytes, limit: int) -> bytes:
    """A gzip or zlib body decompressed, up to ``limit`` bytes.
    :class:`NotInflated` where it is larger, or is not one whole stream
    (corrupt, cut short, or followed by more bytes): its signature could be
    anywhere, and TF Serving inflates bodies of up to 100 MB."""
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib, by its header
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise NotInflated(f"does not decompress ({exc})") from None
    if len(out) > limit:
        raise NotInflated(f"inflates to more than {limit} bytes", too_large=True)
    if not inflater.eof:
        raise NotInflated("ends before its compressed stream does")
    if inflater.unused_data:
        raise NotInflated(f"has {len(inflater.unused_data)} bytes after its compressed stream")
    return out
