"""Which methods the guard knows, and how each is routed.

TF Serving's own methods are unary: they take the unary path, where the
request is read and its ModelSpec peeked at. Every other method (any service
behind the upstream) is relayed as a stream both ways. The health service is
the guard's own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from guard.dataplane.cache import BoundedCache
from guard.metrics.guard_metrics import OTHER

__all__ = ["PREDICT", "Handler", "MethodInfo", "ProxyHandler", "method_label"]

PREDICT = "/tensorflow.serving.PredictionService/Predict"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"

# TF Serving's unary methods, and where each request keeps its ModelSpec
# (field-number path; None: it has none).
_UNARY: dict[str, tuple[int, ...] | None] = {
    "/tensorflow.serving.PredictionService/Predict": (1,),
    "/tensorflow.serving.PredictionService/Classify": (1,),
    "/tensorflow.serving.PredictionService/Regress": (1,),
    "/tensorflow.serving.PredictionService/GetModelMetadata": (1,),
    "/tensorflow.serving.PredictionService/MultiInference": (1, 1),
    "/tensorflow.serving.ModelService/GetModelStatus": (1,),
    "/tensorflow.serving.ModelService/HandleReloadConfigRequest": None,
}
_METHODS_MAX = 256
_METHOD_NAME_MAX_BYTES = 1024


def method_label(method: str) -> str:
    """The ``method`` label: the short name of a TF Serving method, else ``__other__``."""
    if method in _UNARY:
        return method.rsplit("/", 1)[-1]
    return OTHER


@dataclass(frozen=True)
class MethodInfo:
    """Per-method state (the handler that holds it is cached per method)."""

    name: str
    label: str
    spec_path: tuple[int, ...] | None


Handler = Callable[[MethodInfo, Any, Any], Any]


class ProxyHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Routes TF Serving's unary methods to ``unary`` and every other method
    (except the health service) to ``stream``. No (de)serializers: messages
    stay bytes."""

    def __init__(self, unary: Handler, stream: Handler) -> None:
        self._unary = unary
        self._stream = stream
        self._handlers: BoundedCache[str, grpc.RpcMethodHandler] = BoundedCache(
            _METHODS_MAX, max_key_bytes=_METHOD_NAME_MAX_BYTES, weigh=len
        )

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if method.startswith(_HEALTH_PREFIX):
            return None
        return self._handlers.get_or_make(method, self._make, method)

    def _make(self, method: str) -> grpc.RpcMethodHandler:
        info = MethodInfo(method, method_label(method), _UNARY.get(method))
        # A partial of a coroutine function is still one, so grpc.aio awaits
        # it on the loop. Both are streaming handlers, entered when the call's
        # headers arrive: the guard reads the request itself.
        if method in _UNARY:
            return grpc.stream_unary_rpc_method_handler(functools.partial(self._unary, info))
        return grpc.stream_stream_rpc_method_handler(functools.partial(self._stream, info))
