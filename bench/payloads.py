"""Canned TF Serving payloads, built with the official message classes.

Importing ``tensorflow_serving.apis.predict_pb2`` normally executes
``tensorflow/__init__.py`` and pulls in the whole TensorFlow runtime (seconds and
hundreds of MB). The generated ``*_pb2`` modules themselves only need protobuf, so
:func:`official_protos` loads them under a bare ``tensorflow`` package object
that skips the runtime. The message classes are the official ones, byte for byte;
only the unrelated TensorFlow runtime is left out. Bench processes never import
the TensorFlow runtime afterwards, so the placeholder cannot shadow anything.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
import types
from dataclasses import dataclass
from typing import Any

import numpy as np

PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
METADATA_METHOD = "/tensorflow.serving.PredictionService/GetModelMetadata"
STATUS_METHOD = "/tensorflow.serving.ModelService/GetModelStatus"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"

ENCODINGS = ("float_val", "tensor_content")


def official_protos() -> types.SimpleNamespace:
    """Return the official TF Serving / TF protobuf modules without the TF runtime."""
    if "tensorflow" not in sys.modules:
        spec = importlib.util.find_spec("tensorflow")
        if spec is None or spec.submodule_search_locations is None:
            raise RuntimeError("the tensorflow package (for its .proto modules) is not installed")
        placeholder = types.ModuleType("tensorflow")
        placeholder.__path__ = list(spec.submodule_search_locations)
        sys.modules["tensorflow"] = placeholder
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_pb2,
        predict_pb2,
    )

    return types.SimpleNamespace(
        tensor_pb2=tensor_pb2,
        tensor_shape_pb2=tensor_shape_pb2,
        types_pb2=types_pb2,
        meta_graph_pb2=meta_graph_pb2,
        get_model_metadata_pb2=get_model_metadata_pb2,
        get_model_status_pb2=get_model_status_pb2,
        model_pb2=model_pb2,
        predict_pb2=predict_pb2,
    )


@dataclass(frozen=True)
class CannedModel:
    """What the canned upstream pretends to serve."""

    name: str = "softmax_201"
    version: int = 1
    signature: str = "serving_default"
    input_name: str = "input"
    output_name: str = "probabilities"
    batch: int = 8
    features: int = 16
    classes: int = 201
    encoding: str = "float_val"
    seed: int = 201
    values: str = "softmax"
    """``softmax`` rows, or ``uniform`` values in [0, 1) (a sigmoid output's)."""
    above: float = 0.0
    """The fraction of values set above 1.0 (a model whose probabilities overshoot)."""


def softmax_rows(batch: int, classes: int, seed: int) -> np.ndarray:
    """Return ``batch`` float32 rows that are a softmax over ``classes`` (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(batch, classes))
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def float_tensor(pb: types.SimpleNamespace, array: np.ndarray, encoding: str) -> Any:
    """Build an official DT_FLOAT ``TensorProto`` in the given encoding."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, not {encoding!r}")
    tensor = pb.tensor_pb2.TensorProto(dtype=pb.types_pb2.DT_FLOAT)
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)
    flat = np.ascontiguousarray(array, dtype=np.float32).ravel()
    if encoding == "tensor_content":
        tensor.tensor_content = flat.tobytes()
    else:
        # TF Serving's default: typed, packed float_val.
        tensor.float_val.extend(flat.tolist())
    return tensor


def predict_request(model: CannedModel) -> bytes:
    """Serialized ``PredictRequest`` for ``model`` (random float input)."""
    pb = official_protos()
    request = pb.predict_pb2.PredictRequest()
    request.model_spec.name = model.name
    request.model_spec.signature_name = model.signature
    rng = np.random.default_rng(model.seed + 1)
    features = rng.normal(size=(model.batch, model.features)).astype(np.float32)
    request.inputs[model.input_name].CopyFrom(float_tensor(pb, features, "float_val"))
    return bytes(request.SerializeToString())


def predict_response_for(
    model: CannedModel, values: np.ndarray, encoding: str | None = None
) -> bytes:
    """Serialized ``PredictResponse`` carrying ``values`` as the model's output."""
    pb = official_protos()
    response = pb.predict_pb2.PredictResponse()
    response.model_spec.name = model.name
    response.model_spec.version.value = model.version
    response.model_spec.signature_name = model.signature
    response.outputs[model.output_name].CopyFrom(
        float_tensor(pb, values, encoding or model.encoding)
    )
    return bytes(response.SerializeToString())


def model_values(model: CannedModel) -> np.ndarray:
    """The canned output: softmax rows or uniform values, ``above`` of them past 1.0."""
    if model.values == "uniform":
        rng = np.random.default_rng(model.seed)
        values = rng.uniform(0.0, 1.0, (model.batch, model.classes)).astype(np.float32)
    else:
        values = softmax_rows(model.batch, model.classes, model.seed)
    count = round(model.above * values.size)
    if count:
        rng = np.random.default_rng(model.seed + 2)
        flat = values.reshape(-1)
        flat[rng.choice(flat.size, count, replace=False)] = rng.uniform(1.001, 1.1, count)
    return values


def predict_response(model: CannedModel) -> bytes:
    """Serialized canned ``PredictResponse``, TF Serving style (:func:`model_values`)."""
    return predict_response_for(model, model_values(model))


def model_metadata_response(model: CannedModel) -> bytes:
    """Serialized ``GetModelMetadataResponse`` with the model's signature_def."""
    pb = official_protos()
    sig_map = pb.get_model_metadata_pb2.SignatureDefMap()
    sig = sig_map.signature_def[model.signature]
    sig.method_name = "tensorflow/serving/predict"
    for alias, width in ((model.input_name, model.features), (model.output_name, model.classes)):
        info = (sig.inputs if alias == model.input_name else sig.outputs)[alias]
        info.name = f"{alias}:0"
        info.dtype = pb.types_pb2.DT_FLOAT
        info.tensor_shape.dim.add(size=-1)
        info.tensor_shape.dim.add(size=width)
    response = pb.get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = model.name
    response.model_spec.version.value = model.version
    response.metadata["signature_def"].Pack(sig_map)
    return bytes(response.SerializeToString())


def model_status_response(model: CannedModel) -> bytes:
    """Serialized ``GetModelStatusResponse``: one AVAILABLE version."""
    pb = official_protos()
    response = pb.get_model_status_pb2.GetModelStatusResponse()
    status = response.model_version_status.add()
    status.version = model.version
    status.state = pb.get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return bytes(response.SerializeToString())


def grpc_frame(message: bytes) -> bytes:
    """Prefix ``message`` with gRPC's 5-byte length-prefixed-message header."""
    return struct.pack(">BI", 0, len(message)) + message


def labels(classes: int) -> list[str]:
    """Readable class labels for a canned ``classes``-way classifier."""
    return [f"class_{i:03d}" for i in range(classes)]
