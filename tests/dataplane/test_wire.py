"""The view-message codec, tested differentially against TensorFlow's own protos.

Every tensor here is built with the official classes (or, for encodings the
official serializer never writes, by hand and checked to parse identically with
the official classes), passed through :mod:`guard.dataplane.codec`, and read back with the
official classes and ``tf.make_ndarray``.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any, Literal

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    inference_pb2,
    model_pb2,
    predict_pb2,
)

from guard.dataplane.codec import varint
from guard.dataplane.codec.request import SPEC_FIELDS_MAX, peek_model_spec
from guard.dataplane.codec.response import (
    ModelSpecInfo,
    parse_predict_response,
    read_predict_response,
)
from guard.dataplane.codec.tensor import Encoding, decode_tensor, encode_output, set_tensor
from guard.dataplane.codec.views import PredictResponseView, TensorView
from guard.dataplane.errors import DecodeError, GuardError
from tests.fuzz.fuzz_wire import one_input, seeds

LIMIT = 1 << 20  # bytes per tensor the decoder may allocate in these tests

DT_OF = {np.dtype("float32"): "DT_FLOAT", np.dtype("float64"): "DT_DOUBLE"}
DT_OF[np.dtype("float16")] = "DT_HALF"
UINT_OF = {2: np.uint16, 4: np.uint32, 8: np.uint64}
FIELD_OF = {"DT_FLOAT": 5, "DT_DOUBLE": 6, "DT_HALF": 13}


# ----------------------------------------------------------------- builders


def shape_proto(shape: tuple[int, ...]) -> tensor_shape_pb2.TensorShapeProto:
    """An official TensorShapeProto."""
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
    )


def official(
    array: np.ndarray[Any, Any],
    encoding: Encoding,
    values: np.ndarray[Any, Any] | None = None,
) -> tensor_pb2.TensorProto:
    """A float TensorProto built with TF's classes.

    ``values`` overrides what goes into the typed field (for the fill convention).
    """
    t = tensor_pb2.TensorProto(
        dtype=types_pb2.DataType.Value(DT_OF[array.dtype]), tensor_shape=shape_proto(array.shape)
    )
    if encoding is Encoding.CONTENT:
        t.tensor_content = array.tobytes()
        return t
    flat = (array if values is None else values).ravel()
    if array.dtype == np.float16:
        t.half_val.extend(flat.view(np.uint16).tolist())
    elif array.dtype == np.float32:
        t.float_val.extend(flat.tolist())
    else:
        t.double_val.extend(flat.tolist())
    return t


def key(number: int, wire_type: int) -> bytes:
    """A protobuf field key (as a varint)."""
    return varint.encode_packed(np.array([(number << 3) | wire_type]))


def length_delimited(number: int, payload: bytes) -> bytes:
    """One length-delimited field."""
    return key(number, 2) + varint.encode_packed(np.array([len(payload)])) + payload


def unpacked_tensor_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """A float TensorProto whose values are sent unpacked (one key per value).

    TF's serializer always packs; this is the legal alternative encoding.
    """
    dt = DT_OF[array.dtype]
    head = tensor_pb2.TensorProto(
        dtype=types_pb2.DataType.Value(dt), tensor_shape=shape_proto(array.shape)
    ).SerializeToString()
    number = FIELD_OF[dt]
    flat = array.ravel()
    if array.dtype == np.float16:
        body = b"".join(
            key(number, 0) + varint.encode_packed(np.array([v])) for v in flat.view(np.uint16)
        )
    elif array.dtype == np.float32:
        body = b"".join(key(number, 5) + struct.pack("<f", v) for v in flat)
    else:
        body = b"".join(key(number, 1) + struct.pack("<d", v) for v in flat)
    return head + body


def view_of(data: bytes) -> Any:
    """The guard's TensorProto view of serialized tensor bytes."""
    return TensorView.FromString(data)


def truth(data: bytes) -> np.ndarray[Any, Any]:
    """What TensorFlow reads from serialized tensor bytes."""
    return tf.make_ndarray(tensor_pb2.TensorProto.FromString(data))


