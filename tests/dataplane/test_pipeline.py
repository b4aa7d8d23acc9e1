"""guard_predict_response: rule matching, encoding preservation and metrics.

Responses are built with TensorFlow Serving's own classes, passed through the
data plane, and read back with the official classes and ``tf.make_ndarray``.
Each test gets a fresh ``CollectorRegistry`` and asserts with
``registry.get_sample_value``.
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from prometheus_client import CollectorRegistry
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from guard.control.config import parse_config
from guard.dataplane.book import RuleBook
from guard.dataplane.codec.response import ModelSpecInfo
from guard.dataplane.codec.tensor import Encoding
from guard.dataplane.errors import DecodeError, OutputShapeError, RejectedOutputError
from guard.dataplane.kernels import REFERENCE, Kernels, default
from guard.dataplane.pipeline import GuardedResponse, guard_predict_response
from guard.dataplane.results import Action
from guard.metrics.guard_metrics import GuardMetrics

TYPED, CONTENT = Encoding.TYPED, Encoding.CONTENT
VALUE_FIELD = {np.float16: "half_val", np.float32: "float_val", np.float64: "double_val"}
DTYPE_ENUM = {np.float16: types_pb2.DT_HALF, np.float32: types_pb2.DT_FLOAT}
DTYPE_ENUM[np.float64] = types_pb2.DT_DOUBLE


def tensor(values: Any, encoding: Encoding = TYPED, dtype: Any = np.float32) -> Any:
    """An official TensorProto in the given encoding."""
    array = np.asarray(values, dtype=dtype)
    t = tensor_pb2.TensorProto(
        dtype=DTYPE_ENUM[dtype],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]
        ),
    )
    if encoding is CONTENT:
        t.tensor_content = array.tobytes()
    elif dtype == np.float16:
        t.half_val.extend(array.ravel().view(np.uint16).tolist())
    else:
        getattr(t, VALUE_FIELD[dtype]).extend(array.ravel().tolist())
    return t


def response(
    outputs: dict[str, Any],
    model: str = "wide_deep",
    version: int | None = 3,
    signature: str = "serving_default",
) -> bytes:
    """A serialized official PredictResponse."""
    resp = predict_pb2.PredictResponse()
    for name, t in outputs.items():
        resp.outputs[name].CopyFrom(t)
    resp.model_spec.name = model
    if version is not None:
        resp.model_spec.version.value = version
    resp.model_spec.signature_name = signature
    return resp.SerializeToString()


class Guard:
    """A RuleBook and GuardMetrics on a fresh registry, from a config dict."""

    def __init__(
        self, models: list[dict[str, Any]], kernels: Kernels | None = None, **top: Any
    ) -> None:
        self.config = parse_config({"models": models, **top})
        self.book = RuleBook(self.config.models, self.config.max_message_bytes, kernels)
        self.registry = CollectorRegistry()
        self.metrics = GuardMetrics(
            self.registry, self.config.model_names(), self.config.max_class_label_values
        )

    def __call__(self, body: bytes, request: ModelSpecInfo | None = None) -> GuardedResponse | None:
        return guard_predict_response(body, request, self.book, self.metrics)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def parsed(result: GuardedResponse | None) -> predict_pb2.PredictResponse:
    assert result is not None
    return predict_pb2.PredictResponse.FromString(result.body)


def wide_deep(*outputs: dict[str, Any], signature: str = "*") -> list[dict[str, Any]]:
    return [{"name": "wide_deep", "signature": signature, "outputs": list(outputs)}]


LEAKY = [[0.2], [1.0028], [0.7]]  # a WideDeepModel "probability" above 1


# ------------------------------------------------------------ byte identity


def test_no_matching_rule_returns_none() -> None:
    guard = Guard(wide_deep({"name": "*", "on_violation": "clamp"}))
    body = response({"out": tensor(LEAKY)}, model="other_model")
    assert guard(body) is None
    assert (
        guard.sample(
            "guard_responses_total",
            model="__other__",
            version="3",
            signature="serving_default",
            action="clean",
        )
        is None
    )


@pytest.mark.parametrize("values", [[[0.2], [0.9]], LEAKY])
def test_observe_without_derivation_is_byte_identical(values: Any) -> None:
    guard = Guard(wide_deep({"name": "*", "on_violation": "observe"}))
    body = response({"out": tensor(values), "b": tensor([1.0, 0.5], CONTENT, np.float64)})
    result = guard(body)
    assert result is not None
    assert result.body is body
    assert result.action == (Action.OBSERVED if values is LEAKY else Action.CLEAN)


def test_non_float_outputs_are_untouched() -> None:
    ids = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, int64_val=[5, -7])
    ids.tensor_shape.dim.add(size=2)
    names = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"x", b"y"])
    names.tensor_shape.dim.add(size=2)
    guard = Guard(wide_deep({"name": "*", "on_violation": "clamp", "argmax": True}))
    body = response({"ids": ids, "names": names, "p": tensor(LEAKY)})
    back = parsed(guard(body))
    assert back.outputs["ids"] == ids and back.outputs["names"] == names
    assert set(back.outputs) == {"ids", "names", "p", "p_class", "p_score"}
    assert ids.SerializeToString() in guard(body).body  # type: ignore[union-attr]


def test_output_filtered_away_is_skipped_silently() -> None:
    guard = Guard(wide_deep({"name": "missing", "on_violation": "reject", "argmax": True}))
    body = response({"present": tensor(LEAKY)})
    result = guard(body)
    assert result is not None and result.body is body and result.action == Action.CLEAN
    assert (
        guard.sample(
            "guard_output_values_total",
            model="wide_deep",
            version="3",
            signature="serving_default",
            output="missing",
        )
        is None
    )


# ------------------------------------------------------ encoding preservation


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_typed_source_gives_typed_outputs(dtype: Any) -> None:
    rule = {
        "name": "probs",
        "on_violation": "clamp",
        "argmax": True,
        "top_k": 2,
        "labels": ["cat", "dog", "eel"],
    }
    guard = Guard(wide_deep(rule))
    values = [[0.1, 1.3, 0.2], [0.5, 0.2, -0.1]]
    back = parsed(guard(response({"probs": tensor(values, TYPED, dtype)})))
    field = VALUE_FIELD[dtype]
    probs = back.outputs["probs"]
    assert probs.tensor_content == b"" and len(getattr(probs, field)) == 6
    np.testing.assert_array_equal(tf.make_ndarray(probs), np.clip(np.asarray(values, dtype), 0, 1))
    cls = back.outputs["probs_class"]
    assert cls.dtype == types_pb2.DT_INT64 and list(cls.int64_val) == [1, 0]
    assert cls.tensor_content == b""
    score = back.outputs["probs_score"]
    assert score.dtype == DTYPE_ENUM[dtype] and score.tensor_content == b""
    np.testing.assert_array_equal(tf.make_ndarray(score), np.asarray([1.0, 0.5], dtype))
    assert list(back.outputs["probs_label"].string_val) == [b"dog", b"cat"]
    top = back.outputs["probs_top_k_class"]
    assert list(top.int64_val) == [1, 2, 0, 1] and top.tensor_content == b""
    assert [d.size for d in top.tensor_shape.dim] == [2, 2]
    assert back.outputs["probs_top_k_label"].string_val == [b"dog", b"eel", b"cat", b"dog"]
    assert len(getattr(back.outputs["probs_top_k_score"], field)) == 4


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_content_source_gives_content_outputs(dtype: Any) -> None:
    guard = Guard(
        wide_deep({"name": "*", "on_violation": "clamp", "threshold": 0.5, "labels": ["NO", "YES"]})
    )
    back = parsed(guard(response({"p": tensor(LEAKY, CONTENT, dtype)})))
    p = back.outputs["p"]
    assert len(p.tensor_content) == 3 * np.dtype(dtype).itemsize
    assert len(getattr(p, VALUE_FIELD[dtype])) == 0
    np.testing.assert_array_equal(tf.make_ndarray(p), np.asarray([[0.2], [1.0], [0.7]], dtype))
    cls = back.outputs["p_class"]
    assert cls.int64_val == [] and cls.tensor_content == np.array([0, 1, 1], np.int64).tobytes()
    np.testing.assert_array_equal(tf.make_ndarray(cls), [[0], [1], [1]])
    assert list(back.outputs["p_label"].string_val) == [b"NO", b"YES", b"YES"]


@pytest.mark.parametrize("encoding", [TYPED, CONTENT])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_a_repaired_tensor_is_written_over_its_old_values(
    encoding: Encoding, dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the walker read the layout, clamped values are written in place: the
    bytes around them are the upstream's, and the message reads as protobuf's
    re-serialization (the reference route, without the walker) reads."""
    from guard.dataplane.codec.response import Response
    from guard.dataplane.kernels import REFERENCE
    from tests.native import native

    models = wide_deep({"name": "probs", "on_violation": "clamp", "argmax": True})
    values = np.asarray([[0.1, 1.3, 0.2], [0.5, 0.2, -0.1]], dtype)
    body = response({"probs": tensor(values, encoding, dtype), "other": tensor([[2.0]])})
    serialized = Guard(models, REFERENCE)(body)
    if encoding is CONTENT or dtype != np.float16:  # half_val is varints: written anew

        def no_view(self: Response) -> None:
            raise AssertionError("the response was parsed to be serialized again")

        monkeypatch.setattr(Response, "view", no_view)
    patched = Guard(models, native())(body)
    assert patched is not None and serialized is not None
    assert parsed(patched) == parsed(serialized)
    np.testing.assert_array_equal(
        tf.make_ndarray(parsed(patched).outputs["probs"]), np.clip(values, 0, 1)
    )
    old, new = values.astype(dtype).tobytes(), np.clip(values, 0, 1).astype(dtype).tobytes()
    if encoding is CONTENT or dtype != np.float16:  # half_val is varints: written anew
        at = body.index(old)
        assert patched.body[: len(body)] == body[:at] + new + body[at + len(old) :]


