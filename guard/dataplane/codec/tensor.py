"""TensorProto values: bytes <-> numpy, both encodings, read in place.

Decoding reads a tensor's values where they sit in the message (from the
protobuf view, or from the offsets the native walker found) and follows TF's
fill convention. Encoding writes a tensor back in the encoding it came in,
and writes derived outputs directly as encoded ``PredictResponse.outputs``
map entries. This module knows nothing of rules or transports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import unknown_fields as pb_unknown

from guard.dataplane.cache import BoundedCache
from guard.dataplane.codec import varint
from guard.dataplane.codec.views import F_DOUBLE, F_FLOAT, F_HALF, F_INT64, TypedTensor
from guard.dataplane.dtypes import FLOAT32, FLOAT64, INT64
from guard.dataplane.errors import DecodeError

__all__ = [
    "DT_BFLOAT16",
    "DT_DOUBLE",
    "DT_FLOAT",
    "DT_HALF",
    "DT_INT64",
    "DT_STRING",
    "FLOAT_DTYPES",
    "Encoding",
    "decode_tensor",
    "encode_output",
    "float_dtype",
    "entry_head",
    "packed_key",
    "set_tensor",
    "string_field",
    "tensor_values",
]

Buffer = bytes | memoryview
Array = np.ndarray[Any, Any]

# tensorflow/core/framework/types.proto
DT_FLOAT = 1
DT_DOUBLE = 2
DT_STRING = 7
DT_INT64 = 9
DT_HALF = 19
DT_BFLOAT16 = 14


class Encoding(Enum):
    """How a TensorProto carries its values."""

    TYPED = "typed"  # float_val, double_val, ... (TF Serving's default)
    CONTENT = "tensor_content"


@dataclass(frozen=True)
class _DType:
    numpy: np.dtype[Any]
    field: str
    number: int
    varint: bool  # half_val and int64_val are varints on the wire; float/double are fixed


FLOAT_DTYPES: dict[int, _DType] = {
    DT_FLOAT: _DType(FLOAT32, "float_val", F_FLOAT, False),
    DT_DOUBLE: _DType(FLOAT64, "double_val", F_DOUBLE, False),
    DT_HALF: _DType(np.dtype("<f2"), "half_val", F_HALF, True),
}
_INT64 = _DType(INT64, "int64_val", F_INT64, True)
_DTYPE_OF_NUMPY: dict[np.dtype[Any], int] = {
    np.dtype("float32"): DT_FLOAT,
    np.dtype("float64"): DT_DOUBLE,
    np.dtype("float16"): DT_HALF,
    np.dtype("int64"): DT_INT64,
}
_MAX_RANK = 32  # numpy handles 64; no real model output comes near either


# ------------------------------------------------------------------- decoding


def _numel(shape: Sequence[int], itemsize: int, limit_bytes: int) -> int:
    if len(shape) > _MAX_RANK:
        raise DecodeError(f"tensor has rank {len(shape)}; the guard handles up to {_MAX_RANK}")
    n, span = 1, 1
    for d in shape:
        if d < 0:
            raise DecodeError(f"tensor shape {list(shape)} has a negative dimension")
        n *= d  # Python ints: no int64 overflow, so the checks below are exact
        span *= max(d, 1)
    if n * itemsize > limit_bytes:
        raise DecodeError(
            f"tensor shape {list(shape)} needs {n * itemsize} bytes, more than the "
            f"{limit_bytes}-byte message limit allows"
        )
    if span * itemsize > limit_bytes:
        # An empty tensor's other dimensions still size the work done per row
        # or class: 25 bytes of [2**27, 0] had a check_sum rule build 3 GB of
        # row arrays, and [0, 2**62] failed in numpy's reshape.
        raise DecodeError(
            f"tensor shape {list(shape)} holds no values, but its other dimensions span "
            f"{span * itemsize} bytes, more than the {limit_bytes}-byte message limit allows"
        )
    return n


def _has_unpacked(tensor: Any, number: int) -> bool:
    fields = pb_unknown.UnknownFieldSet(tensor)
    n = len(fields)
    return n > 0 and any(fields[i].field_number == number for i in range(n))


def _typed_values(typed: Any, dt: _DType) -> Array:
    """Fallback: the values of a fully typed tensor view, in wire order."""
    values = getattr(typed, dt.field)
    if dt.numpy == np.dtype("<f2"):
        return np.asarray(values, dtype=np.uint16).view("<f2")
    return np.asarray(values, dtype=dt.numpy)


def float_dtype(dtype: int) -> _DType | None:
    """The floating-point dtype the guard reads, or ``None`` for a dtype it
    leaves alone (integers, strings, booleans). ``DecodeError`` for
    DT_BFLOAT16, a float it does not read, and for the reference types of
    the floats (DT_FLOAT_REF is DT_FLOAT + 100), which TF Serving never
    answers with and TensorFlow reads as their base type: the values of
    either had passed as clean under a reject rule."""
    dt = FLOAT_DTYPES.get(dtype)
    if dt is not None:
        return dt
    if dtype == DT_BFLOAT16:
        raise DecodeError(
            "the tensor is DT_BFLOAT16, which the guard does not read, and a rule applies "
            "to it; serve the output as DT_FLOAT (tf.cast in the signature), or give "
            "rules to the other outputs by name"
        )
    if dtype - _REF in FLOAT_DTYPES or dtype - _REF == DT_BFLOAT16:
        raise DecodeError(
            f"the tensor's dtype is {dtype}, a reference type (DT_FLOAT_REF and its kin), "
            "which TF Serving never answers with; fix the upstream"
        )
    return None


_REF = 100  # types.proto: each DT_*_REF is its DT_* + 100


def _check_own_field(tensor: Any, dt: _DType | None) -> None:
    """Float values only in the dtype's own field, and none in a tensor of a
    dtype the guard leaves alone (``dt`` is ``None``): a DT_HALF tensor's
    values in float_val were read as no values (zeros, by the fill
    convention), and a DT_INT64 tensor's were not read at all; both passed
    as clean, while a client reading float_val read them."""
    own = dt.field if dt is not None else None
    for field in _FLOAT_FIELDS:
        if field == own or not len(getattr(tensor, field)):
            continue
        if own is None:
            raise DecodeError(
                f"the tensor's dtype is {tensor.dtype}, not a floating-point type, and it holds "
                f"values in {field}; readers differ on which they read: fix the upstream"
            )
        raise DecodeError(
            f"the tensor holds values in {field}, which its dtype does not use "
            f"({own}); readers differ on which they read"
        )


_FLOAT_FIELDS = ("float_val", "double_val", "half_val")


def decode_tensor(
    tensor: Any, limit_bytes: int, typed_fallback: Callable[[], Any] | None = None
) -> tuple[Array, Encoding] | None:
    """Decode a floating-point TensorProto view to an array and its encoding.

    Returns ``None`` for a dtype the guard does not check. Follows TF's fill
    convention: fewer typed values than elements repeat the last value, none
    means zeros. The returned array may be read-only (a view of the message).

    ``typed_fallback`` returns the same tensor parsed with the fully typed view,
    from the original bytes; it is called only when values were sent unpacked.
    """
    dt = float_dtype(tensor.dtype)  # raises for DT_BFLOAT16, whose own field is half_val
    _check_own_field(tensor, dt)
    if dt is None:
        return None
    shape = tuple([d.size for d in tensor.tensor_shape.dim])
    runs = getattr(tensor, dt.field)
    unpacked = None
    if _has_unpacked(tensor, dt.number):

        def unpacked() -> Array:
            try:
                typed = (
                    typed_fallback()
                    if typed_fallback is not None
                    else TypedTensor.FromString(tensor.SerializeToString())
                )
            except pb_message.DecodeError as exc:
                raise DecodeError(
                    f"{dt.field} sent unpacked, and the tensor is malformed: {exc}"
                ) from None
            return _typed_values(typed, dt)

    data = runs[0] if len(runs) == 1 else b"".join(runs)
    return tensor_values(dt, shape, tensor.tensor_content, data, limit_bytes, unpacked)


def tensor_values(
    dt: _DType,
    shape: tuple[int, ...],
    content: Buffer,
    data: Buffer,
    limit_bytes: int,
    unpacked: Callable[[], Array] | None = None,
) -> tuple[Array, Encoding]:
    """A tensor's values from its ``tensor_content`` (used when not empty) or
    its packed value field, shared by the view and the walked layout."""
    numel = _numel(shape, dt.numpy.itemsize, limit_bytes)
    if len(content):
        if len(data) or unpacked is not None:
            # TensorFlow reads tensor_content; a client reading float_val
            # would read the other values, which no rule would have seen.
            raise DecodeError(
                f"the tensor holds values in both tensor_content and {dt.field}; "
                "readers differ on which they read"
            )
        if len(content) != numel * dt.numpy.itemsize:
            raise DecodeError(
                f"tensor_content has {len(content)} bytes but shape {list(shape)} of "
                f"{dt.field[:-4]} needs {numel * dt.numpy.itemsize}"
            )
        return _aligned(np.frombuffer(content, dtype=dt.numpy)).reshape(shape), Encoding.CONTENT
    flat = unpacked() if unpacked is not None else _packed_values(dt, data)
    return _filled(flat, dt, shape, numel), Encoding.TYPED


def _packed_values(dt: _DType, data: Buffer) -> Array:
    if dt.varint:
        return varint.decode_packed(data).astype(np.uint16).view("<f2")
    if len(data) % dt.numpy.itemsize:
        raise DecodeError(f"{dt.field} has {len(data)} bytes, not a whole number of values")
    return _aligned(np.frombuffer(data, dtype=dt.numpy))


def _filled(flat: Array, dt: _DType, shape: tuple[int, ...], numel: int) -> Array:
    """TF's fill convention: fewer values than elements repeat the last one."""
    n = flat.size
    if n == numel:
        return flat.reshape(shape)
    if n > numel:
        raise DecodeError(f"{dt.field} has {n} values but shape {list(shape)} holds {numel}")
    if n == 0:
        return np.zeros(shape, dtype=dt.numpy)
    filled = np.empty(numel, dtype=dt.numpy)
    filled[:n] = flat
    filled[n:] = flat[-1]
    return filled.reshape(shape)