def same_bits(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> None:
    """Equal shape, dtype and bit patterns (so NaN payloads and -0.0 count too)."""
    assert a.shape == b.shape
    assert a.dtype == b.dtype
    u = UINT_OF[a.dtype.itemsize]
    np.testing.assert_array_equal(a.view(u), b.view(u))


def decode_bytes(data: bytes) -> tuple[np.ndarray[Any, Any], Encoding]:
    decoded = decode_tensor(view_of(data), LIMIT)
    assert decoded is not None
    return decoded


def roundtrip(
    array: np.ndarray[Any, Any], encoding: Encoding
) -> tuple[tensor_pb2.TensorProto, np.ndarray[Any, Any]]:
    """set_tensor on a fresh view, read back by TF."""
    view = TensorView()
    set_tensor(view, array, encoding)
    back = tensor_pb2.TensorProto.FromString(view.SerializeToString())
    return back, tf.make_ndarray(back)


FLOATS = [np.float16, np.float32, np.float64]
ENCODINGS = [Encoding.TYPED, Encoding.CONTENT]
SHAPES = [(), (3,), (3, 1), (2, 4), (2, 3, 4)]


def sample(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3).astype(dtype)


# ----------------------------------------------------------------- decoding


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_matches_make_ndarray(
    dtype: Any, encoding: Encoding, shape: tuple[int, ...]
) -> None:
    array = sample(shape, dtype)
    data = official(array, encoding).SerializeToString()
    decoded, got_encoding = decode_bytes(data)
    assert got_encoding is encoding
    same_bits(decoded, truth(data))
    same_bits(decoded, array)


def test_typed_fields_are_packed_runs_read_zero_copy() -> None:
    array = np.linspace(0, 1, 201, dtype=np.float32).reshape(1, 201)
    data = official(array, Encoding.TYPED).SerializeToString()
    view = view_of(data)
    assert len(view.float_val) == 1  # one packed run, handed over as bytes
    decoded, _ = decode_bytes(data)
    same_bits(decoded, array)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    ("shape", "given"),
    [((2, 3), 1), ((2, 3), 4), ((2, 3), 0), ((5,), 2), ((), 0), ((4, 1), 1)],
)
def test_fill_convention(dtype: Any, shape: tuple[int, ...], given: int) -> None:
    """Fewer typed values than elements: the last repeats; none: zeros (as TF reads it)."""
    full = sample(shape, dtype, seed=given)
    values = full.ravel()[:given]
    data = official(full, Encoding.TYPED, values=values).SerializeToString()
    expected = truth(data)
    decoded, encoding = decode_bytes(data)
    assert encoding is Encoding.TYPED
    same_bits(decoded, expected)
    if given:
        assert np.all(decoded.ravel()[given - 1 :] == values[-1])
    else:
        assert not decoded.any()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(3,), (2, 3), ()])
def test_unpacked_values_decode_like_tf(dtype: Any, shape: tuple[int, ...]) -> None:
    array = sample(shape, dtype, seed=3)
    data = unpacked_tensor_bytes(array)
    same_bits(truth(data), array)  # the hand-built bytes are what we think they are
    decoded, encoding = decode_bytes(data)
    assert encoding is Encoding.TYPED
    same_bits(decoded, array)


@pytest.mark.parametrize("dtype", FLOATS)
def test_set_tensor_after_unpacked_writes_each_value_once(dtype: Any) -> None:
    array = sample((2, 3), dtype, seed=4)
    view = view_of(unpacked_tensor_bytes(array))
    decoded, encoding = decode_tensor(view, LIMIT) or (None, None)
    assert decoded is not None and encoding is not None
    repaired = np.clip(decoded, -1, 1).astype(dtype)
    set_tensor(view, repaired, encoding)
    back = tensor_pb2.TensorProto.FromString(view.SerializeToString())
    field = {np.float16: "half_val", np.float32: "float_val", np.float64: "double_val"}[dtype]
    assert len(getattr(back, field)) == repaired.size  # no stale unpacked copies
    same_bits(tf.make_ndarray(back), repaired)


def test_packed_and_unpacked_mixed_in_one_tensor() -> None:
    first = np.array([0.25, 0.5], dtype=np.float32)
    data = official(np.zeros(4, np.float32), Encoding.TYPED, values=first).SerializeToString()
    data += key(5, 5) + struct.pack("<f", 0.75) + key(5, 5) + struct.pack("<f", 1.0)
    expected = truth(data)
    np.testing.assert_array_equal(expected, [0.25, 0.5, 0.75, 1.0])
    decoded, _ = decode_bytes(data)
    same_bits(decoded, expected)


