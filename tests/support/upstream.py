"""A fake TF Serving upstream, in-process, built on the official stubs.

It answers Predict per model (a response, raw bytes, or an error), records
every call it sees, and can hold or delay Predicts to put load on the guard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from tensorflow.core.framework import types_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
)

from tests.support import protos  # noqa: F401 - quiets TensorFlow before its import

__all__ = ["ECHO_METHOD", "PREDICT", "FakeUpstream", "Received", "start_upstream"]

PREDICT = "/tensorflow.serving.PredictionService/Predict"
ECHO_METHOD = "/custom.EchoService/Echo"
MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", 1024 * 1024 * 1024),
    ("grpc.max_send_message_length", 1024 * 1024 * 1024),
]

Answer = Callable[[predict_pb2.PredictRequest], Any]
"""A PredictResponse, raw bytes, or ``(code, details, trailers)`` for an error."""


@dataclass
class Received:
    """What the fake upstream saw for one call."""

    method: str
    request: Any
    metadata: dict[str, str]
    time_remaining: float | None


@dataclass
class FakeUpstream:
    """A TF-Serving-like upstream with programmable answers that records every call.

    ``gate``, when set, holds every Predict until it is opened; ``delay_s``
    delays every Predict; ``only`` limits both to one model name.
    """

    address: str = ""
    answers: dict[str, Answer] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    delay_s: float = 0.0
    gate: asyncio.Event | None = None
    only: str | None = None
    started: int = 0
    finished: int = 0
    cancelled: int = 0
    active: int = 0
    peak: int = 0
    server: grpc.aio.Server | None = None

    @property
    def time_remaining(self) -> list[float | None]:
        """Each Predict's deadline as the upstream saw it."""
        return [r.time_remaining for r in self.received if r.method == "Predict"]

    def reply(self, model: str, response: predict_pb2.PredictResponse | bytes) -> None:
        """Answer Predict for ``model`` with ``response`` (filtered by output_filter)."""

        def answer(req: predict_pb2.PredictRequest) -> Any:
            if isinstance(response, bytes) or not req.output_filter:
                return response
            out = predict_pb2.PredictResponse()
            out.CopyFrom(response)
            for key in list(out.outputs.keys()):
                if key not in req.output_filter:
                    del out.outputs[key]
            return out

        self.answers[model] = answer

    def fail(
        self,
        model: str,
        code: grpc.StatusCode,
        details: str,
        trailers: Any = (),
        initial: Any = (),
    ) -> None:
        """Answer Predict for ``model`` with an error (after ``initial`` metadata)."""
        self.answers[model] = lambda req: (code, details, tuple(trailers), tuple(initial))

    async def wait_for(self, what: str, n: int, bound_s: float = 10.0) -> None:
        """Wait (bounded) until ``self.<what>`` reaches ``n``."""
        for _ in range(int(bound_s / 0.01)):
            if getattr(self, what) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"upstream {what}={getattr(self, what)}, expected >= {n}")

    def note(self, method: str, request: Any, context: Any) -> None:
        """Record one call."""
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.received.append(Received(method, request, md, context.time_remaining()))

    async def predict(self, request: predict_pb2.PredictRequest, context: Any) -> Any:
        self.note("Predict", request, context)
        self.started += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self._hold(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
        answer = self.answers.get(request.model_spec.name)
        if answer is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({request.model_spec.name})",
            )
            raise AssertionError("abort() returned")  # it raises; for type checkers
        self.finished += 1
        result = answer(request)
        if isinstance(result, tuple):
            code, details, trailers, initial = result
            if initial:
                await context.send_initial_metadata(initial)
            await context.abort(code, details, trailers)
        context.set_trailing_metadata((("x-upstream", "tfs"),))
        return result

    async def _hold(self, request: predict_pb2.PredictRequest) -> None:
        if self.only is not None and request.model_spec.name != self.only:
            return
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)


class _Handler(grpc.GenericRpcHandler):
    """Predict (a response may be raw bytes), the other TF Serving methods the
    tests call, and an extra unary method (echo)."""

    def __init__(self, fake: FakeUpstream) -> None:
        self._handlers = {
            PREDICT: grpc.unary_unary_rpc_method_handler(
                fake.predict,
                request_deserializer=predict_pb2.PredictRequest.FromString,
                response_serializer=lambda r: r if isinstance(r, bytes) else r.SerializeToString(),
            ),
            ECHO_METHOD: grpc.unary_unary_rpc_method_handler(_echo),
        }

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(details.method)


async def _echo(request: bytes, context: Any) -> bytes:
    context.set_trailing_metadata((("x-echo", "1"),))
    return request[::-1]


class _Services(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake

    async def Classify(self, request: Any, context: Any) -> Any:  # noqa: N802 - proto name
        self.fake.note("Classify", request, context)
        resp = classification_pb2.ClassificationResponse()
        resp.model_spec.name = request.model_spec.name
        c = resp.result.classifications.add().classes.add()
        c.label, c.score = "yes", 1.7  # a score outside [0, 1] must pass untouched
        return resp

    async def GetModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.fake.note("GetModelMetadata", request, context)
        gmm = get_model_metadata_pb2
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
        self.fake.note("GetModelStatus", request, context)
        if not request.model_spec.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Missing model name")
        resp = get_model_status_pb2.GetModelStatusResponse()
        v = resp.model_version_status.add()
        v.version = 1
        v.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return resp


def _prediction_service(services: _Services) -> grpc.GenericRpcHandler:
    """PredictionService's other methods (Predict is :class:`_Handler`'s)."""

    def unary(method: str, request_type: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            getattr(services, method),
            request_deserializer=request_type.FromString,
            response_serializer=lambda r: r.SerializeToString(),
        )

    return grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService",
        {
            "Classify": unary("Classify", classification_pb2.ClassificationRequest),
            "GetModelMetadata": unary(
                "GetModelMetadata", get_model_metadata_pb2.GetModelMetadataRequest
            ),
        },
    )


async def start_upstream(
    fake: FakeUpstream,
    credentials: grpc.ServerCredentials | None = None,
    address: str = "127.0.0.1:0",
) -> FakeUpstream:
    """Start ``fake`` on loopback (optionally with TLS); sets ``.address`` and ``.server``."""
    server = grpc.aio.server(options=MESSAGE_OPTIONS)
    services = _Services(fake)
    server.add_generic_rpc_handlers((_Handler(fake), _prediction_service(services)))
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(services, server)
    address = fake.address or address
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    fake.address = f"127.0.0.1:{port}"
    fake.server = server
    await server.start()
    return fake