def _aligned(array: Array) -> Array:
    # Values read in place from the response bytes sit wherever the encoder put
    # them; the native kernels and numpy's fast loops want them aligned.
    return array if array.flags.aligned else array.copy()


# ------------------------------------------------------------------- encoding

_VALUE_FIELDS = ("tensor_content", "string_val", "float_val", "double_val", "int64_val", "half_val")


def _dtype_of(array: Array) -> tuple[int, _DType | None]:
    if array.dtype == object:
        return DT_STRING, None
    dtype_enum = _DTYPE_OF_NUMPY[array.dtype]
    return dtype_enum, _INT64 if dtype_enum == DT_INT64 else FLOAT_DTYPES[dtype_enum]


def _raw(array: Array, dt: _DType, encoding: Encoding) -> tuple[int, bytes]:
    """The field number and payload that carry ``array``'s values."""
    if encoding is Encoding.CONTENT:
        return 4, np.ascontiguousarray(array, dtype=dt.numpy).tobytes()
    if dt.varint:
        as_int = array.view(np.uint16) if dt.numpy.itemsize == 2 else array
        return dt.number, varint.encode_packed(as_int)
    return dt.number, np.ascontiguousarray(array, dtype=dt.numpy).tobytes()


def set_tensor(tensor: Any, array: Array, encoding: Encoding) -> None:
    """Write ``array`` into a TensorProto view (dtype, shape, values) in ``encoding``.

    Float and int64 arrays keep their dtype; an array of ``bytes`` objects becomes
    a DT_STRING tensor (always ``string_val``, as TensorFlow writes strings).
    """
    dtype_enum, dt = _dtype_of(array)
    dims = tensor.tensor_shape.dim
    keep_dims = tensor.dtype != 0 and tuple(d.size for d in dims) == array.shape
    if tensor.dtype != 0:  # an upstream tensor being rewritten (0: a fresh derived one)
        # A value sent unpacked sits in the unknown fields; it must not come back.
        tensor.DiscardUnknownFields()
        for name in _VALUE_FIELDS:
            tensor.ClearField(name)
        if not keep_dims:
            del dims[:]
    tensor.dtype = dtype_enum
    if not keep_dims:
        for size in array.shape:
            dims.add(size=size)
    if dt is None:
        tensor.string_val.extend(array.ravel().tolist())
        return
    number, raw = _raw(array, dt, encoding)
    if number == 4:
        tensor.tensor_content = raw
    else:
        getattr(tensor, dt.field).append(raw)