def test_fill_convention_output_is_expanded_when_rewritten() -> None:
    filled = tensor([[1.5]], TYPED)
    filled.tensor_shape.dim[0].size = 4  # one value for a [4, 1] tensor
    assert tf.make_ndarray(filled).shape == (4, 1)
    guard = Guard(wide_deep({"name": "*", "on_violation": "clamp"}))
    back = parsed(guard(response({"p": filled})))
    np.testing.assert_array_equal(tf.make_ndarray(back.outputs["p"]), np.ones((4, 1)))


def test_unpacked_source_is_rewritten_once() -> None:
    t = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    t.tensor_shape.dim.add(size=3)
    unpacked = t.SerializeToString() + b"".join(
        b"\x2d" + np.float32(v).tobytes() for v in (0.5, 1.5, -2.0)
    )
    resp = predict_pb2.PredictResponse()
    resp.model_spec.name = "wide_deep"
    # An outputs map entry by hand: key "p", value = the unpacked tensor (short, so
    # each length fits one varint byte).
    entry = b"\x0a\x01p" + b"\x12" + bytes([len(unpacked)]) + unpacked
    body = b"\x0a" + bytes([len(entry)]) + entry + resp.SerializeToString()
    official = predict_pb2.PredictResponse.FromString(body)
    np.testing.assert_array_equal(tf.make_ndarray(official.outputs["p"]), [0.5, 1.5, -2.0])
    guard = Guard(wide_deep({"name": "*", "on_violation": "clamp"}))
    result = guard(body)
    back = parsed(result)
    assert list(back.outputs["p"].float_val) == [0.5, 1.0, 0.0]  # each value once
    assert b"\x2d" + np.float32(1.5).tobytes() not in result.body  # type: ignore[union-attr]


