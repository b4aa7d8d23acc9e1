"""Peeking at a request's ModelSpec without parsing (or copying) the rest."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import message as pb_message

from guard.dataplane.codec import varint
from guard.dataplane.codec.response import ModelSpecInfo, spec_from_bytes

__all__ = ["peek_model_spec"]


def _find_field(data: bytes, number: int) -> bytes | None:
    """The payload of the first length-delimited field ``number`` at the top level."""
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = varint.decode(data, pos)
        wire = key & 7
        if wire == 2:
            length, pos = varint.decode(data, pos)
            if pos + length > end:
                raise ValueError("truncated")
            if key >> 3 == number:
                return data[pos : pos + length]
            pos += length
        elif wire == 0:
            _, pos = varint.decode(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError("unsupported wire type")
    return None


def peek_model_spec(request: bytes, path: Sequence[int] = (1,)) -> ModelSpecInfo | None:
    """Read the ModelSpec of a request without parsing (or copying) the rest.

    ``path`` is the chain of field numbers leading to the spec: ``(1,)`` for
    Predict/Classify/Regress/GetModelMetadata/GetModelStatus requests, ``(1, 1)``
    for MultiInference (its first task). Returns ``None`` when absent or malformed;
    the upstream will judge the request.
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