@pytest.mark.parametrize("dtype", FLOATS)
def test_multiple_packed_chunks_concatenate(dtype: Any) -> None:
    array = sample((2, 4), dtype, seed=5)
    head = official(array, Encoding.TYPED, values=array.ravel()[:3]).SerializeToString()
    rest = tensor_pb2.TensorProto()
    flat = array.ravel()[3:]
    if dtype == np.float16:
        rest.half_val.extend(flat.view(np.uint16).tolist())
    elif dtype == np.float32:
        rest.float_val.extend(flat.tolist())
    else:
        rest.double_val.extend(flat.tolist())
    data = head + rest.SerializeToString()  # two packed runs of one field
    same_bits(truth(data), array)
    view = view_of(data)
    decoded, _ = decode_tensor(view, LIMIT) or (None, None)
    assert decoded is not None
    same_bits(decoded, array)
    set_tensor(view, decoded * 2, Encoding.TYPED)
    same_bits(truth(view.SerializeToString()), decoded * 2)


@pytest.mark.parametrize(
    "dtype",
    [
        types_pb2.DT_INT32,
        types_pb2.DT_INT64,
        types_pb2.DT_STRING,
        types_pb2.DT_BOOL,
        types_pb2.DT_UINT8,
    ],
)
def test_non_float_dtypes_are_not_decoded(dtype: int) -> None:
    t = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape_proto((2,)))
    if dtype == types_pb2.DT_STRING:
        t.string_val.extend([b"a", b"b"])
    else:
        t.tensor_content = b"\x01" * 16
    assert decode_tensor(view_of(t.SerializeToString()), LIMIT) is None


def test_a_bfloat16_tensor_under_a_rule_is_refused_not_passed_as_clean() -> None:
    """Red team: a DT_BFLOAT16 output holding 2.0 and -1.0 under a reject rule
    was answered clean, no value read; TF reads its values as floats."""
    t = tensor_pb2.TensorProto(dtype=types_pb2.DT_BFLOAT16, tensor_shape=shape_proto((2,)))
    t.tensor_content = b"\x00\x40\x80\xbf"  # 2.0 and -1.0: bfloat16's bits, little-endian
    with pytest.raises(DecodeError, match="DT_BFLOAT16, which the guard does not read"):
        decode_tensor(view_of(t.SerializeToString()), LIMIT)


@pytest.mark.parametrize(
    ("dtype", "field"),
    [(types_pb2.DT_HALF, "float_val"), (types_pb2.DT_FLOAT, "double_val"),
     (types_pb2.DT_DOUBLE, "half_val")],
)  # fmt: skip
def test_values_in_another_dtypes_field_are_refused(dtype: int, field: str) -> None:
    """Red team: a DT_HALF tensor's values in float_val were read as none
    (zeros) and passed as clean; a client reading float_val read 2.0."""
    t = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape_proto((2,)))
    getattr(t, field).extend([2, 1])
    with pytest.raises(DecodeError, match=f"values in {field}, which its dtype does not use"):
        decode_tensor(view_of(t.SerializeToString()), LIMIT)


@pytest.mark.parametrize("dtype", [101, 102, 114, 119])
def test_the_float_reference_types_are_refused(dtype: int) -> None:
    """Red team: DT_FLOAT_REF (101) and its kin are read by tf.make_ndarray as
    their base type, and were passed as clean, no value read."""
    t = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape_proto((1,)))
    t.tensor_content = b"\x00\x00\xc0\x3f\x00\x00\x00\x00"[: 2 if dtype in (114, 119) else 4]
    with pytest.raises(DecodeError, match=f"dtype is {dtype}, a reference type"):
        decode_tensor(view_of(t.SerializeToString()), LIMIT)


@pytest.mark.parametrize("field", ["float_val", "double_val", "half_val"])
def test_float_values_in_a_tensor_of_another_dtype_are_refused(field: str) -> None:
    """Red team: a DT_INT64 tensor with 1.5 in float_val passed as clean."""
    t = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, tensor_shape=shape_proto((1,)))
    getattr(t, field).append(1 if field == "half_val" else 1.5)
    with pytest.raises(DecodeError, match=f"dtype is 9, not a floating-point type.*{field}"):
        decode_tensor(view_of(t.SerializeToString()), LIMIT)