# ---------------------------------------------------------------- matching


def test_exact_model_beats_wildcard_model() -> None:
    guard = Guard(
        [
            {"name": "*", "outputs": [{"name": "p", "on_violation": "reject"}]},
            {"name": "wide_deep", "outputs": [{"name": "*", "on_violation": "clamp"}]},
        ]
    )
    result = guard(response({"p": tensor(LEAKY)}))
    assert result is not None and result.action == Action.CLAMPED
    with pytest.raises(RejectedOutputError):
        guard(response({"p": tensor(LEAKY)}, model="other"))


def test_exact_signature_beats_wildcard_signature() -> None:
    guard = Guard(
        [
            {
                "name": "wide_deep",
                "signature": "*",
                "outputs": [{"name": "p", "on_violation": "reject"}],
            },
            {
                "name": "wide_deep",
                "signature": "serving_default",
                "outputs": [{"name": "*", "on_violation": "clamp"}],
            },
        ]
    )
    assert guard(response({"p": tensor(LEAKY)})).action == Action.CLAMPED  # type: ignore[union-attr]
    with pytest.raises(RejectedOutputError):
        guard(response({"p": tensor(LEAKY)}, signature="predict_raw"))


def test_exact_output_beats_wildcard_output() -> None:
    guard = Guard(
        wide_deep({"name": "*", "on_violation": "reject"}, {"name": "p", "on_violation": "clamp"})
    )
    assert guard(response({"p": tensor(LEAKY)})).action == Action.CLAMPED  # type: ignore[union-attr]
    with pytest.raises(RejectedOutputError):
        guard(response({"q": tensor(LEAKY)}))


