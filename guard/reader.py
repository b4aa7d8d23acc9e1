"""Reading a serialized PredictResponse: zero-copy for the layout TF Serving writes.

The upb view in :mod:`guard.wire` validates every response. Then, for the
canonical layout TF Serving writes (``outputs`` map entries holding a
TensorProto of dtype, shape and one value field, then ``model_spec``),
:class:`PredictResponseReader` locates each tensor's values in the response
bytes itself and hands numpy a view of that buffer: no copy of the values and
no accessor objects per tensor. That matters more than it looks: in a loaded
proxy the caches are cold between responses, and every protobuf accessor is a
cache miss (see ``python -m bench.cold``).

Anything else that is valid protobuf (a field repeated, unpacked values,
fields TF does not write for float tensors, unknown fields) is read through
the view, which implements the full merge semantics. Both paths return the
same arrays; the tests and the fuzz target compare them.

This module knows nothing of rules or gRPC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from guard import wire
from guard.errors import DecodeError

__all__ = ["PredictResponseReader"]

_LEN, _VARINT = 2, 0
# Field numbers the raw path reads (TensorProto, TensorShapeProto, its Dim); the
# value fields are TensorDType.number. Any other field means fallback.
_DTYPE, _SHAPE, _VERSION, _CONTENT = 1, 2, 3, 4
_DIM, _UNKNOWN_RANK = 2, 3
_DIM_SIZE, _DIM_NAME = 1, 2


class _Fallback(Exception):
    """Not the canonical layout: let the upb view read it."""


Field = tuple[int, int, int, int]  # number, wire type, value or offset, length


def _fields(data: bytes, pos: int, end: int, repeatable: int = 0) -> list[Field]:
    """The fields of one message, each number at most once except ``repeatable``;
    anything else (and fixed-width fields) raises :class:`_Fallback`."""
    out: list[Field] = []
    seen: set[int] = set()
    while pos < end:
        key, pos = wire.read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number in seen and number != repeatable:
            raise _Fallback  # a repeated scalar or a merged message: upb's job
        seen.add(number)
        if wire_type == _VARINT:
            value, pos = wire.read_varint(data, pos)
            out.append((number, _VARINT, value, 0))
        elif wire_type == _LEN:
            length, pos = wire.read_varint(data, pos)
            if pos + length > end:
                raise _Fallback  # truncated: upb reports it
            out.append((number, _LEN, pos, length))
            pos += length
        else:
            raise _Fallback  # fixed-width: unpacked float/double values
    if pos != end:
        raise _Fallback
    return out


_U64 = (1 << 64) - 1


def _aligned(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # Values start wherever the protobuf framing puts them. Reductions on a
    # misaligned float32 view run up to 2x slower (max over 1024x201: 22 vs
    # 11 us) and the rules make several passes; a copy costs about one.
    return values if values.flags.aligned else values.copy()


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class PredictResponseReader:
    """The outputs and model spec of one serialized PredictResponse.

    Raises :class:`~guard.errors.DecodeError` when the bytes are not a
    PredictResponse with outputs.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        # upb validates the whole message first (UTF-8, packed runs, nested
        # messages, outputs no rule reads), so a response the guard accepts is
        # exactly one protobuf accepts; the raw walk then only locates values.
        self._view: Any = wire.parse_predict_response(body)  # raises DecodeError
        self._typed: Any = None
        self._spec_bytes: bytes | None = None
        self._raw: dict[str, tuple[int, int]] | None
        try:
            self._raw = self._scan(body)
        except (_Fallback, ValueError, UnicodeDecodeError):
            self._raw = None
        self.names: list[str] = sorted(self._raw if self._raw is not None else self._view.outputs)

    def _scan(self, body: bytes) -> dict[str, tuple[int, int]] | None:
        outputs: dict[str, tuple[int, int]] = {}
        for number, wire_type, at, length in _fields(body, 0, len(body), repeatable=1):
            if number == 2 and wire_type == _LEN:
                self._spec_bytes = body[at : at + length]
                continue
            if number != 1 or wire_type != _LEN:
                raise _Fallback
            name, tensor = "", (at + length, 0)  # absent key/value: defaults
            for n, w, a, b in _fields(body, at, at + length):
                if n == 1 and w == _LEN:
                    name = body[a : a + b].decode("utf-8")
                elif n == 2 and w == _LEN:
                    tensor = (a, b)
                else:
                    raise _Fallback
            outputs[name] = tensor  # a repeated key: the last entry wins, as in protobuf
        return outputs or None  # none: upb raises the "no outputs" error

    # ------------------------------------------------------------------ spec

    def spec(self) -> wire.ModelSpecInfo | None:
        """The response's ``model_spec``, if the upstream set one."""
        if self._raw is None:
            return wire.response_spec(self._view)
        if self._spec_bytes is None:
            return None
        return wire.spec_from_bytes(self._spec_bytes)  # valid: upb parsed it

    # --------------------------------------------------------------- tensors

    def view(self) -> Any:
        """The upb view of the whole response."""
        return self._view

    def _typed_tensor(self, name: str) -> Any:
        if self._typed is None:
            self._typed = wire.TypedPredictResponse.FromString(self.body)
        return self._typed.outputs[name]

    def decode(
        self, name: str, limit_bytes: int
    ) -> tuple[np.ndarray[Any, Any], wire.Encoding] | None:
        """Output ``name`` as an array and its encoding, like :func:`wire.decode_tensor`
        (``None`` for a dtype the guard does not check). Reads the response's
        buffer in place when it can; the array is then read-only."""
        fallback: Callable[[], Any] = lambda: self._typed_tensor(name)  # noqa: E731
        if self._raw is not None:
            at, length = self._raw[name]
            try:
                return self._decode_raw(at, length, limit_bytes)
            except (_Fallback, ValueError):
                pass
        return wire.decode_tensor(self.view().outputs[name], limit_bytes, fallback)

    def _decode_raw(
        self, at: int, length: int, limit_bytes: int
    ) -> tuple[np.ndarray[Any, Any], wire.Encoding] | None:
        body = self.body
        fields = _fields(body, at, at + length)
        dtype = next((a for n, w, a, _ in fields if n == _DTYPE and w == _VARINT), 0)
        dt = wire.FLOAT_DTYPES.get(dtype)
        if dt is None:
            return None  # not checked: whatever else the tensor holds
        shape: tuple[int, ...] = ()
        content: tuple[int, int] | None = None
        run: tuple[int, int] | None = None
        for number, wire_type, a, b in fields:
            if number == _SHAPE and wire_type == _LEN:
                shape = self._shape(a, b)
            elif number == dt.number and wire_type == _LEN:
                run = (a, b)
            elif number == _CONTENT and wire_type == _LEN:
                content = (a, b)
            elif not (number in (_DTYPE, _VERSION) and wire_type == _VARINT):
                raise _Fallback  # other value fields, unpacked values, unknown fields
        numel = wire.numel(shape, dt.numpy.itemsize, limit_bytes)
        if content is not None and content[1]:
            offset, nbytes = content
            if nbytes != numel * dt.numpy.itemsize:
                raise DecodeError(
                    f"tensor_content has {nbytes} bytes but shape {list(shape)} of "
                    f"{dt.field[:-4]} needs {numel * dt.numpy.itemsize}"
                )
            values = _aligned(np.frombuffer(body, dt.numpy, numel, offset))
            return values.reshape(shape), wire.Encoding.CONTENT
        if run is None:
            flat = np.zeros(0, dtype=dt.numpy)
        elif dt.varint:
            packed = body[run[0] : run[0] + run[1]]
            flat = wire.decode_varints(packed).astype(np.uint16).view("<f2")
        else:
            offset, nbytes = run
            if nbytes % dt.numpy.itemsize:
                raise DecodeError(f"{dt.field} has {nbytes} bytes, not a whole number of values")
            flat = _aligned(np.frombuffer(body, dt.numpy, nbytes // dt.numpy.itemsize, offset))
        return wire.fill(flat, shape, numel, dt), wire.Encoding.TYPED

    def _shape(self, at: int, length: int) -> tuple[int, ...]:
        dims: list[int] = []
        body = self.body
        pos, end = at, at + length
        while pos < end:
            key, pos = wire.read_varint(body, pos)
            if key >> 3 == _UNKNOWN_RANK and key & 7 == _VARINT:
                _, pos = wire.read_varint(body, pos)
                continue
            if key >> 3 != _DIM or key & 7 != _LEN:
                raise _Fallback
            size_len, pos = wire.read_varint(body, pos)
            if pos + size_len > end:
                raise _Fallback
            size = 0
            for number, wire_type, a, _b in _fields(body, pos, pos + size_len):
                if number == _DIM_SIZE and wire_type == _VARINT:
                    size = _int64(a & _U64)
                elif number != _DIM_NAME or wire_type != _LEN:
                    raise _Fallback
            dims.append(size)
            pos += size_len
        if pos != end:
            raise _Fallback
        return tuple(dims)