# Wire keys (field number << 3 | wire type 2) of the length-delimited fields
# ``encode_output`` writes, and of the int64 ``size`` of a shape dimension.
_K_MAP_ENTRY = b"\x0a"  # PredictResponse.outputs = 1; also the entry's key = 1
_K_ENTRY_VALUE = b"\x12"  # map entry value = 2
_K_DTYPE = b"\x08"  # TensorProto.dtype = 1 (varint)
_K_SHAPE = b"\x12"  # TensorProto.tensor_shape = 2; also TensorShapeProto.dim = 2
_K_DIM_SIZE = b"\x08"  # Dim.size = 1 (varint)
_K_STRING = b"\x42"  # string_val = 8
_K_FIELD = {4: b"\x22", F_FLOAT: b"\x2a", F_DOUBLE: b"\x32", F_INT64: b"\x52", F_HALF: b"\x6a"}


def _delimited(key: bytes, payload: bytes) -> bytes:
    return key + varint.encode(len(payload)) + payload


# Derived strings are labels from the config, so the same few values repeat.
_STRING_FIELDS: BoundedCache[bytes, bytes] = BoundedCache(1 << 16, max_key_bytes=1024, weigh=len)


def _string_values(items: list[bytes]) -> bytes:
    fields = _STRING_FIELDS
    try:
        return b"".join(map(fields.lookup, items))  # 1.7x a list comprehension
    except KeyError:
        pass
    for s in set(items):
        fields.put(s, string_field(s))
    try:
        return b"".join(map(fields.lookup, items))
    except KeyError:  # more distinct labels than the cache holds, or very long ones
        return b"".join([string_field(s) for s in items])


