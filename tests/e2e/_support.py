"""Client-side helpers for the end-to-end tests: the official ``tensorflow_serving``
protos and stubs, ``tf.make_tensor_proto`` / ``tf.make_ndarray``, and raw-bytes calls."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from guard.dev.models import demo_inputs, random_inputs

from .conftest import RPC_TIMEOUT_S

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"

BATCHES = ("demo", "random64", "random257")
"""Input batches per model: the fixed demo rows, then two random batches."""


def inputs_for(model: str, batch: str) -> dict[str, np.ndarray]:
    """One of :data:`BATCHES` for ``model``."""
    if batch == "demo":
        return demo_inputs(model)
    size = int(batch.removeprefix("random"))
    return random_inputs(model, size, seed=size)


def predict_request(
    model: str, inputs: dict[str, np.ndarray], signature: str = ""
) -> predict_pb2.PredictRequest:
    """A PredictRequest built with the official protos and ``tf.make_tensor_proto``."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for alias, array in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(array))
    return request


def predict(
    channel: grpc.Channel, request: predict_pb2.PredictRequest
) -> tuple[predict_pb2.PredictResponse, dict[str, str]]:
    """Predict through the official stub; returns the response and its trailing metadata."""
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response, call = stub.Predict.with_call(request, timeout=RPC_TIMEOUT_S)
    return response, dict(call.trailing_metadata() or ())


def predict_error(channel: grpc.Channel, request: predict_pb2.PredictRequest) -> grpc.RpcError:
    """The error a Predict call fails with (fails the test if it succeeds)."""
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        stub.Predict(request, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"Predict for {request.model_spec.name!r} succeeded; expected an error")


def raw_call(channel: grpc.Channel, method: str, request: Any) -> tuple[bytes, dict[str, str]]:
    """Call ``method`` with no (de)serializers: the exact response bytes, and the trailers."""
    call = channel.unary_unary(method)
    body, rpc = call.with_call(request.SerializeToString(), timeout=RPC_TIMEOUT_S)
    return body, dict(rpc.trailing_metadata() or ())


def arrays(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    """Every output of a PredictResponse, decoded with ``tf.make_ndarray``."""
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def decode_labels(values: np.ndarray) -> np.ndarray:
    """A DT_STRING tensor (bytes objects) as an array of ``str``."""
    return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(values).astype(str)
