"""The native seam: what the C kernels of ``guard.dataplane._walk`` implement,
each held to the Python reference in this package (callers pass them, or None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from guard.dataplane.codec.restjson.shared import Array

Scanned = tuple[
    bytearray, bytearray, bytearray, bool, bytearray | None, tuple[int, ...], int,
    bytearray | None, list[int] | None,
]  # fmt: skip
NumberScan = Callable[[bytes, int, int], Scanned | None]
"""A native scan of the tensor whose text starts at ``text[start]``
(``guard.dataplane._walk.scan_tensor``): ``(text, start, limit) -> (values,
starts, ends, integral, ints, shape, end, single, suspects)``, or None where it
leaves the text to the reference (:func:`_reference_output`)."""


class TextWriter(Protocol):
    """The two loops over every element of derived outputs, native
    (``guard.dataplane._walk``), done as the Python code here does them:
    :meth:`RestPredictResponse._reused_texts`' search and
    :func:`_row_members`' join."""

    def reuse_texts(
        self, body: bytes, starts: Array, ends: Array, pool: Array, derived: Array,
        batch: int, width: int, /,
    ) -> tuple[list[str | None], int]: ...  # fmt: skip

    def row_members(
        self, columns: Sequence[tuple[str, list[str], int, bool]], batch: int, /
    ) -> list[str] | None: ...


ValueSkip = Callable[[bytes, int], int]
"""Where the array or object at ``text[start]`` ends, its elements not read
(``guard.dataplane._walk.skip_value``): ``(text, start) -> end``, or -1 where
it does not close (:func:`_skip_value` is the reference)."""

RequestPeekScan = Callable[[bytes, int, int, int], tuple[str | None, int, bool, bool] | None]
"""A native peek at a predict request (``guard.dataplane._walk.peek_request``):
``(body, strings_max, key_bytes_max, signature_max) -> (signature, format
code, complete, exceeded)``, or None where it leaves the body to the Python
peek, the reference (``guard.server.rest.peek``)."""
