"""Tensors and messages built with TensorFlow Serving's own classes."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

# Quieter TensorFlow in test output; the tests never need its C++ logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import predict_pb2  # noqa: E402

__all__ = ["content_tensor", "predict_request", "predict_response", "typed_tensor"]

_NP_TO_DT = {
    np.dtype("float32"): types_pb2.DT_FLOAT,
    np.dtype("float64"): types_pb2.DT_DOUBLE,
    np.dtype("float16"): types_pb2.DT_HALF,
    np.dtype("int64"): types_pb2.DT_INT64,
    np.dtype("int32"): types_pb2.DT_INT32,
}


def typed_tensor(array: np.ndarray[Any, Any]) -> tensor_pb2.TensorProto:
    """A TensorProto in TF Serving's default encoding: typed, packed ``*_val``."""
    t = tensor_pb2.TensorProto(dtype=_NP_TO_DT[array.dtype])
    t.tensor_shape.CopyFrom(
        tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in array.shape]
        )
    )
    flat = array.ravel()
    if array.dtype == np.float32:
        t.float_val.extend(flat.tolist())
    elif array.dtype == np.float64:
        t.double_val.extend(flat.tolist())
    elif array.dtype == np.float16:
        t.half_val.extend(flat.view(np.uint16).tolist())
    elif array.dtype == np.int64:
        t.int64_val.extend(flat.tolist())
    elif array.dtype == np.int32:
        t.int_val.extend(flat.tolist())
    else:  # pragma: no cover - a test bug
        raise TypeError(array.dtype)
    return t


def content_tensor(array: np.ndarray[Any, Any]) -> tensor_pb2.TensorProto:
    """A TensorProto carrying its values in ``tensor_content``."""
    t = tensor_pb2.TensorProto(dtype=_NP_TO_DT[array.dtype])
    for s in array.shape:
        t.tensor_shape.dim.add(size=s)
    t.tensor_content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return t


def predict_response(
    model: str,
    outputs: dict[str, np.ndarray[Any, Any]],
    *,
    version: int = 1,
    signature: str = "serving_default",
    encoding: str = "typed",
) -> predict_pb2.PredictResponse:
    """A PredictResponse as TF Serving builds it (model_spec filled)."""
    resp = predict_pb2.PredictResponse()
    resp.model_spec.name = model
    resp.model_spec.version.value = version
    resp.model_spec.signature_name = signature
    make = typed_tensor if encoding == "typed" else content_tensor
    for name, array in outputs.items():
        resp.outputs[name].CopyFrom(make(array))
    return resp


def predict_request(model: str, signature: str = "", **inputs: Any) -> predict_pb2.PredictRequest:
    """A PredictRequest with optional float inputs."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    for name, value in inputs.items():
        req.inputs[name].CopyFrom(typed_tensor(np.asarray(value, dtype=np.float32)))
    return req