def test_a_bfloat16_tensor_with_its_own_half_val_is_refused_as_bfloat16() -> None:
    """half_val is DT_BFLOAT16's own field: refused for the dtype, not the field."""
    t = tensor_pb2.TensorProto(dtype=types_pb2.DT_BFLOAT16, tensor_shape=shape_proto((1,)))
    t.half_val.append(0x4000)
    with pytest.raises(DecodeError, match="DT_BFLOAT16, which the guard does not read"):
        decode_tensor(view_of(t.SerializeToString()), LIMIT)


# ------------------------------------------------------------------ encoding


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("shape", SHAPES + [(0,), (0, 3)])
def test_set_tensor_float_roundtrip(dtype: Any, encoding: Encoding, shape: tuple[int, ...]) -> None:
    array = sample(shape, dtype, seed=6)
    back, read = roundtrip(array, encoding)
    assert back.dtype == types_pb2.DataType.Value(DT_OF[np.dtype(dtype)])
    same_bits(read, array)
    field = {np.float16: "half_val", np.float32: "float_val", np.float64: "double_val"}[dtype]
    if encoding is Encoding.CONTENT:
        assert len(getattr(back, field)) == 0
        assert len(back.tensor_content) == array.nbytes
    else:
        assert back.tensor_content == b""
        assert len(getattr(back, field)) == array.size


def test_set_tensor_switching_encoding_clears_the_other() -> None:
    array = sample((2, 3), np.float32)
    view = view_of(official(array, Encoding.CONTENT).SerializeToString())
    set_tensor(view, array + 1, Encoding.TYPED)
    back = tensor_pb2.TensorProto.FromString(view.SerializeToString())
    assert back.tensor_content == b"" and len(back.float_val) == 6
    set_tensor(view, array + 2, Encoding.CONTENT)
    back = tensor_pb2.TensorProto.FromString(view.SerializeToString())
    assert len(back.float_val) == 0
    same_bits(tf.make_ndarray(back), array + 2)


def test_set_tensor_changes_shape() -> None:
    view = view_of(official(sample((2, 3), np.float32), Encoding.TYPED).SerializeToString())
    smaller = np.array([1.5, 2.5], dtype=np.float32)
    set_tensor(view, smaller, Encoding.TYPED)
    back = tensor_pb2.TensorProto.FromString(view.SerializeToString())
    assert [d.size for d in back.tensor_shape.dim] == [2]
    same_bits(tf.make_ndarray(back), smaller)


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
def test_set_tensor_int64_typed_uses_int64_val(shape: tuple[int, ...]) -> None:
    edge = [0, 1, -1, 2**63 - 1, -(2**63), 127, 128, 300, -300]
    array = np.resize(np.array(edge, dtype=np.int64), shape)
    back, read = roundtrip(array, Encoding.TYPED)
    assert back.dtype == types_pb2.DT_INT64
    assert back.tensor_content == b""
    assert list(back.int64_val) == array.ravel().tolist()
    np.testing.assert_array_equal(read, array)
    assert read.dtype == np.int64 and read.shape == shape


def test_set_tensor_int64_content_uses_tensor_content() -> None:
    array = np.array([[0, 1, 2], [-1, 2**63 - 1, -(2**63)]], dtype=np.int64)
    back, read = roundtrip(array, Encoding.CONTENT)
    assert back.dtype == types_pb2.DT_INT64
    assert len(back.int64_val) == 0
    assert back.tensor_content == array.tobytes()
    np.testing.assert_array_equal(read, array)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_set_tensor_strings_always_use_string_val(encoding: Encoding) -> None:
    labels = np.empty((2, 2), dtype=object)
    labels[:] = [[b"NO", b"YES"], ["caf\u00e9".encode(), b""]]
    back, read = roundtrip(labels, encoding)
    assert back.dtype == types_pb2.DT_STRING
    assert back.tensor_content == b""
    assert list(back.string_val) == [b"NO", b"YES", "caf\u00e9".encode(), b""]
    assert read.shape == (2, 2)
    assert read.tolist() == labels.tolist()


