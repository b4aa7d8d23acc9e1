"""Peeking at a request's ModelSpec without parsing (or copying) the rest.

The peek is bounded: it looks at no more than :data:`PEEK_FIELDS_MAX` fields
at each level, so its cost does not grow with what a client sends (a
gzipped request can hold millions of tiny fields). Encoders write
``model_spec`` (field 1) first; a request that hides it elsewhere, or that is
not well-formed protobuf on the way to it, gets no spec here, and the
response's own ``model_spec`` decides which rules apply.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import message as pb_message

from guard.dataplane.codec import varint
from guard.dataplane.codec.response import ModelSpecInfo, spec_from_bytes

__all__ = ["PEEK_FIELDS_MAX", "peek_model_spec"]

#: Fields looked at per level before the peek gives up.
PEEK_FIELDS_MAX = 64

# Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. Groups (3,
# 4) are not in TF Serving's messages; 6 and 7 do not exist.
_SKIP = {1: 8, 5: 4}


def _find_field(data: bytes, number: int) -> bytes | None:
    """The payload of the first length-delimited field ``number`` among the
    first :data:`PEEK_FIELDS_MAX` top-level fields of ``data``."""
    pos, end = 0, len(data)
    for _ in range(PEEK_FIELDS_MAX):
        if pos >= end:
            return None
        key, pos = varint.decode(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 2:
            length, pos = varint.decode(data, pos)
            if pos + length > end:
                raise ValueError("truncated")
            if field == number:
                return data[pos : pos + length]
            pos += length
        elif wire == 0:
            _, pos = varint.decode(data, pos)
        elif wire in _SKIP:
            pos += _SKIP[wire]
        else:
            raise ValueError(f"wire type {wire}")
    return None


def peek_model_spec(request: bytes, path: Sequence[int] = (1,)) -> ModelSpecInfo | None:
    """Read the ModelSpec of a request without parsing (or copying) the rest.

    ``path`` is the chain of field numbers leading to the spec: ``(1,)`` for
    Predict/Classify/Regress/GetModelMetadata/GetModelStatus requests, ``(1, 1)``
    for MultiInference (its first task). Returns ``None`` when absent,
    malformed or beyond the peek's bound; the upstream judges the request.
    """
    payload: bytes | None = request
    try:
        for number in path:
            assert payload is not None
            payload = _find_field(payload, number)
            if payload is None:
                return None
        assert payload is not None
        return spec_from_bytes(payload)
    except (ValueError, pb_message.DecodeError):
        return None
