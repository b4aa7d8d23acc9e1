"""PredictResponse and TensorProto views: bytes <-> numpy, both encodings.

The guard must not import TensorFlow, so it declares its own "view" messages
with TensorFlow's field numbers (wire-format facts from
``tensorflow/core/framework/tensor.proto`` and ``tensorflow_serving/apis``).
The packed numeric fields (``float_val`` = 5, ``double_val`` = 6,
``int64_val`` = 10, ``half_val`` = 13) are declared as ``repeated bytes``: the
protobuf runtime hands each packed run over as one ``bytes`` object, which
``np.frombuffer`` reads without a per-value conversion, and writing
``array.tobytes()`` back produces exactly the packed encoding. A tensor whose
values were sent unpacked (legal protobuf) lands in the unknown fields; it is
detected and decoded through a fully typed view instead.

This module knows nothing of rules or gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf import message as pb_message
from google.protobuf import unknown_fields as pb_unknown

from guard.dataplane.errors import DecodeError

try:
    from guard.dataplane import _walk
except ImportError:  # built by setup.py when a C compiler is there; optional
    _walk = None  # type: ignore[assignment]

__all__ = [
    "DT_DOUBLE",
    "DT_FLOAT",
    "DT_HALF",
    "DT_INT64",
    "DT_STRING",
    "Encoding",
    "ModelSpecInfo",
    "OutputLayout",
    "PredictResponseView",
    "Response",
    "Walked",
    "decode_tensor",
    "decode_varints",
    "encode_output",
    "encode_varints",
    "entry_head",
    "packed_key",
    "parse_predict_response",
    "peek_model_spec",
    "read_predict_response",
    "set_tensor",
    "string_field",
    "walk_predict_response",
]

Buffer = bytes | memoryview

#: Whether the native walker (``guard.dataplane._walk``) is built into this install.
NATIVE_WALK = _walk is not None

# tensorflow/core/framework/types.proto
DT_FLOAT = 1
DT_DOUBLE = 2
DT_STRING = 7
DT_INT64 = 9
DT_HALF = 19

# TensorProto field numbers whose values we read or write.
_F_FLOAT, _F_DOUBLE, _F_INT64, _F_HALF = 5, 6, 10, 13


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
    DT_FLOAT: _DType(np.dtype("<f4"), "float_val", _F_FLOAT, False),
    DT_DOUBLE: _DType(np.dtype("<f8"), "double_val", _F_DOUBLE, False),
    DT_HALF: _DType(np.dtype("<f2"), "half_val", _F_HALF, True),
}
_INT64 = _DType(np.dtype("<i8"), "int64_val", _F_INT64, True)
_DTYPE_OF_NUMPY: dict[np.dtype[Any], int] = {
    np.dtype("float32"): DT_FLOAT,
    np.dtype("float64"): DT_DOUBLE,
    np.dtype("float16"): DT_HALF,
    np.dtype("int64"): DT_INT64,
}


# ------------------------------------------------------------------ descriptors

_F = descriptor_pb2.FieldDescriptorProto


def add_field(
    msg: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    ftype: int,
    *,
    repeated: bool = False,
    type_name: str = "",
) -> None:
    """Declare one field on a DescriptorProto (for the view messages)."""
    f = msg.field.add(name=name, number=number, type=ftype)
    f.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name:
        f.type_name = type_name


def add_map_field(
    msg: descriptor_pb2.DescriptorProto, full_name: str, name: str, number: int, value_type: str
) -> None:
    """Declare ``map<string, value_type> name = number`` on ``msg`` (whose fully
    qualified name is ``full_name``), with its nested entry type, as protoc does."""
    entry_name = "".join(part.title() for part in name.split("_")) + "Entry"
    entry = msg.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    add_field(entry, "key", 1, _F.TYPE_STRING)
    add_field(entry, "value", 2, _F.TYPE_MESSAGE, type_name=value_type)
    add_field(
        msg, name, number, _F.TYPE_MESSAGE, repeated=True, type_name=f"{full_name}.{entry_name}"
    )


def _build_pool(typed: bool) -> descriptor_pool.DescriptorPool:
    """Declare the view messages in a private pool (never TF's own names)."""
    pkg = "guard.view.typed" if typed else "guard.view"
    fdp = descriptor_pb2.FileDescriptorProto(
        name=f"{pkg.replace('.', '/')}.proto", package=pkg, syntax="proto3"
    )

    shape = fdp.message_type.add(name="TensorShapeProto")
    dim = shape.nested_type.add(name="Dim")
    add_field(dim, "size", 1, _F.TYPE_INT64)
    add_field(dim, "name", 2, _F.TYPE_STRING)
    add_field(
        shape, "dim", 2, _F.TYPE_MESSAGE, repeated=True, type_name=f".{pkg}.TensorShapeProto.Dim"
    )
    add_field(shape, "unknown_rank", 3, _F.TYPE_BOOL)

    tensor = fdp.message_type.add(name="TensorProto")
    add_field(tensor, "dtype", 1, _F.TYPE_INT32)  # an enum in TF; int32 keeps unknown values
    add_field(tensor, "tensor_shape", 2, _F.TYPE_MESSAGE, type_name=f".{pkg}.TensorShapeProto")
    add_field(tensor, "version_number", 3, _F.TYPE_INT32)
    add_field(tensor, "tensor_content", 4, _F.TYPE_BYTES)
    add_field(tensor, "string_val", 8, _F.TYPE_BYTES, repeated=True)
    if typed:
        # Accepts packed and unpacked runs alike; used only as the fallback.
        add_field(tensor, "float_val", _F_FLOAT, _F.TYPE_FLOAT, repeated=True)
        add_field(tensor, "double_val", _F_DOUBLE, _F.TYPE_DOUBLE, repeated=True)
        add_field(tensor, "int64_val", _F_INT64, _F.TYPE_INT64, repeated=True)
        add_field(tensor, "half_val", _F_HALF, _F.TYPE_INT32, repeated=True)
    else:
        for name, number in (
            ("float_val", _F_FLOAT),
            ("double_val", _F_DOUBLE),
            ("int64_val", _F_INT64),
            ("half_val", _F_HALF),
        ):
            add_field(tensor, name, number, _F.TYPE_BYTES, repeated=True)

    i64 = fdp.message_type.add(name="Int64Value")
    add_field(i64, "value", 1, _F.TYPE_INT64)

    spec = fdp.message_type.add(name="ModelSpec")
    add_field(spec, "name", 1, _F.TYPE_STRING)
    add_field(spec, "version", 2, _F.TYPE_MESSAGE, type_name=f".{pkg}.Int64Value")
    add_field(spec, "signature_name", 3, _F.TYPE_STRING)
    add_field(spec, "version_label", 4, _F.TYPE_STRING)

    resp = fdp.message_type.add(name="PredictResponse")
    add_map_field(resp, f".{pkg}.PredictResponse", "outputs", 1, f".{pkg}.TensorProto")
    add_field(resp, "model_spec", 2, _F.TYPE_MESSAGE, type_name=f".{pkg}.ModelSpec")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return pool


def _classes(typed: bool) -> dict[str, Any]:
    pool = _build_pool(typed)
    pkg = "guard.view.typed" if typed else "guard.view"
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.{name}"))
        for name in ("TensorProto", "ModelSpec", "PredictResponse")
    }


