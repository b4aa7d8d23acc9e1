"""The native walker (``guard.dataplane._walk``) against protobuf.

The walker reads a strict subset of the wire format and declines the rest. The
property that matters: whatever it takes, protobuf (the guard's view, its
typed view, and TensorFlow Serving's own classes) parses too, and reads the
same layout. And it must take what TensorFlow Serving writes, or it saves
nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from guard.control.config import parse_config
from guard.dataplane.book import RuleBook
from guard.dataplane.codec.response import read_predict_response
from guard.dataplane.codec.tensor import Encoding
from guard.dataplane.errors import GuardError
from guard.dataplane.kernels import REFERENCE
from guard.dataplane.pipeline import guard_predict_response
from guard.dataplane.results import Action
from guard.metrics.guard_metrics import GuardMetrics
from tests.native import native, same_outcome, walk_agrees_with_protobuf

DT = types_pb2.DataType
DTYPES = (DT.DT_FLOAT, DT.DT_DOUBLE, DT.DT_HALF, DT.DT_INT64, DT.DT_STRING, DT.DT_INT32, DT.DT_BOOL)
ascii_names = st.text(alphabet=st.characters(max_codepoint=127), max_size=8)
any_names = st.one_of(ascii_names, st.text(max_size=4))


@st.composite
def tensors(draw: st.DrawFn) -> tuple[tensor_pb2.TensorProto, bool]:
    """An official TensorProto, and whether the walker should take it."""
    dtype = draw(st.sampled_from(DTYPES))
    t = tensor_pb2.TensorProto(dtype=dtype)
    ordinary = True
    dims = draw(st.lists(st.integers(-1, 4), max_size=3))
    for size in dims:
        dim = t.tensor_shape.dim.add(size=size)
        if draw(st.integers(0, 5)) == 0:
            dim.name = draw(any_names)
            ordinary &= dim.name.isascii()
    if draw(st.integers(0, 9)) == 0:
        t.tensor_shape.unknown_rank = True
        ordinary = False
    numel = math.prod(max(d, 0) for d in dims)
    n = draw(st.integers(0, numel))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.normal(size=numel)
    if dtype == DT.DT_STRING:
        t.string_val.extend(draw(st.lists(st.binary(max_size=3), max_size=n)))
    elif draw(st.booleans()) and dtype in (DT.DT_FLOAT, DT.DT_DOUBLE, DT.DT_INT64):
        np_type = {DT.DT_FLOAT: "<f4", DT.DT_DOUBLE: "<f8", DT.DT_INT64: "<i8"}[dtype]
        t.tensor_content = (values * 10).astype(np_type).tobytes()
    elif dtype == DT.DT_FLOAT:
        t.float_val.extend(values[:n].astype(np.float32).tolist())
    elif dtype == DT.DT_DOUBLE:
        t.double_val.extend(values[:n].tolist())
    elif dtype == DT.DT_HALF:
        t.half_val.extend(values[:n].astype(np.float16).view(np.uint16).tolist())
    elif dtype == DT.DT_INT64:
        t.int64_val.extend((values[:n] * 1e12).astype(np.int64).tolist())
    elif dtype == DT.DT_INT32:
        t.int_val.extend((values[:n] * 1e6).astype(np.int32).tolist())
    else:
        t.bool_val.extend((values[:n] > 0).tolist())
    return t, ordinary


@st.composite
def responses(draw: st.DrawFn) -> tuple[predict_pb2.PredictResponse, bool]:
    """An official PredictResponse, and whether the walker should take it."""
    response = predict_pb2.PredictResponse()
    names = draw(st.lists(any_names, max_size=3, unique=True))
    ordinary = bool(names)
    for name in names:
        tensor, plain = draw(tensors())
        response.outputs[name].CopyFrom(tensor)
        ordinary &= plain and name.isascii()
    spec = draw(st.integers(0, 4))
    if spec:
        response.model_spec.name = draw(any_names)
        ordinary &= response.model_spec.name.isascii()
    if spec >= 2:
        response.model_spec.version.value = draw(st.integers(-(2**63), 2**63 - 1))
    if spec >= 3:
        response.model_spec.signature_name = draw(ascii_names)
    if spec == 4 and draw(st.booleans()):
        response.model_spec.version_label = "stable"  # replaces the version (a oneof)
        ordinary = False
    return response, ordinary


def agrees_with_tensorflow(body: bytes) -> bool:
    """Whether the walker took ``body``; if it did, TF Serving's classes parse it
    (as well as the guard's views) and read the same dtypes and shapes."""
    if not walk_agrees_with_protobuf(body):
        return False
    official = predict_pb2.PredictResponse.FromString(body)
    walked = native().walk(body)
    assert walked is not None
    for name, dtype, shape, *_ in walked[1]:
        tensor = official.outputs[name]
        assert (dtype, shape) == (tensor.dtype, tuple(d.size for d in tensor.tensor_shape.dim))
    return True


@settings(max_examples=300, deadline=None)
@given(responses())
def test_the_walker_takes_what_tf_serving_writes_and_reads_it_as_protobuf_does(
    case: tuple[predict_pb2.PredictResponse, bool],
) -> None:
    response, ordinary = case
    assert agrees_with_tensorflow(response.SerializeToString()) == ordinary


def mutate(body: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Flip, drop, insert or duplicate bytes at the given places."""
    data = bytearray(body)
    for kind, where, value in edits:
        if not data:
            break
        i = where % len(data)
        if kind == 0:
            data[i] ^= 1 << (value % 8)
        elif kind == 1:
            del data[i]
        elif kind == 2:
            data.insert(i, value)
        elif kind == 3:
            data[i] = value
        else:
            data[i:i] = data[i : i + 1 + value % 8]
    return bytes(data)


edits = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 1 << 16), st.integers(0, 255)),
    min_size=1,
    max_size=2,
)


@settings(max_examples=400, deadline=None)
@given(responses(), edits)
def test_the_walker_never_takes_bytes_protobuf_would_read_otherwise(
    case: tuple[predict_pb2.PredictResponse, bool], changes: list[tuple[int, int, int]]
) -> None:
    agrees_with_tensorflow(mutate(case[0].SerializeToString(), changes))


def _entry(name: bytes, tensor: bytes) -> bytes:
    entry = b"\x0a" + bytes([len(name)]) + name + b"\x12" + bytes([len(tensor)]) + tensor
    return b"\x0a" + bytes([len(entry)]) + entry


def _overlong_length(entry: bytes) -> bytes:
    """The entry with its one-byte length written in two bytes (legal, but no
    encoder writes it)."""
    return entry[:1] + bytes([entry[1] | 0x80, 0x00]) + entry[2:]


FLOATS = b"\x08\x01" + b"\x12\x04\x12\x02\x08\x02" + b"\x2a\x08" + np.ones(2, "<f4").tobytes()


def test_the_walker_is_built_by_the_install() -> None:
    # As for guard.dataplane._rank: an install without a compiler works, but this suite
    # must exercise both paths.
    assert native().name == "native"


def test_a_tensor_like_tf_serving_writes_is_taken() -> None:
    assert walk_agrees_with_protobuf(_entry(b"out", FLOATS))


@pytest.mark.parametrize(
    ("what", "body"),
    [
        ("no output", b""),
        ("an output with no name field", b"\x0a\x04" + b"\x12\x02\x08\x01"),
        ("the value before the key", b"\x0a\x09\x12\x02\x08\x01\x0a\x03out"),
        ("a repeated output name", _entry(b"out", FLOATS) * 2),
        ("a non-ASCII name", _entry("ö".encode(), FLOATS)),
        ("field number 0", _entry(b"out", FLOATS) + b"\x02\x00"),
        ("an unknown top-level field", _entry(b"out", FLOATS) + b"\x1a\x00"),
        ("a two-byte tag for field 1", b"\x8a\x00" + _entry(b"out", FLOATS)[1:]),
        ("an overlong length", _overlong_length(_entry(b"out", FLOATS))),
        ("values sent unpacked", _entry(b"out", b"\x08\x01\x2d\x00\x00\x80\x3f")),
        ("a dtype sent length-delimited", _entry(b"out", b"\x0a\x00")),
        ("a repeated dtype", _entry(b"out", b"\x08\x01\x08\x01")),
        ("two runs of float_val", _entry(b"out", b"\x08\x01\x2a\x00\x2a\x00")),
        ("float_val of 3 bytes", _entry(b"out", b"\x08\x01\x2a\x03\x00\x00\x00")),
        ("a truncated packed varint", _entry(b"out", b"\x08\x09\x52\x01\x80")),
        ("unknown_rank", _entry(b"out", b"\x12\x02\x18\x01")),
        ("a resource handle", _entry(b"out", b"\x72\x00")),
        ("version_label", _entry(b"out", FLOATS) + b"\x12\x02\x22\x00"),
        ("two model specs", _entry(b"out", FLOATS) + b"\x12\x00\x12\x00"),
        ("an 11-byte varint", _entry(b"out", b"\x08" + b"\xff" * 10 + b"\x01")),
        ("a varint's 10th byte above 1", _entry(b"out", b"\x08" + b"\xff" * 9 + b"\x02")),
        ("a length past the end", _entry(b"out", FLOATS)[:-1]),
        # Found (a red-team pass): a rewrite kept these as they came, where the
        # reference writes the tensor anew without them.
        ("a float tensor's double_val", _entry(b"out", FLOATS + b"\x32\x08" + bytes(8))),
        ("a float tensor's int_val", _entry(b"out", FLOATS + b"\x3a\x01\x01")),
        ("a float tensor's empty tensor_content", _entry(b"out", FLOATS + b"\x22\x00")),
        ("float_val and tensor_content both", _entry(b"out", FLOATS + b"\x22\x08" + bytes(8))),
    ],
)
def test_the_walker_declines_what_it_does_not_read(what: str, body: bytes) -> None:
    assert native().walk(body) is None, what


def test_values_at_an_odd_offset_come_back_aligned_and_equal() -> None:
    values = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    tensor = tensor_pb2.TensorProto(dtype=DT.DT_FLOAT, float_val=values.ravel().tolist())
    tensor.tensor_shape.dim.add(size=2)
    tensor.tensor_shape.dim.add(size=2)
    for name in ("o", "ou", "out", "outp"):  # moves the values one byte at a time
        response = predict_pb2.PredictResponse()
        response.outputs[name].CopyFrom(tensor)
        data = response.SerializeToString()
        read = read_predict_response(data, native().walk(data))
        decoded = read.decode(name, 1 << 20)
        assert decoded is not None
        array, encoding = decoded
        assert array.flags.aligned and encoding is Encoding.TYPED
        np.testing.assert_array_equal(array, values)


_CONFIG = parse_config(
    {
        "models": [
            {
                "name": "*",
                "outputs": [
                    {"name": "*", "on_violation": "clamp", "check_sum": True, "top_k": 2},
                ],
            }
        ]
    },
    source="<test_walk>",
)
_BOOK = RuleBook(_CONFIG.models, _CONFIG.max_message_bytes, native())
_REFERENCE_BOOK = RuleBook(_CONFIG.models, _CONFIG.max_message_bytes, REFERENCE)


def _guard(body: bytes, book: RuleBook = _BOOK) -> Any:
    metrics = GuardMetrics(CollectorRegistry(), model_names=[], max_class_label_values=5)
    try:
        guarded = guard_predict_response(body, None, book, metrics)
    except GuardError as exc:
        return type(exc), exc.details
    return guarded and (guarded.body, guarded.action, guarded.violations)


@settings(max_examples=200, deadline=None)
@given(responses(), edits)
def test_guarded_responses_do_not_depend_on_the_walker(
    case: tuple[predict_pb2.PredictResponse, bool], changes: list[tuple[int, int, int]]
) -> None:
    body = case[0].SerializeToString()
    for data in (body, mutate(body, changes)):
        assert same_outcome(_guard(data, _REFERENCE_BOOK), _guard(data))


def _small_responses() -> list[bytes]:
    """A few responses as TF Serving writes them: every dtype layout the walker reads."""
    out = []
    for dtype, fill in (
        (DT.DT_FLOAT, "float_val"),
        (DT.DT_DOUBLE, "tensor_content"),
        (DT.DT_HALF, "half_val"),
        (DT.DT_STRING, "string_val"),
    ):
        response = predict_pb2.PredictResponse()
        tensor = response.outputs["p"]
        tensor.dtype = dtype
        tensor.tensor_shape.dim.add(size=2)
        if fill == "float_val":
            tensor.float_val.extend([0.25, 0.75])
        elif fill == "tensor_content":
            tensor.tensor_content = np.array([0.25, 0.75]).tobytes()
        elif fill == "half_val":
            tensor.half_val.extend([0x3C00, 0x3800])
        else:
            tensor.string_val.extend([b"a", b"b"])
        response.model_spec.name = "m"
        response.model_spec.version.value = 300
        response.model_spec.signature_name = "s"
        out.append(response.SerializeToString())
    return out


@pytest.mark.parametrize("body", _small_responses(), ids=["float_val", "content", "half", "string"])
def test_every_one_byte_change_is_taken_only_if_protobuf_reads_the_same(body: bytes) -> None:
    taken = 0
    for i in range(len(body) + 1):
        variants = [body[:i] + bytes([v]) + body[i:] for v in (0x00, 0x01, 0x7F, 0x80, 0xFF)]
        if i < len(body):
            variants.append(body[:i] + body[i + 1 :])
            variants += [
                body[:i] + bytes([body[i] ^ v]) + body[i + 1 :]
                for v in (1, 2, 4, 8, 16, 32, 64, 128)
            ]
        taken += sum(agrees_with_tensorflow(v) for v in variants)
    assert taken  # changed values (and names) are still read


def _softmax_response(values: list[float], shape: tuple[int, ...], name: str = "probs") -> bytes:
    response = predict_pb2.PredictResponse()
    tensor = response.outputs[name]
    tensor.dtype = DT.DT_FLOAT
    for size in shape:
        tensor.tensor_shape.dim.add(size=size)
    tensor.float_val.extend(values)
    response.model_spec.name = "m"
    return response.SerializeToString()


@pytest.mark.parametrize(
    ("values", "shape"),
    [
        ([0.25, 0.75, 0.5, 0.5], (2, 2)),  # clean: the planned path
        ([0.5], (2, 2)),  # TF's fill convention: one value stands for all four
        ([], (2, 2)),  # no values: zeros
        ([0.25, 0.75, 0.5, 0.75], (2, 2)),  # a row summing to 1.25: counted
        ([0.25, 0.75, float("nan"), 0.5], (2, 2)),
    ],
)
def test_each_layout_guards_as_without_the_walker(values: list[float], shape: tuple[int]) -> None:
    body = _softmax_response(values, shape)
    assert native().walk(body) is not None
    for _ in range(3):  # the plan is made on the first response, then reused
        walked = _guard(body)
        assert same_outcome(_guard(body, _REFERENCE_BOOK), walked)


def test_plans_are_kept_for_small_layouts_only() -> None:
    book = RuleBook(_CONFIG.models, _CONFIG.max_message_bytes, native())
    clean = [0.25, 0.75, 0.5, 0.5]
    for name, kept in (("p" * 2000, 0), ("probs", 1)):
        body = _softmax_response(clean, (2, 2), name)
        guarded = _guard(body, book)
        assert guarded[1] == Action.CLEAN
        reference = RuleBook(_CONFIG.models, _CONFIG.max_message_bytes, REFERENCE)
        assert same_outcome(_guard(body, reference), guarded)
        assert len(book.plans) == kept  # a long name is guarded, but not kept as a key