def test_less_specific_level_applies_when_specific_one_has_no_rule_for_output() -> None:
    guard = Guard(
        [
            {"name": "*", "outputs": [{"name": "*", "on_violation": "clamp"}]},
            {"name": "wide_deep", "outputs": [{"name": "other", "on_violation": "reject"}]},
        ]
    )
    assert guard(response({"p": tensor(LEAKY)})).action == Action.CLAMPED  # type: ignore[union-attr]


@pytest.mark.parametrize("sent", ["", "serving_default"])
def test_empty_signature_means_serving_default(sent: str) -> None:
    guard = Guard(wide_deep({"name": "*", "on_violation": "clamp"}, signature=""))
    result = guard(response({"p": tensor(LEAKY)}, signature=sent))
    assert result is not None and result.action == Action.CLAMPED
    assert guard(response({"p": tensor(LEAKY)}, signature="other")) is None
    assert (
        guard.sample(
            "guard_responses_total",
            model="wide_deep",
            version="3",
            signature="serving_default",
            action="clamped",
        )
        == 1.0
    )


def test_request_spec_names_the_model_when_the_response_does_not() -> None:
    guard = Guard(wide_deep({"name": "*", "on_violation": "clamp"}, signature="sig"))
    body = response({"p": tensor(LEAKY)}, model="", version=None, signature="")
    result = guard(body, ModelSpecInfo("wide_deep", "sig", None))
    assert result is not None and result.action == Action.CLAMPED
    assert (
        guard.sample(
            "guard_responses_total",
            model="wide_deep",
            version="",
            signature="sig",
            action="clamped",
        )
        == 1.0
    )


@pytest.mark.parametrize("kernels", [REFERENCE, default()], ids=["reference", "native"])
@pytest.mark.parametrize(
    ("model", "signature", "asked"),
    [("lenient", "serving_default", ""), ("unruled", "serving_default", ""),
     ("strict", "other", ""), ("strict", "serving_default", "other")],
)  # fmt: skip
def test_an_answer_for_another_model_or_signature_than_asked_is_refused(
    kernels: Kernels, model: str, signature: str, asked: str
) -> None:
    """Red team: the response's model_spec chose the rules, so a request for
    'strict' (reject) answered as 'unruled' passed unchecked, and as
    'lenient' was observed and counted under 'lenient'. TF Serving answers
    for the model and signature asked (serving_default where none is)."""
    rules = [
        {"name": "strict", "signature": "*", "outputs": [{"name": "*", "on_violation": "reject"}]},
        {"name": "lenient", "outputs": [{"name": "*", "on_violation": "observe"}]},
    ]
    guard = Guard(rules, kernels)
    body = response({"p": tensor(LEAKY)}, model=model, signature=signature)
    for _ in range(2):  # the second through a plan, where the route makes one
        with pytest.raises(DecodeError) as info:
            guard(body, ModelSpecInfo("strict", asked, None))
        assert info.value.details == (
            f"guard: the upstream answered for model '{model}' signature '{signature}', and "
            f"the request asked for model 'strict' signature '{asked or 'serving_default'}'; "
            "TF Serving answers for the model and signature asked: fix the upstream, or the "
            "hop that changed the answer"
        )
    assert guard.sample("guard_decode_errors_total", model="strict") == 2.0
    as_asked = response({"p": tensor(LEAKY)}, model="strict", signature=asked or "serving_default")
    with pytest.raises(RejectedOutputError):
        guard(as_asked, ModelSpecInfo("strict", asked, None))