_VIEW = _classes(typed=False)
_TYPED = _classes(typed=True)
PredictResponseView: Any = _VIEW["PredictResponse"]
TensorView: Any = _VIEW["TensorProto"]
_ModelSpecView: Any = _VIEW["ModelSpec"]
_TypedTensor: Any = _TYPED["TensorProto"]
TypedPredictResponse: Any = _TYPED["PredictResponse"]


# ---------------------------------------------------------------------- varints


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint(n: int) -> bytes:
    """One non-negative integer as a varint (one- and two-byte cases first)."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINT_TABLE_MAX = 1 << 14  # one- and two-byte varints: at most 16,384 small objects
_VARINT_TABLE: list[bytes] = []


def _varint_table(top: int) -> list[bytes]:
    """The encodings of 0..top (at least), grown on demand; class indices repeat."""
    table = _VARINT_TABLE
    if len(table) <= top:
        table.extend(_varint(n) for n in range(len(table), top + 1))
    return table


def decode_varints(data: Buffer) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """Decode a packed run of base-128 varints, vectorised."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(b < 0x80)
    if ends.size == 0 or ends[-1] != b.size - 1:
        raise DecodeError("truncated varint in a packed field")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise DecodeError("varint longer than 10 bytes in a packed field")
    values = np.zeros(ends.size, dtype=np.uint64)
    payload = (b & 0x7F).astype(np.uint64)
    for g in range(int(lengths.max())):
        sel = lengths > g
        values[sel] |= payload[starts[sel] + g] << np.uint64(7 * g)
    return values


