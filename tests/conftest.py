"""Shared fixtures: a fake TF Serving upstream built on the official stubs,
and the guard running in-process in front of it. Everything binds port 0."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

# Quieter TensorFlow in test output; the tests never need its C++ logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from guard.control.config import Config, parse_config  # noqa: E402
from guard.metrics.guard_metrics import GuardMetrics  # noqa: E402
from guard.server.proxy import GuardServer  # noqa: E402

ECHO_METHOD = "/custom.EchoService/Echo"

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


@dataclass
class Received:
    """What the fake upstream saw for one call."""

    method: str
    request: Any
    metadata: dict[str, str]
    time_remaining: float | None


@dataclass
class FakeUpstream:
    """A TF-Serving-like upstream with programmable answers."""

    address: str = ""
    predict: dict[str, Callable[[predict_pb2.PredictRequest], Any]] = field(default_factory=dict)
    raw_predict: dict[str, bytes] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    delay_s: float = 0.0

    def reply(self, model: str, response: predict_pb2.PredictResponse) -> None:
        """Answer Predict for ``model`` with ``response`` (filtered by output_filter)."""

        def answer(req: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
            out = predict_pb2.PredictResponse()
            out.CopyFrom(response)
            if req.output_filter:
                for key in list(out.outputs.keys()):
                    if key not in req.output_filter:
                        del out.outputs[key]
            return out

        self.predict[model] = answer

    def fail(self, model: str, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        """Answer Predict for ``model`` with an error."""
        self.predict[model] = lambda req: (code, details, tuple(trailers))


class _Servicer(
    prediction_service_pb2_grpc.PredictionServiceServicer,
    model_service_pb2_grpc.ModelServiceServicer,
):
    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake

    def _note(self, method: str, request: Any, context: Any) -> None:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.fake.received.append(Received(method, request, md, context.time_remaining()))

    async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802 - proto name
        self._note("Predict", request, context)
        if self.fake.delay_s:
            await asyncio.sleep(self.fake.delay_s)
        handler = self.fake.predict.get(request.model_spec.name)
        if handler is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({request.model_spec.name})",
            )
        result = handler(request)
        if isinstance(result, tuple):
            code, details, trailers = result
            await context.abort(code, details, trailers)
        context.set_trailing_metadata((("x-upstream", "tfs"),))
        return result

    async def Classify(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._note("Classify", request, context)
        resp = classification_pb2.ClassificationResponse()
        resp.model_spec.name = request.model_spec.name
        c = resp.result.classifications.add().classes.add()
        c.label, c.score = "yes", 1.7  # a score outside [0, 1] must pass untouched
        return resp

    async def GetModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._note("GetModelMetadata", request, context)
        from tensorflow_serving.apis import get_model_metadata_pb2 as gmm

        resp = gmm.GetModelMetadataResponse()
        resp.model_spec.name = request.model_spec.name
        resp.model_spec.version.value = 1
        sigmap = gmm.SignatureDefMap()
        sig = sigmap.signature_def["serving_default"]
        sig.method_name = "tensorflow/serving/predict"
        sig.inputs["x"].name = "serving_default_x:0"
        sig.inputs["x"].dtype = types_pb2.DT_FLOAT
        sig.outputs["probs"].name = "StatefulPartitionedCall:0"
        sig.outputs["probs"].dtype = types_pb2.DT_FLOAT
        sig.outputs["ids"].name = "StatefulPartitionedCall:1"
        sig.outputs["ids"].dtype = types_pb2.DT_INT64
        resp.metadata["signature_def"].Pack(sigmap)
        return resp

    async def GetModelStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._note("GetModelStatus", request, context)
        if not request.model_spec.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Missing model name")
        resp = get_model_status_pb2.GetModelStatusResponse()
        v = resp.model_version_status.add()
        v.version = 1
        v.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return resp


class _RawHandler(grpc.GenericRpcHandler):
    """An extra unary method (echo), and raw-bytes Predict answers for bad-bytes tests."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake

    def service(self, details: Any) -> Any:
        if details.method == ECHO_METHOD:

            async def echo(request: bytes, context: Any) -> bytes:
                context.set_trailing_metadata((("x-echo", "1"),))
                return request[::-1]

            return grpc.unary_unary_rpc_method_handler(echo)
        return None