@pytest.mark.parametrize("kernels", [REFERENCE, default()], ids=["reference", "native"])
def test_values_the_guard_cannot_read_under_a_reject_rule_are_refused(kernels: Kernels) -> None:
    """Red team: 2.0 and -1.0 in a DT_HALF tensor's float_val, or in a
    DT_BFLOAT16 tensor, were answered clean under a reject rule."""
    guard = Guard(wide_deep({"name": "p", "on_violation": "reject"}), kernels)
    stray = tensor_pb2.TensorProto(dtype=types_pb2.DT_HALF)
    stray.tensor_shape.dim.add(size=2)
    stray.float_val.extend([2.0, -1.0])
    bf16 = tensor_pb2.TensorProto(dtype=types_pb2.DT_BFLOAT16, tensor_content=b"\x00\x40\x80\xbf")
    bf16.tensor_shape.dim.add(size=2)
    for bad, words in ((stray, "values in float_val"), (bf16, "DT_BFLOAT16")):
        with pytest.raises(DecodeError, match=words):
            guard(response({"p": bad}))
    assert guard.sample("guard_decode_errors_total", model="wide_deep") == 2.0
    assert guard.sample(
        "guard_responses_total", model="wide_deep", version="3", signature="serving_default",
        action="clean",
    ) is None  # fmt: skip


@pytest.mark.parametrize("kernels", [REFERENCE, default()], ids=["reference", "native"])
def test_float_values_under_another_dtype_are_refused(kernels: Kernels) -> None:
    """Red team: 2.0 and NaN in float_val under DT_FLOAT_REF (101), or under
    DT_INT64 (or a dtype sent twice, protobuf keeping the last), passed a
    reject rule as clean, while tf.make_ndarray and float_val readers read
    them."""
    guard = Guard(wide_deep({"name": "p", "on_violation": "reject"}), kernels)
    cases = []
    for dtype in (101, types_pb2.DT_INT64, types_pb2.DT_STRING, types_pb2.DT_INVALID):
        t = tensor_pb2.TensorProto(dtype=dtype)
        t.tensor_shape.dim.add(size=2)
        t.float_val.extend([2.0, math.nan])
        cases.append(t.SerializeToString())
    # DT_FLOAT, then the DT_INT64 tensor's fields: protobuf keeps the last dtype
    cases.append(tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT).SerializeToString() + cases[1])
    for raw in cases:
        bad = tensor_pb2.TensorProto.FromString(raw)
        with pytest.raises(DecodeError, match="reference type|not a floating-point type"):
            guard(response({"p": bad}))
    assert guard.sample("guard_decode_errors_total", model="wide_deep") == len(cases)


# ------------------------------------------------------- errors and policies


def test_reject_raises_with_details_and_is_counted() -> None:
    guard = Guard(wide_deep({"name": "output_1", "on_violation": "reject"}))
    body = response({"output_1": tensor([1.1, 1.2, 1.3, 1.4, 1.5, 0.5])})
    with pytest.raises(RejectedOutputError) as info:
        guard(body)
    assert info.value.details == "guard: model 'wide_deep' output 'output_1': 5 values above 1.0"
    labels = {"model": "wide_deep", "version": "3", "signature": "serving_default"}
    assert guard.sample("guard_responses_total", action="rejected", **labels) == 1.0
    assert (
        guard.sample("guard_output_violations_total", output="output_1", kind="above_max", **labels)
        == 5.0
    )


def test_undecodable_response_is_counted() -> None:
    guard = Guard(wide_deep({"name": "*"}))
    with pytest.raises(DecodeError, match="cannot decode PredictResponse from upstream"):
        guard(b"\x0a\x05ab", ModelSpecInfo("wide_deep", "", None))
    assert guard.sample("guard_decode_errors_total", model="wide_deep") == 1.0

    bad = tensor([[0.5, 0.5]], CONTENT)
    bad.tensor_content = b"\x00" * 7
    with pytest.raises(DecodeError, match="output 'p' of model 'wide_deep'.*7 bytes"):
        guard(response({"p": bad}))
    assert guard.sample("guard_decode_errors_total", model="wide_deep") == 2.0


def test_adversarial_shape_is_a_decode_error() -> None:
    huge = tensor([0.5])
    huge.tensor_shape.dim[0].size = 2**62
    huge.tensor_shape.dim.add(size=2**62)
    guard = Guard(wide_deep({"name": "*"}))
    with pytest.raises(DecodeError, match="output 'p'"):
        guard(response({"p": huge}))