_SMALL_VARINT_RUN = 256
_U64_MASK = (1 << 64) - 1


def encode_varints(values: np.ndarray[Any, Any]) -> bytes:
    """Encode integers as a packed run of varints (negative int64 as 10 bytes, as protobuf does)."""
    if values.size <= _SMALL_VARINT_RUN:
        # A few dozen values (class indices): Python ints and a table of
        # encodings beat a dozen numpy calls (measured 4x).
        items = values.ravel().tolist()
        if not items:
            return b""
        top = max(items)
        if min(items) >= 0 and top < _VARINT_TABLE_MAX:
            table = _varint_table(top)
            return b"".join([table[x] for x in items])
        return b"".join([_varint(x & _U64_MASK) for x in items])  # negatives: 10 bytes
    v = np.ascontiguousarray(values).astype(np.int64, copy=False).view(np.uint64).ravel()
    top = int(v.max())
    if top < 0x80:
        # Class indices and 0/1 flags: one byte each, the common case by far.
        return v.astype(np.uint8).tobytes()
    if top < 0x4000:
        # One or two bytes each: place each varint's first byte, then the
        # second bytes of those that need one.
        two = v >= 0x80
        start = np.arange(v.size) + np.cumsum(two) - two
        out2 = np.empty(v.size + int(np.count_nonzero(two)), dtype=np.uint8)
        out2[start] = (v & np.uint64(0x7F)).astype(np.uint8) | (two.astype(np.uint8) << 7)
        out2[start[two] + 1] = (v[two] >> np.uint64(7)).astype(np.uint8)
        return out2.tobytes()
    nbytes = np.ones(v.size, dtype=np.int64)
    rest = v >> np.uint64(7)
    while rest.any():
        nbytes += rest > 0
        rest >>= np.uint64(7)
    offsets = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for g in range(int(nbytes.max())):
        sel = nbytes > g
        group = ((v[sel] >> np.uint64(7 * g)) & np.uint64(0x7F)).astype(np.uint8)
        more = (nbytes[sel] - 1 > g).astype(np.uint8) << 7
        out[offsets[sel] + g] = group | more
    return out.tobytes()


# ---------------------------------------------------------------------- tensors


_MAX_RANK = 32  # numpy handles 64; no real model output comes near either


def _numel(shape: Sequence[int], itemsize: int, limit_bytes: int) -> int:
    if len(shape) > _MAX_RANK:
        raise DecodeError(f"tensor has rank {len(shape)}; the guard handles up to {_MAX_RANK}")
    n = 1
    for d in shape:
        if d < 0:
            raise DecodeError(f"tensor shape {list(shape)} has a negative dimension")
        n *= d  # Python ints: no int64 overflow, so the check below is exact
    if n * itemsize > limit_bytes:
        raise DecodeError(
            f"tensor shape {list(shape)} needs {n * itemsize} bytes, more than the "
            f"{limit_bytes}-byte message limit allows"
        )
    return n


def _has_unpacked(tensor: Any, number: int) -> bool:
    fields = pb_unknown.UnknownFieldSet(tensor)
    n = len(fields)
    return n > 0 and any(fields[i].field_number == number for i in range(n))


