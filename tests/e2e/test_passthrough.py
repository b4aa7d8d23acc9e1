"""What the guard must not change, end to end: metadata and unguarded Predict
answers byte for byte, upstream errors code and details, and the response
encoding of guarded outputs. Every test runs against both backend encodings."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from guard.dev.models import BINARY_MLP, MODEL_NAMES, SOFTMAX_201, WIDE_DEEP

from ._support import (
    GET_MODEL_METADATA,
    GET_MODEL_STATUS,
    PREDICT,
    inputs_for,
    predict,
    predict_error,
    predict_request,
    raw_call,
)
from .conftest import GuardProcess

pytestmark = [pytest.mark.tf, pytest.mark.slow]

Guard = Callable[[str], GuardProcess]


@pytest.mark.parametrize("scenario", ["observe", "examples"])
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_get_model_metadata_is_byte_identical(
    guard: Guard, backend_channel: grpc.Channel, model: str, scenario: str
) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = model
    request.metadata_field.append("signature_def")

    body, _ = raw_call(guard(scenario).channel, GET_MODEL_METADATA, request)
    direct, _ = raw_call(backend_channel, GET_MODEL_METADATA, request)

    assert body == direct
    response = get_model_metadata_pb2.GetModelMetadataResponse.FromString(body)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert "serving_default" in signatures.signature_def


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_get_model_status_is_byte_identical(
    guard: Guard, backend_channel: grpc.Channel, model: str
) -> None:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model

    body, _ = raw_call(guard("examples").channel, GET_MODEL_STATUS, request)
    direct, _ = raw_call(backend_channel, GET_MODEL_STATUS, request)

    assert body == direct
    status = get_model_status_pb2.GetModelStatusResponse.FromString(body)
    assert [v.state for v in status.model_version_status] == [
        get_model_status_pb2.ModelVersionStatus.AVAILABLE
    ]


@pytest.mark.parametrize("model", [BINARY_MLP, SOFTMAX_201])
def test_predict_for_a_model_without_rules_is_byte_identical(
    guard: Guard, backend_channel: grpc.Channel, model: str
) -> None:
    g = guard("observe")  # rules for wide_deep only
    request = predict_request(model, inputs_for(model, "random64"))
    requests_before = g.sample("guard_requests_total", model="__other__", method="Predict")

    body, trailers = raw_call(g.channel, PREDICT, request)
    direct, _ = raw_call(backend_channel, PREDICT, request)

    assert body == direct
    assert "x-guard-action" not in trailers
    requests_after = g.sample("guard_requests_total", model="__other__", method="Predict")
    assert requests_after - requests_before == 1


def _wrong_dtype(model: str) -> predict_pb2.PredictRequest:
    inputs = {k: v.astype(np.int64) for k, v in inputs_for(model, "demo").items()}
    return predict_request(model, inputs)


def _unknown_version() -> predict_pb2.PredictRequest:
    request = predict_request(BINARY_MLP, inputs_for(BINARY_MLP, "demo"))
    request.model_spec.version.value = 2
    return request


ERROR_CASES: dict[str, Callable[[], predict_pb2.PredictRequest]] = {
    "unknown-model": lambda: predict_request("no_such_model", inputs_for(BINARY_MLP, "demo")),
    "unknown-signature": lambda: predict_request(
        WIDE_DEEP, inputs_for(WIDE_DEEP, "demo"), signature="no_such_signature"
    ),
    "unknown-version": _unknown_version,
    "wrong-dtype-wide_deep": lambda: _wrong_dtype(WIDE_DEEP),
    "wrong-dtype-softmax_201": lambda: _wrong_dtype(SOFTMAX_201),
}


@pytest.mark.parametrize("scenario", ["observe", "examples"])
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_upstream_errors_reach_the_client_unchanged(
    guard: Guard, backend_channel: grpc.Channel, case: str, scenario: str
) -> None:
    request = ERROR_CASES[case]()

    through_guard = predict_error(guard(scenario).channel, request)
    direct = predict_error(backend_channel, request)

    assert direct.code() in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert through_guard.code() == direct.code()
    assert through_guard.details() == direct.details()
    assert through_guard.trailing_metadata() == direct.trailing_metadata()
    assert direct.details()  # the backend says what is wrong


_TYPED_FIELD = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_STRING: "string_val",
}


def _value_fields(proto: tensor_pb2.TensorProto) -> set[str]:
    """The fields of a TensorProto that carry values."""
    fields = {"tensor_content", *_TYPED_FIELD.values(), "double_val", "half_val", "int_val"}
    return {name for name in fields if len(getattr(proto, name))}


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_guarded_outputs_keep_the_backends_encoding(
    encoding: str, guard: Guard, backend_channel: grpc.Channel, model: str
) -> None:
    request = predict_request(model, inputs_for(model, "demo"))

    guarded, _ = predict(guard("examples").channel, request)
    direct, _ = predict(backend_channel, request)

    derived = set(guarded.outputs) - set(direct.outputs)
    assert derived, "examples/guard.yaml derives outputs for every seed model"
    for name, proto in [*direct.outputs.items(), *guarded.outputs.items()]:
        if proto.dtype == types_pb2.DT_STRING:
            expected = {"string_val"}  # labels: strings have no tensor_content encoding
        elif encoding == "typed":
            expected = {_TYPED_FIELD[proto.dtype]}
        else:
            expected = {"tensor_content"}
        assert _value_fields(proto) == expected, f"{name}: {proto.dtype}"
        rows = tf.make_ndarray(proto).shape[0]
        assert rows == inputs_for(model, "demo")[next(iter(request.inputs))].shape[0]


@pytest.mark.parametrize("scenario", ["observe", "examples"])
def test_guard_process_serves_health_and_stays_tensorflow_free(guard: Guard, scenario: str) -> None:
    g = guard(scenario)
    health = health_pb2_grpc.HealthStub(g.channel)
    # The probe may not have seen the upstream yet right after start; bounded wait.
    for _ in range(100):
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        if answer.status == health_pb2.HealthCheckResponse.SERVING:
            break
        time.sleep(0.1)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert g.sample("guard_upstream_up") == 1.0
    maps = Path(f"/proc/{g.process.pid}/maps").read_text()
    assert "tensorflow" not in maps, "the guard process must never load TensorFlow"