ENTRY_ARRAYS = [
    np.arange(6, dtype=np.int64).reshape(2, 3),
    np.array([[-1, 300], [2**40, 5]], dtype=np.int64),  # 10-, 2- and 6-byte varints
    np.arange(300, dtype=np.int64),  # past the small-run loop
    sample((3, 4), np.float32),
    sample((2,), np.float64),
    sample((2, 2), np.float16),
    np.array(3.0, dtype=np.float32),
    np.zeros((0, 5), dtype=np.float32),
    np.zeros((2, 0), dtype=np.int64),
    np.array([b"a", b"x" * 200, b"", "caf\u00e9".encode()], dtype=object).reshape(2, 2),
]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("array", ENTRY_ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_encode_output_is_the_map_entry_the_official_classes_read(
    array: np.ndarray[Any, Any], encoding: Encoding
) -> None:
    """encode_output's bytes, appended to a response, add one output: the same
    tensor set_tensor writes, read back by the official classes and TF."""
    base = predict_pb2.PredictResponse()
    base.outputs["kept"].dtype = types_pb2.DT_FLOAT
    base.model_spec.name = "m"
    entry = encode_output("derived_out", array, encoding)
    merged = predict_pb2.PredictResponse.FromString(base.SerializeToString() + entry)
    assert sorted(merged.outputs) == ["derived_out", "kept"]
    assert merged.model_spec.name == "m"
    reference = PredictResponseView()
    set_tensor(reference.outputs["derived_out"], array, encoding)
    expected = predict_pb2.PredictResponse.FromString(reference.SerializeToString())
    assert merged.outputs["derived_out"] == expected.outputs["derived_out"]
    read = tf.make_ndarray(merged.outputs["derived_out"])
    assert read.shape == array.shape
    if array.dtype == object:
        assert read.tolist() == array.tolist()
    else:
        assert read.dtype == array.dtype
        same_bits(read, array)
        uses_content = bool(merged.outputs["derived_out"].tensor_content)
        assert uses_content == (encoding is Encoding.CONTENT and array.size > 0)


def test_set_tensor_float16_typed_uses_half_val() -> None:
    array = np.array([0.0, -0.0, 1.0, 65504.0, np.inf, -np.inf, 6e-8], dtype=np.float16)
    back, read = roundtrip(array, Encoding.TYPED)
    assert back.dtype == types_pb2.DT_HALF
    assert list(back.half_val) == array.view(np.uint16).tolist()
    same_bits(read, array)


# ----------------------------------------------------------- unknown fields


def test_untouched_tensor_keeps_unknown_fields_byte_identical() -> None:
    other = official(sample((2, 2), np.float32), Encoding.TYPED)
    other.int_val.extend([7, 8])  # a TensorProto field the view does not declare
    other_bytes = other.SerializeToString() + key(99, 0) + b"\x2a"  # a field nobody declares
    probs = official(sample((2, 2), np.float32), Encoding.TYPED)
    body = (
        length_delimited(1, length_delimited(1, b"other") + length_delimited(2, other_bytes))
        + length_delimited(
            1, length_delimited(1, b"probs") + length_delimited(2, probs.SerializeToString())
        )
        + length_delimited(2, model_pb2.ModelSpec(name="m").SerializeToString())
    )
    official_resp = predict_pb2.PredictResponse.FromString(body)
    assert list(official_resp.outputs["other"].int_val) == [7, 8]

    view = parse_predict_response(body)
    tensor = view.outputs["probs"]
    values, encoding = decode_tensor(tensor, LIMIT) or (None, None)
    assert values is not None and encoding is not None
    set_tensor(tensor, np.clip(values, 0, 1), encoding)
    out = view.SerializeToString()
    assert other_bytes in out
    back = predict_pb2.PredictResponse.FromString(out)
    assert list(back.outputs["other"].int_val) == [7, 8]
    np.testing.assert_array_equal(tf.make_ndarray(back.outputs["probs"]), np.clip(values, 0, 1))
    assert back.model_spec.name == "m"


def test_response_with_nothing_changed_reserializes_to_same_message() -> None:
    resp = predict_pb2.PredictResponse()
    resp.outputs["a"].CopyFrom(official(sample((3,), np.float32), Encoding.TYPED))
    resp.outputs["b"].CopyFrom(official(sample((2, 2), np.float64), Encoding.CONTENT))
    resp.model_spec.name = "m"
    resp.model_spec.version.value = 7
    resp.model_spec.signature_name = "serving_default"
    body = resp.SerializeToString(deterministic=True)
    view = parse_predict_response(body)
    assert predict_pb2.PredictResponse.FromString(view.SerializeToString()) == resp
    spec = read_predict_response(body, None).spec
    assert spec == ModelSpecInfo("m", "serving_default", 7)


# ------------------------------------------------------------ adversarial


def raw_tensor(dtype: int, shape: list[int], payload: bytes = b"") -> bytes:
    """A TensorProto with an arbitrary shape (dims written as raw int64 varints)."""
    dims = b"".join(
        length_delimited(2, key(1, 0) + varint.encode_packed(np.array([d], dtype=np.int64)))
        for d in shape
    )
    return key(1, 0) + bytes([dtype]) + length_delimited(2, dims) + payload


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([2**62, 4], "needs"),
        ([2**31, 2**31, 2**31], "needs"),
        ([2**63 - 1, 2**63 - 1], "needs"),
        ([-1], "negative"),
        ([3, -2], "negative"),
        ([2**40], "message limit"),
    ],
)
def test_adversarial_shapes_are_decode_errors(shape: list[int], message: str) -> None:
    one_value = length_delimited(5, struct.pack("<f", 0.5))
    view = view_of(raw_tensor(types_pb2.DT_FLOAT, shape, one_value))
    assert [d.size for d in view.tensor_shape.dim] == shape
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match=message) as info:
            decode_tensor(view, LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # refused before allocating anything big
    assert info.value.details.startswith("guard: ")
    assert str(shape) in str(info.value)


def test_shape_within_limit_but_data_disagrees() -> None:
    t = official(np.zeros((2, 2), np.float32), Encoding.CONTENT)
    t.tensor_content = b"\x00" * 12
    with pytest.raises(DecodeError, match=r"tensor_content has 12 bytes but shape \[2, 2\]"):
        decode_bytes(t.SerializeToString())

    too_many = official(
        np.zeros((2, 2), np.float32), Encoding.TYPED, values=np.zeros(5, np.float32)
    )
    with pytest.raises(ValueError):  # TF refuses it too
        truth(too_many.SerializeToString())
    with pytest.raises(DecodeError, match=r"float_val has 5 values but shape \[2, 2\] holds 4"):
        decode_bytes(too_many.SerializeToString())

    ragged = raw_tensor(types_pb2.DT_FLOAT, [2], length_delimited(5, b"\x00" * 6))
    with pytest.raises(DecodeError, match="not a whole number"):
        decode_bytes(ragged)

    doubles = raw_tensor(types_pb2.DT_DOUBLE, [1], length_delimited(6, b"\x00" * 12))
    with pytest.raises(DecodeError, match="double_val has 12 bytes"):
        decode_bytes(doubles)


def test_truncated_half_val_varint_is_a_decode_error() -> None:
    view = view_of(raw_tensor(types_pb2.DT_HALF, [2], length_delimited(13, b"\x01\x80")))
    with pytest.raises(DecodeError, match="truncated varint"):
        decode_tensor(view, LIMIT)


def a_response() -> bytes:
    resp = predict_pb2.PredictResponse()
    resp.outputs["probs"].CopyFrom(official(sample((4, 3), np.float32), Encoding.TYPED))
    resp.outputs["score"].CopyFrom(official(sample((4,), np.float64), Encoding.CONTENT))
    resp.model_spec.name = "wide_deep"
    resp.model_spec.version.value = 3
    return resp.SerializeToString()


def test_truncated_response_is_a_decode_error() -> None:
    body = a_response()
    with pytest.raises(DecodeError, match="cannot decode PredictResponse from upstream"):
        parse_predict_response(body[:-1])
    with pytest.raises(DecodeError, match="hold no outputs"):
        parse_predict_response(b"")
    for cut in range(len(body)):
        try:
            view = parse_predict_response(body[:cut])
        except DecodeError:
            continue
        for name in view.outputs:
            try:
                decode_tensor(view.outputs[name], LIMIT)
            except DecodeError:
                pass


def test_rank_above_numpy_limit_is_a_decode_error() -> None:
    view = view_of(raw_tensor(types_pb2.DT_FLOAT, [1] * 65, length_delimited(5, b"\x00" * 4)))
    with pytest.raises(DecodeError):
        decode_tensor(view, LIMIT)


def test_unpacked_float_next_to_malformed_int64_val_is_a_decode_error() -> None:
    data = raw_tensor(types_pb2.DT_FLOAT, [1], key(5, 5) + struct.pack("<f", 0.5))
    data += length_delimited(10, b"\x01\x80")  # int64_val with a truncated varint
    with pytest.raises(GuardError):
        decode_tensor(view_of(data), LIMIT)


# ----------------------------------------------------------- model specs


def test_peek_model_spec_on_official_requests() -> None:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "wide_deep"
    req.model_spec.version.value = 12
    req.model_spec.signature_name = "serving_default"
    req.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((2, 3), np.float32)))
    req.output_filter.append("probs")
    assert peek_model_spec(req.SerializeToString()) == ModelSpecInfo(
        "wide_deep", "serving_default", 12
    )

    meta = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    meta.model_spec.name = "resnet"
    meta.model_spec.version_label = "stable"
    assert peek_model_spec(meta.SerializeToString()) == ModelSpecInfo("resnet", "", None)

    multi = inference_pb2.MultiInferenceRequest()
    task = multi.tasks.add()
    task.model_spec.name = "census"
    task.model_spec.signature_name = "classify_x"
    task.method_name = "tensorflow/serving/classify"
    multi.input.example_list.examples.add()
    assert peek_model_spec(multi.SerializeToString(), path=(1, 1)) == ModelSpecInfo(
        "census", "classify_x", None
    )

    no_spec = predict_pb2.PredictRequest()
    no_spec.inputs["x"].CopyFrom(tf.make_tensor_proto(1.0))
    assert peek_model_spec(no_spec.SerializeToString()) is None
    assert peek_model_spec(b"") is None


