"""Hand-written protobuf encoding of the few TF Serving messages the attack
tests send and expect, by field number (no TensorFlow import: the upstream and
the attackers start in well under a second).

PredictRequest: model_spec = 1, inputs = 2 (map<string, TensorProto>).
PredictResponse: outputs = 1 (map<string, TensorProto>), model_spec = 2.
ModelSpec: name = 1, version = 2 (Int64Value), signature_name = 3.
TensorProto: dtype = 1, tensor_shape = 2 (dim = 2 {size = 1}), tensor_content = 4,
float_val = 5 (packed), string_val = 8, int64_val = 10 (packed).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

DT_FLOAT, DT_STRING, DT_INT64 = 1, 7, 9


def varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return key(number, 2) + varint(len(payload)) + payload


def vfield(number: int, value: int) -> bytes:
    """A varint field."""
    return key(number, 0) + varint(value)


def model_spec(name: str | bytes, signature: str = "", version: int | None = None) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    out = ld(1, raw)
    if version is not None:
        out += ld(2, vfield(1, version))
    if signature:
        out += ld(3, signature.encode())
    return out


def shape(dims: Sequence[int]) -> bytes:
    return b"".join(ld(2, vfield(1, d)) for d in dims)


def float_tensor(
    dims: Sequence[int], values: Sequence[float] = (), *, content: bytes | None = None
) -> bytes:
    """A DT_FLOAT TensorProto: packed float_val, or tensor_content."""
    out = vfield(1, DT_FLOAT) + ld(2, shape(dims))
    if content is not None:
        out += ld(4, content)
    elif values:
        out += ld(5, struct.pack(f"<{len(values)}f", *values))
    return out


def map_entry(number: int, name: str, tensor: bytes) -> bytes:
    return ld(number, ld(1, name.encode()) + ld(2, tensor))


def predict_request(
    name: str | bytes, inputs: dict[str, bytes] | None = None, *, prefix: bytes = b""
) -> bytes:
    """A PredictRequest; ``prefix`` goes before the model_spec (hidden-spec attacks)."""
    if inputs is None:
        inputs = {"x": float_tensor([1, 2], [0.25, 0.5])}
    return (
        prefix + ld(1, model_spec(name)) + b"".join(map_entry(2, k, v) for k, v in inputs.items())
    )


def predict_response(outputs: dict[str, bytes], spec: bytes) -> bytes:
    return b"".join(map_entry(1, k, v) for k, v in outputs.items()) + ld(2, spec)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def fields(data: bytes, limit: int | None = None) -> Iterator[tuple[int, int, int | bytes]]:
    """Top-level (number, wire type, value) of a message; with ``limit``, only
    the fields that start in its first ``limit`` bytes."""
    pos = 0
    end = len(data) if limit is None else min(len(data), limit)
    while pos < end:
        k, pos = read_varint(data, pos)
        number, wire = k >> 3, k & 7
        if wire == 0:
            v, pos = read_varint(data, pos)
            yield number, wire, v
        elif wire == 2:
            n, pos = read_varint(data, pos)
            yield number, wire, data[pos : pos + n]
            pos += n
        elif wire == 1:
            yield number, wire, data[pos : pos + 8]
            pos += 8
        elif wire == 5:
            yield number, wire, data[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")


def first(data: bytes, number: int, limit: int | None = None) -> bytes | None:
    """The first length-delimited field ``number`` (within ``limit`` bytes)."""
    for n, wire, value in fields(data, limit):
        if n == number and wire == 2:
            assert isinstance(value, bytes)
            return value
    return None


def output_names(response: bytes) -> list[str]:
    """The output aliases of a PredictResponse."""
    names = []
    for n, wire, value in fields(response):
        if n == 1 and wire == 2:
            assert isinstance(value, bytes)
            name = first(value, 1)
            names.append((name or b"").decode())
    return names


def request_model_name(request: bytes) -> bytes | None:
    spec = first(request, 1)
    return None if spec is None else first(spec, 1)


def hidden_spec_prefix(size: int) -> bytes:
    """``size`` bytes of unknown varint fields (field 15, value 0x7f): what a
    decoder must skip before it reaches a late model_spec."""
    unit = vfield(15, 0x7F)  # 2 bytes
    return unit * (size // len(unit))