@pytest.mark.parametrize("dims", [[2**27, 0], [0, 2**62], [3, 0, 2**40]], ids=str)
@pytest.mark.parametrize("kernels", [REFERENCE, default()], ids=lambda k: k.name)
def test_an_empty_tensor_may_not_span_more_than_the_message_holds(
    dims: list[int], kernels: Kernels
) -> None:
    """Found (a red-team pass): 25 bytes of shape [2**27, 0] had a check_sum
    rule build per-row arrays, 3 GB of RSS in one call; [0, 2**62] was
    numpy's ValueError, a logged traceback per response."""
    empty = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    for size in dims:
        empty.tensor_shape.dim.add(size=size)
    guard = Guard(wide_deep({"name": "*", "check_sum": True}), kernels)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="holds no values, but its other dimensions span"):
            guard(response({"p": empty}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, f"{peak} bytes"
    assert guard.sample("guard_decode_errors_total", model="wide_deep") == 1.0


@pytest.mark.parametrize("kernels", [REFERENCE, default()], ids=lambda k: k.name)
def test_values_in_both_tensor_content_and_the_typed_field_are_refused(kernels: Kernels) -> None:
    """Found (a red-team pass): the guard clamped tensor_content, which
    TensorFlow reads, and passed float_val on unread, which a client reading
    resp.outputs['p'].float_val would take for the answer."""
    both = tensor([[1.5, 0.2]], CONTENT)
    both.float_val.extend([9.0, 9.0])
    guard = Guard(wide_deep({"name": "*", "on_violation": "clamp"}), kernels)
    with pytest.raises(DecodeError, match="both tensor_content and float_val"):
        guard(response({"p": both}))
    assert guard.sample("guard_decode_errors_total", model="wide_deep") == 1.0


def test_derived_name_colliding_with_a_model_output_is_refused() -> None:
    guard = Guard(wide_deep({"name": "p", "argmax": True}))
    body = response({"p": tensor([[0.1, 0.9]]), "p_class": tensor([1.0])})
    with pytest.raises(OutputShapeError, match="'p_class' would replace"):
        guard(body)


def test_trailers_report_action_and_violations() -> None:
    guard = Guard(wide_deep({"name": "*", "on_violation": "clamp", "check_sum": True}))
    result = guard(response({"p": tensor([[0.7, 0.7], [np.inf, 0.0], [0.5, 0.5]])}))
    assert result is not None
    # 1 inf value, 2 bad rows
    assert result.trailers() == (("x-guard-action", "clamped"), ("x-guard-violations", "3"))


def test_worst_action_wins_across_outputs() -> None:
    guard = Guard(
        wide_deep({"name": "a", "on_violation": "observe"}, {"name": "b", "on_violation": "clamp"})
    )
    result = guard(response({"a": tensor([2.0]), "b": tensor([3.0, 4.0])}))
    assert result is not None and result.action == Action.CLAMPED and result.violations == 3
    back = parsed(result)
    assert list(back.outputs["a"].float_val) == [2.0]  # observe leaves its own output alone
    assert list(back.outputs["b"].float_val) == [1.0, 1.0]


# ------------------------------------------------------------------ metrics


def test_counters_by_kind_and_sum() -> None:
    guard = Guard(wide_deep({"name": "p", "check_sum": True}))
    values = [[0.5, 0.5], [-0.5, 1.5], [np.nan, 0.2], [np.inf, -np.inf], [0.3, 0.3]]
    guard(response({"p": tensor(values)}))
    guard(response({"p": tensor([[0.5, 0.5]])}))
    labels = {"model": "wide_deep", "version": "3", "signature": "serving_default", "output": "p"}
    assert guard.sample("guard_output_values_total", **labels) == 12.0
    for kind, n in (("below_min", 1), ("above_max", 1), ("nan", 1), ("inf", 2)):
        assert guard.sample("guard_output_violations_total", kind=kind, **labels) == n, kind
    assert guard.sample("guard_output_sum_violations_total", **labels) == 3.0  # nan, inf, 0.6
    common = {k: v for k, v in labels.items() if k != "output"}
    assert guard.sample("guard_responses_total", action="observed", **common) == 1.0
    assert guard.sample("guard_responses_total", action="clean", **common) == 1.0


def test_output_value_histogram_resolves_just_above_one() -> None:
    guard = Guard(wide_deep({"name": "*"}))
    guard(response({"p": tensor(LEAKY)}))
    labels = {"model": "wide_deep", "signature": "serving_default", "output": "p"}

    def bucket(le: str) -> float | None:
        return guard.sample("guard_output_value_bucket", le=le, **labels)

    assert bucket("1.0") == 2.0
    assert bucket("1.001") == 2.0  # 1.0028 is not at or below 1.001 ...
    assert bucket("1.01") == 3.0  # ... but is at or below 1.01
    assert bucket("+Inf") == 3.0
    assert bucket("0.3") == 1.0 and bucket("0.1") == 0.0
    # prometheus_client omits _count and _sum for a histogram with negative buckets;
    # the +Inf bucket is the count.


def test_output_value_histogram_takes_row_maximum_for_multi_class() -> None:
    guard = Guard(wide_deep({"name": "*"}))
    guard(response({"p": tensor([[0.1, 0.85, 0.05], [0.3, 0.3, 0.4], [-2.0, -3.0, -1.5]])}))
    labels = {"model": "wide_deep", "signature": "serving_default", "output": "p"}
    assert guard.sample("guard_output_value_bucket", le="+Inf", **labels) == 3.0
    assert guard.sample("guard_output_value_bucket", le="-1.0", **labels) == 1.0
    assert guard.sample("guard_output_value_bucket", le="0.4", **labels) == 1.0  # f32 0.4 > 0.4
    assert guard.sample("guard_output_value_bucket", le="0.5", **labels) == 2.0
    assert guard.sample("guard_output_value_bucket", le="0.8", **labels) == 2.0
    assert guard.sample("guard_output_value_bucket", le="0.9", **labels) == 3.0


def test_predicted_class_counts_use_labels() -> None:
    guard = Guard(wide_deep({"name": "p", "argmax": True, "labels": ["cat", "dog", "eel"]}))
    guard(response({"p": tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.0, 0.9, 0.1]])}))
    labels = {"model": "wide_deep", "signature": "serving_default", "output": "p"}
    assert guard.sample("guard_predicted_class_total", **{"class": "dog"}, **labels) == 2.0
    assert guard.sample("guard_predicted_class_total", **{"class": "cat"}, **labels) == 1.0
    assert guard.sample("guard_predicted_class_total", **{"class": "eel"}, **labels) is None


