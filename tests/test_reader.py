"""PredictResponseReader: the raw, zero-copy path against the upb view and TF.

Responses are built with TensorFlow Serving's own classes (the canonical layout
the raw path reads in place) and by hand (the legal variants it hands to the
upb view). Either way the arrays must be what ``wire.decode_tensor`` on the
view returns, and what ``tf.make_ndarray`` reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from guard import wire
from guard.errors import DecodeError
from guard.reader import PredictResponseReader
from tests.test_wire import (
    ENCODINGS,
    FLOATS,
    SHAPES,
    length_delimited,
    official,
    same_bits,
    sample,
    unpacked_tensor_bytes,
)

LIMIT = 1 << 30
TYPED = wire.Encoding.TYPED


def entry(name: str, tensor: bytes) -> bytes:
    """One ``outputs`` map entry, by hand."""
    return length_delimited(1, length_delimited(1, name.encode()) + length_delimited(2, tensor))


def response_of(**outputs: tensor_pb2.TensorProto) -> bytes:
    resp = predict_pb2.PredictResponse()
    for name, t in outputs.items():
        resp.outputs[name].CopyFrom(t)
    resp.model_spec.name = "m"
    resp.model_spec.version.value = 7
    resp.model_spec.signature_name = "serving_default"
    return resp.SerializeToString()


def through_view(body: bytes, name: str) -> tuple[np.ndarray[Any, Any], wire.Encoding] | None:
    view = wire.parse_predict_response(body)
    typed = wire.TypedPredictResponse.FromString(body)
    return wire.decode_tensor(view.outputs[name], LIMIT, lambda: typed.outputs[name])


def assert_same(
    got: tuple[np.ndarray[Any, Any], wire.Encoding] | None,
    expected: tuple[np.ndarray[Any, Any], wire.Encoding] | None,
) -> None:
    if expected is None:
        assert got is None
        return
    assert got is not None
    assert got[1] is expected[1]
    assert got[0].shape == expected[0].shape
    same_bits(got[0], expected[0])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_canonical_responses_are_read_in_place(
    dtype: Any, encoding: wire.Encoding, shape: tuple[int, ...]
) -> None:
    array = sample(shape, dtype)
    body = response_of(out=official(array, encoding), other=official(array + 1, encoding))
    reader = PredictResponseReader(body)
    assert reader._raw is not None, "TF Serving's own layout must take the raw path"
    assert reader.names == ["other", "out"]
    spec = reader.spec()
    assert spec is not None and (spec.name, spec.version, spec.signature_name) == (
        "m", 7, "serving_default",
    )  # fmt: skip
    got = reader.decode("out", LIMIT)
    assert_same(got, through_view(body, "out"))
    assert got is not None
    same_bits(got[0], tf.make_ndarray(official(array, encoding)))
    assert got[0].flags.aligned
    if array.size and not (dtype == np.float16 and encoding is wire.Encoding.TYPED):
        # Zero-copy: a view of the response bytes themselves, unless the values
        # sit misaligned in them (then one aligned copy is made on purpose).
        raw = np.frombuffer(body, np.uint8)
        offset = body.find(got[0].tobytes())
        aligned = (raw.ctypes.data + offset) % got[0].dtype.itemsize == 0
        assert np.shares_memory(got[0], raw) == aligned


def test_fill_convention_and_non_float_outputs() -> None:
    array = np.full((2, 3), 0.25, dtype=np.float32)
    short = official(array, wire.Encoding.TYPED, values=np.array([0.5, 0.25], np.float32))
    empty = official(array, wire.Encoding.TYPED, values=np.zeros(0, np.float32))
    ids = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, int64_val=[3, 4])
    ids.tensor_shape.dim.add(size=2)
    labels = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"a"])
    body = response_of(short=short, empty=empty, ids=ids, labels=labels)
    reader = PredictResponseReader(body)
    assert reader._raw is not None
    for name in ("short", "empty", "ids", "labels"):
        assert_same(reader.decode(name, LIMIT), through_view(body, name))


def _variants() -> dict[str, bytes]:
    """Legal encodings TF Serving does not write: the reader hands them to upb."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    t = official(array, wire.Encoding.TYPED)
    half_a = official(array[:1], wire.Encoding.TYPED).float_val
    two_runs = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=t.tensor_shape)
    run_bytes = two_runs.SerializeToString()
    for chunk in (list(half_a), array[1].tolist()):
        run_bytes += length_delimited(5, np.asarray(chunk, np.float32).tobytes())
    shape_twice = (
        tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT).SerializeToString()
        + length_delimited(2, length_delimited(2, b"\x08\x02"))
        + length_delimited(2, length_delimited(2, b"\x08\x03"))
        + length_delimited(5, array.tobytes())
    )
    stray = t.SerializeToString() + length_delimited(8, b"x")  # string_val in a float tensor
    double_in_float = t.SerializeToString() + length_delimited(6, np.zeros(6).tobytes())
    base = response_of(out=t)
    doubled = response_of(out=official(array * 2, wire.Encoding.TYPED))
    tripled = unpacked_tensor_bytes(array * 3)
    return {
        "unpacked values": entry("out", unpacked_tensor_bytes(array)),
        "two packed runs": entry("out", run_bytes),
        "shape message twice (merged)": entry("out", shape_twice),
        "string_val in a float tensor": entry("out", stray),
        "double_val in a float tensor": entry("out", double_in_float),
        "unknown top-level field": base + length_delimited(9, b"zz"),
        "two messages concatenated (merge)": base + doubled,
        "duplicate key, last wins": entry("out", t.SerializeToString()) + entry("out", tripled),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_legal_variants_read_like_the_view(name: str) -> None:
    body = _variants()[name]
    reader = PredictResponseReader(body)
    assert_same(reader.decode("out", LIMIT), through_view(body, "out"))


def test_entry_without_key_or_value() -> None:
    keyless = length_delimited(
        1,
        length_delimited(
            2, official(np.ones(2, np.float32), wire.Encoding.TYPED).SerializeToString()
        ),
    )
    valueless = length_delimited(1, length_delimited(1, b"v"))
    body = keyless + valueless
    reader = PredictResponseReader(body)
    assert reader.names == ["", "v"]
    assert_same(reader.decode("", LIMIT), through_view(body, ""))
    assert reader.decode("v", LIMIT) is None  # an empty tensor has no float dtype


@pytest.mark.parametrize(
    "body",
    [b"", b"\xff\xff\xff", entry("out", b"\x08")[:-1], length_delimited(2, b"\x0a\x01m")],
    ids=["empty", "garbage", "truncated", "spec but no outputs"],
)
def test_malformed_or_empty_responses_raise_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError):
        PredictResponseReader(body)