def string_field(value: bytes) -> bytes:
    """One ``string_val`` field, as written inside a TensorProto."""
    return _K_STRING + varint.encode(len(value)) + value


def packed_key(dtype_enum: int) -> bytes:
    """The one-byte key of the packed field that holds values of a float dtype."""
    return _K_FIELD[FLOAT_DTYPES[dtype_enum].number]


_HEADS: BoundedCache[tuple[str, int, tuple[int, ...]], tuple[bytes, bytes]] = BoundedCache(
    4096, max_key_bytes=1024, weigh=lambda key: len(key[0]) + 8 * len(key[2])
)


def entry_head(name: str, dtype_enum: int, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """The map entry's key field, and the tensor's dtype and shape fields.

    Cached: derived outputs repeat the same names, dtypes and batch shapes.
    """
    return _HEADS.get_or_make((name, dtype_enum, shape), _head, name, dtype_enum, shape)


def _head(name: str, dtype_enum: int, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    # A dimension of size 0 is an empty Dim message, as protobuf writes it.
    dims = b"".join(
        [_delimited(_K_SHAPE, _K_DIM_SIZE + varint.encode(d) if d else b"") for d in shape]
    )
    head = _K_DTYPE + varint.encode(dtype_enum) + (_delimited(_K_SHAPE, dims) if dims else b"")
    return _delimited(_K_MAP_ENTRY, name.encode("utf-8")), head


def encode_output(name: str, array: Array, encoding: Encoding) -> bytes:
    """One ``PredictResponse.outputs`` map entry holding ``array``, as wire bytes.

    Appended to a serialized PredictResponse, the entry adds (or replaces) the
    output ``name``: protobuf merges concatenated messages. The tensor is
    written as :func:`set_tensor` writes it (same dtype and encoding rules), and
    the official classes read it back the same; building the bytes directly
    skips a message object per derived output, which dominated small responses.
    """
    dtype_enum, dt = _dtype_of(array)
    if dt is None:
        values = _string_values(array.ravel().tolist())
    else:
        number, raw = _raw(array, dt, encoding)
        values = _delimited(_K_FIELD[number], raw) if raw else b""  # proto3 omits empties
    key_field, head = entry_head(name, dtype_enum, array.shape)
    body = head + values
    entry = b"".join([key_field, _K_ENTRY_VALUE, varint.encode(len(body)), body])
    return _delimited(_K_MAP_ENTRY, entry)