def test_predicted_class_for_binary_threshold() -> None:
    guard = Guard(wide_deep({"name": "p", "threshold": 0.5, "labels": ["NO", "YES"]}))
    guard(response({"p": tensor([[0.0747], [0.8348], [0.9]])}))
    labels = {"model": "wide_deep", "signature": "serving_default", "output": "p"}
    assert guard.sample("guard_predicted_class_total", **{"class": "YES"}, **labels) == 2.0
    assert guard.sample("guard_predicted_class_total", **{"class": "NO"}, **labels) == 1.0


def test_class_label_values_are_capped() -> None:
    guard = Guard(wide_deep({"name": "p", "argmax": True}), max_class_label_values=2)
    eye = np.eye(5, dtype=np.float32)
    guard(response({"p": tensor(eye)}))
    guard(response({"p": tensor(eye[::-1])}))
    labels = {"model": "wide_deep", "signature": "serving_default", "output": "p"}

    def count(cls: str) -> float | None:
        return guard.sample("guard_predicted_class_total", **{"class": cls}, **labels)

    assert count("0") == 2.0 and count("1") == 2.0
    assert count("2") is None and count("4") is None
    assert count("__other__") == 6.0


def test_class_names_go_to_the_first_predicted_classes() -> None:
    # Cap 2: the names go to the first two classes predicted, in prediction order
    # (rows, then responses), not to the two lowest class indices.
    guard = Guard(wide_deep({"name": "p", "argmax": True}), max_class_label_values=2)
    eye = np.eye(5, dtype=np.float32)
    guard(response({"p": tensor(eye[[4]])}))
    guard(response({"p": tensor(eye[[2, 0, 1, 4]])}))
    labels = {"model": "wide_deep", "signature": "serving_default", "output": "p"}

    def count(cls: str) -> float | None:
        return guard.sample("guard_predicted_class_total", **{"class": cls}, **labels)

    assert count("4") == 2.0 and count("2") == 1.0
    assert count("0") is None and count("1") is None
    assert count("__other__") == 2.0


