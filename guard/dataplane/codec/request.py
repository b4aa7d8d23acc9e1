"""Peeking at a request's ModelSpec without parsing (or copying) the rest.

The peek is bounded: it looks at no more than :data:`PEEK_FIELDS_MAX` fields
at each level on its way, and :data:`SPEC_FIELDS_MAX` where it gathers the
spec's copies, so its cost does not grow with what a client sends (a
gzipped request can hold millions of tiny fields). Encoders write
``model_spec`` (field 1) once, first. Protobuf merges every copy of a
message field, and TF Serving serves the merged spec, so the peek merges
the copies it finds; a request whose fields it cannot all see within its
bound, or that is not well-formed protobuf on the way, gets no spec here,
and the response's own ``model_spec`` decides which rules apply.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import message as pb_message

from guard.dataplane.codec import varint
from guard.dataplane.codec.response import ModelSpecInfo, spec_from_bytes

__all__ = ["PEEK_FIELDS_MAX", "SPEC_FIELDS_MAX", "peek_model_spec"]

#: Fields looked at per level before the peek gives up.
PEEK_FIELDS_MAX = 64
#: Fields looked at for every copy of the spec: a PredictRequest holds one
#: field per input, and models with hundreds of inputs exist (0.6 us a field).
SPEC_FIELDS_MAX = 1024

# Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. Groups (3,
# 4) are not in TF Serving's messages; 6 and 7 do not exist.
_SKIP = {1: 8, 5: 4}


def _find_fields(data: bytes, number: int, first: bool) -> list[bytes]:
    """The payloads of the length-delimited fields ``number`` among the top-level
    fields of ``data``: the first alone (``first``), or every one, which
    protobuf merges. ``ValueError`` where every one is asked for and the
    fields run past :data:`SPEC_FIELDS_MAX`: a copy further on would go
    unseen (a second model_spec chose the model TF Serving served, and the
    guard judged the answer by the first one's)."""
    pos, end = 0, len(data)
    found: list[bytes] = []
    for _ in range(PEEK_FIELDS_MAX if first else SPEC_FIELDS_MAX):
        if pos >= end:
            return found
        key, pos = varint.decode(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 2:
            length, pos = varint.decode(data, pos)
            if pos + length > end:
                raise ValueError("truncated")
            if field == number:
                found.append(data[pos : pos + length])
                if first:
                    return found
            pos += length
        else:
            pos = _skip_scalar(data, pos, wire)
    if first or pos >= end:
        return found
    raise ValueError("more fields than the peek reads")


def _skip_scalar(data: bytes, pos: int, wire: int) -> int:
    """Where the value of a field that is not length-delimited ends."""
    if wire == 0:
        return varint.decode(data, pos)[1]
    if wire in _SKIP:
        return pos + _SKIP[wire]
    raise ValueError(f"wire type {wire}")


def peek_model_spec(request: bytes, path: Sequence[int] = (1,)) -> ModelSpecInfo | None:
    """Read the ModelSpec of a request without parsing (or copying) the rest.

    ``path`` is the chain of field numbers leading to the spec: ``(1,)`` for
    Predict/Classify/Regress/GetModelMetadata/GetModelStatus requests, ``(1, 1)``
    for MultiInference (its first task). The spec's copies are merged, as
    protobuf merges them. Returns ``None`` when absent, malformed or beyond
    the peek's bound; the upstream judges the request.
    """
    payload = request
    try:
        for depth, number in enumerate(path):
            found = _find_fields(payload, number, first=depth < len(path) - 1)
            if not found:
                return None
            payload = found[0] if len(found) == 1 else b"".join(found)
        return spec_from_bytes(payload)
    except (ValueError, pb_message.DecodeError):
        return None
