"""numpy -> TensorProto, the way TF Serving writes its responses.

TF Serving's default (``Tensor::AsProtoField``) fills the typed ``*_val`` field
with every element; ``--tensor-content`` mirrors ``AsProtoTensorContent``.
``tf.make_tensor_proto`` does neither exactly (it picks tensor_content for most
arrays), hence this table.
"""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

# dtype -> (typed field, numpy dtype the field's values are written as)
_TYPED_FIELD: dict[int, tuple[str, type[np.generic] | None]] = {
    types_pb2.DT_FLOAT: ("float_val", np.float32),
    types_pb2.DT_DOUBLE: ("double_val", np.float64),
    types_pb2.DT_HALF: ("half_val", np.uint16),
    types_pb2.DT_BFLOAT16: ("half_val", np.uint16),
    types_pb2.DT_INT8: ("int_val", np.int32),
    types_pb2.DT_INT16: ("int_val", np.int32),
    types_pb2.DT_INT32: ("int_val", np.int32),
    types_pb2.DT_UINT8: ("int_val", np.int32),
    types_pb2.DT_UINT16: ("int_val", np.int32),
    types_pb2.DT_INT64: ("int64_val", np.int64),
    types_pb2.DT_UINT32: ("uint32_val", np.uint32),
    types_pb2.DT_UINT64: ("uint64_val", np.uint64),
    types_pb2.DT_BOOL: ("bool_val", np.bool_),
    types_pb2.DT_COMPLEX64: ("scomplex_val", np.float32),
    types_pb2.DT_COMPLEX128: ("dcomplex_val", np.float64),
    types_pb2.DT_STRING: ("string_val", None),
}

# Packed fixed-width fields written straight from the array's bytes:
# field number of float_val / double_val in tensorflow/core/framework/tensor.proto.
_PACKED_FIXED: dict[int, int] = {types_pb2.DT_FLOAT: 5, types_pb2.DT_DOUBLE: 6}


def dtype_name(dtype: int) -> str:
    """TensorFlow's DataTypeString spelling: ``float``, ``int64``, ``string``, ..."""
    try:
        name: str = types_pb2.DataType.Name(dtype)
        return name.removeprefix("DT_").lower()
    except ValueError:
        return f"unknown dtype enum {dtype}"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _shape_proto(shape: tuple[int, ...]) -> tensor_shape_pb2.TensorShapeProto:
    proto = tensor_shape_pb2.TensorShapeProto()
    for size in shape:
        proto.dim.add(size=size)
    return proto


def to_tensor_proto(
    array: np.ndarray, dtype: int, *, tensor_content: bool
) -> tensor_pb2.TensorProto:
    """Encode ``array`` (already of ``dtype``) as TF Serving would in a PredictResponse."""
    proto = tensor_pb2.TensorProto()
    if not tensor_content and dtype in _PACKED_FIXED and array.size:
        # Parsing a packed payload is a memcpy in upb; extending a repeated field
        # from numpy costs one Python object per element.
        payload = np.ascontiguousarray(array, dtype=_TYPED_FIELD[dtype][1]).tobytes()
        field_tag = (_PACKED_FIXED[dtype] << 3) | 2
        proto.MergeFromString(_varint(field_tag) + _varint(len(payload)) + payload)
    proto.dtype = dtype
    proto.tensor_shape.CopyFrom(_shape_proto(tuple(int(d) for d in array.shape)))
    if not array.size or (not tensor_content and dtype in _PACKED_FIXED):
        return proto
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(array.ravel().tolist())
        return proto
    if tensor_content:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
        return proto
    field, as_type = _TYPED_FIELD.get(dtype, (None, None))
    if field is None:
        raise ValueError(f"cannot encode output of dtype {dtype_name(dtype)}")
    flat = array.ravel()
    if dtype in (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
        values = flat.view(np.uint16).astype(np.int32)
    elif dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        values = flat.view(as_type)  # type: ignore[arg-type]
    else:
        values = flat.astype(as_type, copy=False)
    getattr(proto, field).extend(values.tolist())
    return proto