def test_semantic_errors_match_the_view() -> None:
    bad_content = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=b"\x00" * 7)
    bad_content.tensor_shape.dim.add(size=2)
    too_many = official(np.ones(2, np.float32), wire.Encoding.TYPED)
    too_many.float_val.append(1.0)
    huge = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    huge.tensor_shape.dim.add(size=1 << 40)
    negative = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    negative.tensor_shape.dim.add(size=-3)
    for t in (bad_content, too_many, huge, negative):
        body = response_of(out=t)
        assert PredictResponseReader(body)._raw is not None
        with pytest.raises(DecodeError) as raw:
            PredictResponseReader(body).decode("out", LIMIT)
        with pytest.raises(DecodeError) as view:
            through_view(body, "out")
        assert raw.value.details == view.value.details


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=200),
    prefix=st.sampled_from([b"", response_of(out=official(np.ones((2, 2), np.float32), TYPED))]),
)
def test_arbitrary_bytes_never_disagree_with_the_view(data: bytes, prefix: bytes) -> None:
    body = prefix + data
    try:
        view = wire.parse_predict_response(body)
    except DecodeError:
        # The reader accepts exactly what protobuf accepts: no partial reads of
        # a response that is malformed somewhere the rules do not look.
        with pytest.raises(DecodeError):
            PredictResponseReader(body)
        return
    reader = PredictResponseReader(body)
    assert sorted(view.outputs) == reader.names
    for name in reader.names:
        try:
            expected = through_view(body, name)
        except DecodeError:
            with pytest.raises(DecodeError):
                reader.decode(name, LIMIT)
            continue
        assert_same(reader.decode(name, LIMIT), expected)


def test_fuzz_finding_field_number_zero_is_refused() -> None:
    # Found by make fuzz: a tensor with a field numbered 0 after its values.
    # Protobuf refuses the whole response; so must the guard.
    tensor = b"\x12\x02\x08\x03\x22\x06\x00\xb8\x00\x06\x00\xb8\x00\x39\x00\x3e"
    with pytest.raises(DecodeError):
        PredictResponseReader(entry("out1", tensor))