SPEC_PARTS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["a", "wide_deep", ""]),
        "signature_name": st.sampled_from(["s", "serving_default"]),
        "version": st.builds(lambda v: {"value": v}, st.integers(0, 9)),
    },
)


@settings(max_examples=150, deadline=None)
@given(st.lists(SPEC_PARTS, min_size=1, max_size=4), st.integers(0, 3))
def test_copies_of_model_spec_merge_as_protobuf_merges_them(
    specs: list[dict[str, Any]], inputs_at: int
) -> None:
    """Red team: a second model_spec (after the inputs, or not) chose the model
    TF Serving served, while the peek read the first."""
    parts = [predict_pb2.PredictRequest(model_spec=s).SerializeToString() for s in specs]
    inputs = predict_pb2.PredictRequest()
    inputs.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones(1, np.float32)))
    parts.insert(min(inputs_at, len(parts)), inputs.SerializeToString())
    data = b"".join(parts)
    merged = predict_pb2.PredictRequest.FromString(data).model_spec
    version = merged.version.value if merged.HasField("version") else None
    expected = ModelSpecInfo(merged.name, merged.signature_name, version)
    assert peek_model_spec(data) == expected


def test_a_model_spec_past_the_peeks_bound_leaves_the_request_without_one() -> None:
    """Fields the peek does not read could hold another model_spec: no spec,
    and the answer's own decides, rather than the first copy's."""
    first = predict_pb2.PredictRequest(model_spec={"name": "a"}).SerializeToString()
    filter_p = predict_pb2.PredictRequest(output_filter=["p"]).SerializeToString()
    seen = first + filter_p * (SPEC_FIELDS_MAX - 1)
    assert peek_model_spec(seen) == ModelSpecInfo("a", "", None)  # every field read
    assert peek_model_spec(seen + filter_p) is None


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff",  # truncated varint key
        b"\x0a\x05ab",  # length beyond the end
        b"\x0b\x0c",  # group wire types
        b"\x0f",  # wire type 7
        b"\x0a\x02\x0a\xff",  # spec whose name is truncated
        b"\x0a\x03\x0a\x01\xff",  # name that is not UTF-8
        b"\x80" * 20,
    ],
)
def test_peek_model_spec_on_garbage_returns_none(garbage: bytes) -> None:
    assert peek_model_spec(garbage) is None
    assert peek_model_spec(garbage, path=(1, 1)) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([(1,), (1, 1)]))
