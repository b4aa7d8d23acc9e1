"""HTTP/1.1 heads written with the bytes they came with.

aiohttp's parsers decode a header value as UTF-8 with ``surrogateescape``;
its serializer writes each character as UTF-8 and skips the surrogates, so
a value's bytes that are not UTF-8 (obs-text, RFC 9110 5.5) were dropped on
their way through the guard, in both directions (``a\\xffb`` went on as
``ab``). A head written here is encoded back with ``surrogateescape``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["head_bytes"]

# Control characters no head may carry (aiohttp's serializer refuses the
# same; the tab is a value's own).
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def head_bytes(first_line: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The head: ``first_line``, then each header, byte for byte as parsed.
    ``ValueError`` for a control character (CR, LF, NUL: a second header, or
    a second message, smuggled in)."""
    lines = [first_line]
    lines += [f"{name}: {value}" for name, value in headers]
    if _FORBIDDEN.search("\t".join(lines)):
        raise ValueError("a control character in the head")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