def test_queued_metrics_fold_at_their_bound_and_match_a_plain_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The histogram and the class counter queue arrays and fold them in batches.
    # With a tiny bound they fold mid-stream; the totals must equal a plain count.
    from guard.metrics import collectors as metrics_module

    monkeypatch.setattr(metrics_module, "PENDING_VALUES_MAX", 7)
    monkeypatch.setattr(metrics_module, "PENDING_ARRAYS_MAX", 2)
    guard = Guard(wide_deep({"name": "p", "argmax": True, "labels": ["a", "b", "c"]}))
    rng = np.random.default_rng(5)
    rows = [
        rng.dirichlet(np.ones(3), size=int(n)).astype(np.float32) for n in rng.integers(1, 6, 9)
    ]
    for r in rows:
        guard(response({"p": tensor(r)}))
    histogram = guard.metrics.output_value
    assert histogram._queued.arrays <= 2 and histogram._queued.values <= 7 + 5
    labels = {"model": "wide_deep", "signature": "serving_default", "output": "p"}
    every = np.concatenate(rows)
    winners = np.bincount(every.argmax(axis=1), minlength=3)
    for i, name in enumerate("abc"):
        got = guard.sample("guard_predicted_class_total", **{"class": name}, **labels)
        assert (got or 0.0) == winners[i]
    top = every.max(axis=1)
    for le in ("0.4", "0.5", "0.8", "+Inf"):
        bound = np.inf if le == "+Inf" else float(le)
        expected = np.count_nonzero(top.astype(np.float64) <= bound)
        assert guard.sample("guard_output_value_bucket", le=le, **labels) == expected


def test_unknown_model_is_labelled_other() -> None:
    guard = Guard([{"name": "*", "outputs": [{"name": "*", "argmax": True}]}])
    for i in range(20):
        guard(response({"p": tensor([[0.2, 0.8]])}, model=f"client_made_up_{i}"))
    labels = {"model": "__other__", "version": "3", "signature": "serving_default"}
    assert guard.sample("guard_responses_total", action="clean", **labels) == 20.0
    assert guard.sample("guard_output_values_total", output="p", **labels) == 40.0
    assert (
        guard.sample(
            "guard_predicted_class_total",
            model="__other__",
            signature="serving_default",
            output="p",
            **{"class": "1"},
        )
        == 20.0
    )
    samples = [
        s
        for m in guard.registry.collect()
        for s in m.samples
        if s.labels.get("model", "__other__") != "__other__"
    ]
    assert samples == []


def test_unpacked_values_next_to_a_malformed_packed_field_are_a_decode_error() -> None:
    t = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    t.tensor_shape.dim.add(size=1)
    # float_val 0.5 sent unpacked, then int64_val (field 10) holding a truncated varint.
    bad = t.SerializeToString() + b"\x2d" + np.float32(0.5).tobytes() + b"\x52\x02\x01\x80"
    entry = b"\x0a\x01p" + b"\x12" + bytes([len(bad)]) + bad
    body = b"\x0a" + bytes([len(entry)]) + entry
    guard = Guard(wide_deep({"name": "*"}))
    with pytest.raises(DecodeError):
        guard(body, ModelSpecInfo("wide_deep", "", None))


def test_a_signalling_nan_among_mixed_dtypes_is_skipped_without_a_warning() -> None:
    # One output name, float32 in one response and float64 in the next: the fold
    # widens the float32 values, and widening a signalling NaN raises "invalid"
    # (a warning, an error under this suite). Found by the fuzzer.
    guard = Guard(wide_deep({"name": "p"}))
    snan = np.array([0x7FA00000, 0x3F000000], dtype=np.uint32).view(np.float32)  # sNaN, 0.5
    assert np.isnan(snan[0])
    guard(response({"p": tensor(snan, CONTENT)}))
    guard(response({"p": tensor([0.25], CONTENT, np.float64)}))
    labels = {"model": "wide_deep", "signature": "serving_default", "output": "p"}
    assert guard.sample("guard_output_value_bucket", le="+Inf", **labels) == 2.0
    assert guard.sample("guard_output_value_bucket", le="0.3", **labels) == 1.0