async def start_upstream(fake: FakeUpstream) -> grpc.aio.Server:
    """Start the fake upstream on a free loopback port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 512 * 1024 * 1024),
            ("grpc.max_send_message_length", 512 * 1024 * 1024),
        ]
    )
    servicer = _Servicer(fake)
    if fake.raw_predict:
        raw = fake.raw_predict

        class _RawPredict(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                if details.method != "/tensorflow.serving.PredictionService/Predict":
                    return None

                async def predict(request: bytes, context: Any) -> bytes:
                    model = predict_pb2.PredictRequest.FromString(request).model_spec.name
                    return raw[model]

                return grpc.unary_unary_rpc_method_handler(predict)

        server.add_generic_rpc_handlers((_RawPredict(),))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_RawHandler(fake),))
    port = server.add_insecure_port(fake.address or "127.0.0.1:0")
    fake.address = f"127.0.0.1:{port}"
    await server.start()
    return server


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A running fake upstream; configure answers with ``.reply``/``.fail``."""
    fake = FakeUpstream()
    server = await start_upstream(fake)
    yield fake
    await server.stop(0)


@dataclass
class RunningGuard:
    """The guard running in-process, with its own registry and /metrics endpoint."""

    server: GuardServer
    address: str
    registry: CollectorRegistry
    metrics_url: str
    channel: grpc.aio.Channel

    @property
    def stub(self) -> prediction_service_pb2_grpc.PredictionServiceStub:
        """The official PredictionService stub, pointed at the guard."""
        return prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    @property
    def model_stub(self) -> model_service_pb2_grpc.ModelServiceStub:
        """The official ModelService stub, pointed at the guard."""
        return model_service_pb2_grpc.ModelServiceStub(self.channel)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value, read from the HTTP /metrics endpoint (not the registry)."""
        for family in scrape(self.metrics_url):
            for s in family.samples:
                if s.name == name and (labels is None or s.labels == labels):
                    return float(s.value)
        return None


def scrape(url: str) -> list[Any]:
    """Parse Prometheus text from ``url``."""
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
        return list(text_string_to_metric_families(r.read().decode()))


GuardFactory = Callable[..., Awaitable[RunningGuard]]


@pytest.fixture
async def make_guard(upstream: FakeUpstream) -> AsyncIterator[GuardFactory]:
    """Start guards in front of ``upstream``: ``await make_guard(yaml_text_or_dict)``."""
    started: list[tuple[RunningGuard, Any]] = []

    async def factory(config: str | dict[str, Any] | Config = "", **overrides: Any) -> RunningGuard:
        if isinstance(config, Config):
            cfg = config
        else:
            data = yaml.safe_load(config) if isinstance(config, str) else dict(config)
            data = data or {}
            data.setdefault("upstream", upstream.address)
            data.setdefault("listen", "127.0.0.1:0")
            data.setdefault("health_check_interval_s", 0.2)
            data.update(overrides)
            cfg = parse_config(data, source="test.yaml", base_dir=Path.cwd())
        registry = CollectorRegistry()
        metrics = GuardMetrics(registry, cfg.model_names(), cfg.max_class_label_values)
        httpd, _ = start_http_server(0, "127.0.0.1", registry=registry)
        server = GuardServer(cfg, metrics)
        port = await server.start()
        address = f"127.0.0.1:{port}"
        channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 512 * 1024 * 1024)]
        )
        running = RunningGuard(
            server, address, registry, f"http://127.0.0.1:{httpd.server_port}/metrics", channel
        )
        started.append((running, httpd))
        return running

    yield factory
    for running, httpd in started:
        await running.channel.close()
        await running.server.stop(0)
        httpd.shutdown()
        httpd.server_close()


__all__ = [
    "ECHO_METHOD",
    "FakeUpstream",
    "RunningGuard",
    "content_tensor",
    "get_model_metadata_pb2",
    "predict_request",
    "predict_response",
    "scrape",
    "typed_tensor",
]