def test_peek_model_spec_never_raises(data: bytes, path: tuple[int, ...]) -> None:
    got = peek_model_spec(data, path)
    assert got is None or isinstance(got, ModelSpecInfo)


# ----------------------------------------------------------------- varints

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.one_of(INT64, st.sampled_from([0, -1, 2**63 - 1, -(2**63), 127, 128])), max_size=40)
)
def test_varints_roundtrip_and_match_protobuf(values: list[int]) -> None:
    array = np.array(values, dtype=np.int64)
    encoded = varint.encode_packed(array)
    official_bytes = tensor_pb2.TensorProto(int64_val=values).SerializeToString()
    expected = length_delimited(10, encoded) if values else b""
    assert official_bytes == expected
    np.testing.assert_array_equal(varint.decode_packed(encoded).view(np.int64), array)


def test_varint_errors() -> None:
    with pytest.raises(DecodeError, match="truncated"):
        varint.decode_packed(b"\x01\x80")
    with pytest.raises(DecodeError, match="longer than 10"):
        varint.decode_packed(b"\xff" * 11 + b"\x01")
    assert varint.decode_packed(b"").size == 0
    assert varint.encode_packed(np.zeros(0, np.int64)) == b""


# ------------------------------------------------------- differential (random)


@st.composite
def official_tensors(draw: st.DrawFn) -> tuple[bytes, np.ndarray[Any, Any], str]:
    dtype = draw(st.sampled_from(FLOATS))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    numel = int(np.prod(shape, dtype=np.int64))
    width: Literal[16, 32, 64] = {np.float16: 16, np.float32: 32, np.float64: 64}[dtype]  # type: ignore[assignment]
    flat = draw(
        st.lists(
            st.floats(width=width, allow_nan=True, allow_infinity=True),
            min_size=numel,
            max_size=numel,
        )
    )
    array = np.array(flat, dtype=dtype).reshape(shape)
    style = draw(st.sampled_from(["content", "typed", "fill", "unpacked", "chunks"]))
    if style == "content":
        data = official(array, Encoding.CONTENT).SerializeToString()
    elif style == "typed":
        data = official(array, Encoding.TYPED).SerializeToString()
    elif style == "fill":
        given = draw(st.integers(0, numel))
        data = official(array, Encoding.TYPED, values=array.ravel()[:given])
        data = data.SerializeToString()
    elif style == "unpacked":
        data = unpacked_tensor_bytes(array)
    else:
        cut = draw(st.integers(0, numel))
        head = official(array, Encoding.TYPED, values=array.ravel()[:cut])
        tail = official(array, Encoding.TYPED, values=array.ravel()[cut:])
        tail.ClearField("tensor_shape")
        tail.ClearField("dtype")
        data = head.SerializeToString() + tail.SerializeToString()
    return data, array, style


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(official_tensors())
def test_differential_decode_and_reencode(case: tuple[bytes, np.ndarray[Any, Any], str]) -> None:
    data, array, style = case
    expected = truth(data)
    if style != "fill":
        same_bits(expected, array)
    view = view_of(data)
    decoded = decode_tensor(view, LIMIT)
    assert decoded is not None
    values, encoding = decoded
    same_bits(values, expected)
    if array.size:  # an empty tensor_content is indistinguishable from no values
        assert encoding is (Encoding.CONTENT if style == "content" else Encoding.TYPED)
    # Write it back (as a repair would) and read it with TF.
    set_tensor(view, values.copy(), encoding)
    same_bits(truth(view.SerializeToString()), expected)


# ------------------------------------------------------------ fuzz target


def mutated_responses() -> st.SearchStrategy[bytes]:
    """Real responses, cut and with bytes overwritten: inputs that reach deep paths."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        resp = predict_pb2.PredictResponse()
        for i in range(draw(st.integers(1, 3))):
            data, _, _ = draw(official_tensors())
            resp.outputs[f"out{i}"].ParseFromString(data)
        body = bytearray(resp.SerializeToString())
        for _ in range(draw(st.integers(0, 3))):
            if body:
                body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
        return bytes(body[: draw(st.integers(0, len(body)))])

    return build()


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.binary(max_size=300), mutated_responses()))
def test_fuzz_target_survives_generated_inputs(data: bytes) -> None:
    # The first byte picks the rule set and framing; try each rule set raw and wrapped.
    for selector in (0x00, 0x41, 0x02, 0x43, 0x80, 0xC1, 0x82, 0x83):
        one_input(bytes([selector]) + data)  # raises on anything but a GuardError


def test_fuzz_target_survives_its_seeds() -> None:
    for seed in seeds():
        one_input(seed)