def _typed_values(typed: Any, dt: _DType) -> np.ndarray[Any, Any]:
    """Fallback: the values of a fully typed tensor view, in wire order."""
    values = getattr(typed, dt.field)
    if dt.numpy == np.dtype("<f2"):
        return np.asarray(values, dtype=np.uint16).view("<f2")
    return np.asarray(values, dtype=dt.numpy)


def decode_tensor(
    tensor: Any, limit_bytes: int, typed_fallback: Callable[[], Any] | None = None
) -> tuple[np.ndarray[Any, Any], Encoding] | None:
    """Decode a floating-point TensorProto view to an array and its encoding.

    Returns ``None`` for a dtype the guard does not check. Follows TF's fill
    convention: fewer typed values than elements repeat the last value, none
    means zeros. The returned array may be read-only (a view of the message).

    ``typed_fallback`` returns the same tensor parsed with the fully typed view,
    from the original bytes; it is called only when values were sent unpacked.
    """
    dt = FLOAT_DTYPES.get(tensor.dtype)
    if dt is None:
        return None
    shape = tuple([d.size for d in tensor.tensor_shape.dim])
    runs = getattr(tensor, dt.field)
    unpacked = None
    if _has_unpacked(tensor, dt.number):

        def unpacked() -> np.ndarray[Any, Any]:
            try:
                typed = (
                    typed_fallback()
                    if typed_fallback is not None
                    else _TypedTensor.FromString(tensor.SerializeToString())
                )
            except pb_message.DecodeError as exc:
                raise DecodeError(
                    f"{dt.field} sent unpacked, and the tensor is malformed: {exc}"
                ) from None
            return _typed_values(typed, dt)

    return _tensor_values(
        dt,
        shape,
        tensor.tensor_content,
        runs[0] if len(runs) == 1 else b"".join(runs),
        limit_bytes,
        unpacked,
    )


def _tensor_values(
    dt: _DType,
    shape: tuple[int, ...],
    content: Buffer,
    data: Buffer,
    limit_bytes: int,
    unpacked: Callable[[], np.ndarray[Any, Any]] | None = None,
) -> tuple[np.ndarray[Any, Any], Encoding]:
    """A tensor's values from its ``tensor_content`` (used when not empty) or
    its packed value field, shared by the view and the walked layout."""
    numel = _numel(shape, dt.numpy.itemsize, limit_bytes)
    if len(content):
        if len(content) != numel * dt.numpy.itemsize:
            raise DecodeError(
                f"tensor_content has {len(content)} bytes but shape {list(shape)} of "
                f"{dt.field[:-4]} needs {numel * dt.numpy.itemsize}"
            )
        return _aligned(np.frombuffer(content, dtype=dt.numpy)).reshape(shape), Encoding.CONTENT
    if dt.varint:
        flat: np.ndarray[Any, Any] = decode_varints(data).astype(np.uint16).view("<f2")
    else:
        if len(data) % dt.numpy.itemsize:
            raise DecodeError(f"{dt.field} has {len(data)} bytes, not a whole number of values")
        flat = _aligned(np.frombuffer(data, dtype=dt.numpy))
    if unpacked is not None:
        flat = unpacked()
    n = flat.size
    if n == numel:
        return flat.reshape(shape), Encoding.TYPED
    if n > numel:
        raise DecodeError(f"{dt.field} has {n} values but shape {list(shape)} holds {numel}")
    if n == 0:
        return np.zeros(shape, dtype=dt.numpy), Encoding.TYPED
    filled = np.empty(numel, dtype=dt.numpy)
    filled[:n] = flat
    filled[n:] = flat[-1]
    return filled.reshape(shape), Encoding.TYPED


def _aligned(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # Values read in place from the response bytes sit wherever the encoder put
    # them; the native kernels and numpy's fast loops want them aligned.
    return array if array.flags.aligned else array.copy()


_VALUE_FIELDS = ("tensor_content", "string_val", "float_val", "double_val", "int64_val", "half_val")


def set_tensor(tensor: Any, array: np.ndarray[Any, Any], encoding: Encoding) -> None:
    """Write ``array`` into a TensorProto view (dtype, shape, values) in ``encoding``.

    Float and int64 arrays keep their dtype; an array of ``bytes`` objects becomes
    a DT_STRING tensor (always ``string_val``, as TensorFlow writes strings).
    """
    dtype_enum = DT_STRING if array.dtype == object else _DTYPE_OF_NUMPY[array.dtype]
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
    if dtype_enum == DT_STRING:
        tensor.string_val.extend(array.ravel().tolist())
        return
    dt = _INT64 if dtype_enum == DT_INT64 else FLOAT_DTYPES[dtype_enum]
    if encoding is Encoding.CONTENT:
        tensor.tensor_content = np.ascontiguousarray(array, dtype=dt.numpy).tobytes()
    elif dt.varint:
        as_int = array.view(np.uint16) if dt.numpy == np.dtype("<f2") else array
        getattr(tensor, dt.field).append(encode_varints(as_int))
    else:
        getattr(tensor, dt.field).append(np.ascontiguousarray(array, dtype=dt.numpy).tobytes())


# Wire keys (field number << 3 | wire type 2) of the length-delimited fields
# ``encode_output`` writes, and of the int64 ``size`` of a shape dimension.
_K_MAP_ENTRY = b"\x0a"  # PredictResponse.outputs = 1; also the entry's key = 1
_K_ENTRY_VALUE = b"\x12"  # map entry value = 2
_K_DTYPE = b"\x08"  # TensorProto.dtype = 1 (varint)
_K_SHAPE = b"\x12"  # TensorProto.tensor_shape = 2; also TensorShapeProto.dim = 2
_K_DIM_SIZE = b"\x08"  # Dim.size = 1 (varint)
_K_CONTENT = b"\x22"  # tensor_content = 4
_K_STRING = b"\x42"  # string_val = 8
_K_PACKED = {_F_FLOAT: b"\x2a", _F_DOUBLE: b"\x32", _F_INT64: b"\x52", _F_HALF: b"\x6a"}


def _delimited(key: bytes, payload: bytes) -> bytes:
    return key + _varint(len(payload)) + payload


_STRING_FIELDS: dict[bytes, bytes] = {}
_STRING_FIELDS_MAX = 1 << 16


def _string_values(items: list[bytes]) -> bytes:
    # Derived strings are labels from the config, so the same few values repeat:
    # their encoded fields are cached (bounded; cleared when full).
    fields = _STRING_FIELDS
    try:
        return b"".join(map(fields.__getitem__, items))  # 1.7x a list comprehension
    except KeyError:
        pass
    if len(fields) > _STRING_FIELDS_MAX:
        fields.clear()
    for s in items:
        if s not in fields:
            fields[s] = string_field(s)
    return b"".join(map(fields.__getitem__, items))


def string_field(value: bytes) -> bytes:
    """One ``string_val`` field, as written inside a TensorProto."""
    return _K_STRING + _varint(len(value)) + value


def packed_key(dtype_enum: int) -> bytes:
    """The one-byte key of the packed field that holds values of a float dtype."""
    return _K_PACKED[FLOAT_DTYPES[dtype_enum].number]


_HEADS: dict[tuple[str, int, tuple[int, ...]], tuple[bytes, bytes]] = {}
_HEADS_MAX = 4096


def entry_head(name: str, dtype_enum: int, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """The map entry's key field, and the tensor's dtype and shape fields.

    Cached: derived outputs repeat the same names, dtypes and batch shapes.
    """
    cache_key = (name, dtype_enum, shape)
    found = _HEADS.get(cache_key)
    if found is not None:
        return found
    # A dimension of size 0 is an empty Dim message, as protobuf writes it.
    dims = b"".join([_delimited(_K_SHAPE, _K_DIM_SIZE + _varint(d) if d else b"") for d in shape])
    head = _K_DTYPE + _varint(dtype_enum) + (_delimited(_K_SHAPE, dims) if dims else b"")
    found = (_delimited(_K_MAP_ENTRY, name.encode("utf-8")), head)
    if len(_HEADS) >= _HEADS_MAX:
        _HEADS.clear()
    _HEADS[cache_key] = found
    return found


def encode_output(name: str, array: np.ndarray[Any, Any], encoding: Encoding) -> bytes:
    """One ``PredictResponse.outputs`` map entry holding ``array``, as wire bytes.

    Appended to a serialized PredictResponse, the entry adds (or replaces) the
    output ``name``: protobuf merges concatenated messages. The tensor is
    written as :func:`set_tensor` writes it (same dtype and encoding rules), and
    the official classes read it back the same; building the bytes directly
    skips a message object per derived output, which dominated small responses.
    """
    if array.dtype == object:
        dtype_enum = DT_STRING
        values = _string_values(array.ravel().tolist())
    else:
        dtype_enum = _DTYPE_OF_NUMPY[array.dtype]
        dt = _INT64 if dtype_enum == DT_INT64 else FLOAT_DTYPES[dtype_enum]
        if encoding is Encoding.CONTENT:
            raw = np.ascontiguousarray(array, dtype=dt.numpy).tobytes()
            key = _K_CONTENT
        elif dt.varint:
            raw = encode_varints(array.view(np.uint16) if dt.numpy.itemsize == 2 else array)
            key = _K_PACKED[dt.number]
        else:
            raw = np.ascontiguousarray(array, dtype=dt.numpy).tobytes()
            key = _K_PACKED[dt.number]
        values = _delimited(key, raw) if raw else b""  # proto3 omits empty fields
    key_field, head = entry_head(name, dtype_enum, array.shape)
    entry = b"".join([key_field, _K_ENTRY_VALUE, _varint(len(head) + len(values)), head, values])
    return _delimited(_K_MAP_ENTRY, entry)


# --------------------------------------------------------------- responses/specs


def parse_predict_response(data: bytes) -> Any:
    """Parse PredictResponse bytes into a view. Raises :class:`DecodeError`."""
    try:
        view = PredictResponseView.FromString(data)
    except pb_message.DecodeError as exc:
        raise DecodeError(f"guard: cannot decode PredictResponse from upstream: {exc}") from None
    if not view.outputs:
        raise DecodeError(
            f"guard: cannot decode PredictResponse from upstream: {len(data)} bytes hold no outputs"
        )
    return view


class ModelSpecInfo(NamedTuple):
    """The parts of a ModelSpec the guard routes and labels by.

    A named tuple: one is made per request and per response, and a tuple is
    made in C, where a frozen dataclass sets each field in Python.
    """

    name: str
    signature_name: str
    version: int | None


def _spec_info(spec: Any) -> ModelSpecInfo:
    version = spec.version.value if spec.HasField("version") else None
    return ModelSpecInfo(spec.name, spec.signature_name, version)


def response_spec(view: Any) -> ModelSpecInfo | None:
    """The response's ``model_spec``, if the upstream set one."""
    return _spec_info(view.model_spec) if view.HasField("model_spec") else None


#: One output as ``guard.dataplane._walk`` reports it: (name, dtype, shape, from_content,
#: offset, length); offset and length locate its values in the response bytes.
OutputLayout = tuple[str, int, tuple[int, ...], int, int, int]


class Response:
    """A PredictResponse read for guarding: its spec, its output names, each
    output's values on demand, and the protobuf view to rewrite it with.

    Made by :func:`read_predict_response`, from the native walker's layout
    (values read in place from the bytes) or from the protobuf view.
    """

    __slots__ = ("data", "spec", "names", "layout", "_by_name", "_view", "_typed")

    def __init__(
        self,
        data: bytes,
        spec: ModelSpecInfo | None,
        names: Collection[str],
        view: Any = None,
        walked: Walked | None = None,
    ) -> None:
        self.data = data
        self.spec = spec
        """The response's ``model_spec``, if the upstream set one."""
        self.names = names
        """The output names, as a set-like collection."""
        self.layout: tuple[OutputLayout, ...] | None = None
        """Each output's layout in wire order (``None`` when protobuf parsed the response)."""
        self._by_name: dict[str, OutputLayout] | None = None
        if walked is not None:
            _, self.layout, self._by_name = walked
        self._view = view
        self._typed: Any = None

    def decode(self, name: str, limit_bytes: int) -> tuple[np.ndarray[Any, Any], Encoding] | None:
        """Output ``name`` as :func:`decode_tensor` decodes it."""
        by_name = self._by_name
        if by_name is None:
            return decode_tensor(self._view.outputs[name], limit_bytes, self._typed_fallback(name))
        _, dtype, shape, from_content, offset, length = by_name[name]
        dt = FLOAT_DTYPES.get(dtype)
        if dt is None:
            return None
        values = memoryview(self.data)[offset : offset + length]
        if from_content:
            return _tensor_values(dt, shape, values, b"", limit_bytes)
        return _tensor_values(dt, shape, b"", values, limit_bytes)

    def view(self) -> Any:
        """The protobuf view (parsed on first use when the walker read the layout)."""
        if self._view is None:
            self._view = PredictResponseView.FromString(self.data)
        return self._view

    def _typed_fallback(self, name: str) -> Callable[[], Any]:
        def typed() -> Any:
            # Parsed once per response, however many outputs were sent unpacked.
            if self._typed is None:
                self._typed = TypedPredictResponse.FromString(self.data)
            return self._typed.outputs[name]

        return typed


#: What the walker reads: the spec's bytes, each output's layout in wire
#: order, and the same layouts by name.
Walked = tuple[bytes | None, tuple[OutputLayout, ...], dict[str, OutputLayout]]


def walk_predict_response(data: bytes) -> Walked | None:
    """The response's layout as the native walker reads it, or ``None`` when
    the walker is not built or leaves these bytes to protobuf."""
    return _walk.walk_predict_response(data) if _walk is not None else None


def read_predict_response(data: bytes, walked: Walked | None = None) -> Response:
    """Read PredictResponse bytes for guarding. Raises :class:`DecodeError`.

    The native walker (``guard.dataplane._walk``) reads the common layout in place; what
    it does not take (an unknown field, a value sent unpacked, a non-ASCII
    name, ...) is parsed with protobuf, which also judges what is malformed.
    ``walked`` is the walker's result when the caller has it already.
    """
    if walked is None:
        walked = walk_predict_response(data)
    if walked is None:
        view = parse_predict_response(data)
        return Response(data, response_spec(view), view.outputs.keys(), view=view)
    spec_bytes, _, by_name = walked
    spec = None if spec_bytes is None else _spec_from_bytes(spec_bytes)
    return Response(data, spec, by_name.keys(), walked=walked)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _find_field(data: bytes, number: int) -> bytes | None:
    """The payload of the first length-delimited field ``number`` at the top level."""
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = _read_varint(data, pos)
        wire = key & 7
        if wire == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > end:
                raise ValueError("truncated")
            if key >> 3 == number:
                return data[pos : pos + length]
            pos += length
        elif wire == 0:
            _, pos = _read_varint(data, pos)
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
        return _spec_from_bytes(payload)
    except (ValueError, pb_message.DecodeError):
        return None


def _spec_from_bytes(payload: bytes) -> ModelSpecInfo:
    # Clients and upstreams repeat the same few specs: parse each distinct one
    # once. Both entries and their size are bounded.
    found = _SPECS.get(payload)
    if found is None:
        found = _spec_info(_ModelSpecView.FromString(payload))
        if len(payload) <= _SPEC_CACHE_BYTES:
            if len(_SPECS) >= _SPECS_MAX:
                _SPECS.clear()
            _SPECS[payload] = found
    return found


_SPECS: dict[bytes, ModelSpecInfo] = {}
_SPECS_MAX = 1024
_SPEC_CACHE_BYTES = 512
