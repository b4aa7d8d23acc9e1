"""One proxied call: forward the request bytes, guard a Predict response,
return the upstream's answer, and count what the client saw."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc

from guard.control.config import Config
from guard.dataplane.book import RuleBook
from guard.dataplane.cache import BoundedCache
from guard.dataplane.codec.request import peek_model_spec
from guard.dataplane.codec.response import ModelSpecInfo
from guard.dataplane.errors import GuardError
from guard.dataplane.pipeline import guard_predict_response
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.status import grpc_code
from guard.server.upstream import Upstream

__all__ = ["PREDICT", "CallHandler", "ProxyHandler"]

logger = logging.getLogger("guard.proxy")

PREDICT = "/tensorflow.serving.PredictionService/Predict"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"

# Where each method's request keeps its ModelSpec (field-number path).
_SPEC_PATH: dict[str, tuple[int, ...]] = {
    "/tensorflow.serving.PredictionService/Predict": (1,),
    "/tensorflow.serving.PredictionService/Classify": (1,),
    "/tensorflow.serving.PredictionService/Regress": (1,),
    "/tensorflow.serving.PredictionService/GetModelMetadata": (1,),
    "/tensorflow.serving.PredictionService/MultiInference": (1, 1),
    "/tensorflow.serving.ModelService/GetModelStatus": (1,),
}

# Metadata that belongs to one HTTP/2 hop and must not be forwarded.
_HOP_HEADERS = frozenset({"user-agent", "te", "content-type", "host", "grpc-timeout"})
_METHODS_MAX = 256
_METHOD_NAME_MAX_BYTES = 1024

Metadata = tuple[tuple[str, Any], ...]


def _forwardable(metadata: Sequence[tuple[str, Any]] | None) -> Metadata:
    if not metadata:
        return ()
    return tuple(
        (k, v) for k, v in metadata if k not in _HOP_HEADERS and not k.startswith((":", "grpc-"))
    )


@dataclass(frozen=True)
class MethodInfo:
    """Per-method state (the handler that holds it is cached per method)."""

    name: str
    label: str
    spec_path: tuple[int, ...] | None


class ServerState(Protocol):
    """What a call needs of the server that runs it."""

    config: Config
    metrics: GuardMetrics
    upstream: Upstream
    inflight: int
    cut_off: float | None
    """The grace period, once a shutdown's ran out (``None`` until then)."""

    @property
    def rules(self) -> RuleBook: ...


class _Call:
    """One call's bookkeeping: its labels, and the code it ended with, counted once."""

    __slots__ = ("model_label", "method_label", "code", "upstream_s", "_metrics")

    def __init__(self, metrics: GuardMetrics, model_label: str, method_label: str) -> None:
        self._metrics = metrics
        self.model_label = model_label
        self.method_label = method_label
        self.code: str | None = None
        self.upstream_s = 0.0

    def count(self, code: str) -> None:
        """Count the call with ``code``, once: the first code wins."""
        if self.code is None:
            self.code = code
            self._metrics.record_request(self.model_label, self.method_label, code)

    async def fail(
        self,
        context: Any,
        status: grpc.StatusCode,
        details: str,
        trailers: Metadata = (),
    ) -> NoReturn:
        """Count the call, then end it with ``status``.

        Counted first: once the client has its answer, a scrape must see it.
        """
        self.count(status.name)
        await context.abort(status, details, trailers)
        raise AssertionError("context.abort() returned")  # it raises; for type checkers


class CallHandler:
    """Forwards calls to the upstream, guarding Predict responses."""

    def __init__(self, server: ServerState) -> None:
        self._server = server

    async def handle(self, info: MethodInfo, request: bytes, context: Any) -> bytes:
        """Forward one unary call."""
        server = self._server
        start = time.perf_counter()
        book = server.rules  # one consistent rule set for the whole request
        spec = peek_model_spec(request, info.spec_path) if info.spec_path else None
        call = _Call(
            server.metrics, server.metrics.model_label(spec.name if spec else None), info.label
        )
        if server.inflight >= server.config.max_concurrent_rpcs:
            await call.fail(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"guard: {server.inflight} calls already in flight, the max_concurrent_rpcs "
                "limit; retry with backoff, or raise max_concurrent_rpcs in the guard config",
            )
        server.inflight += 1
        try:
            response, trailers = await self._forward(info, request, context, call)
            if info.name == PREDICT and book.may_apply(spec.name if spec else None):
                response, trailers = await self._guard(
                    response, trailers, spec, book, context, call
                )
            if trailers:
                context.set_trailing_metadata(trailers)
            call.count("OK")
            return response
        except asyncio.CancelledError:
            call.count("CANCELLED")
            raise
        finally:
            server.inflight -= 1
            call.count("UNKNOWN")  # an exception of ours escaped: gRPC answers UNKNOWN
            total = time.perf_counter() - start
            server.metrics.record_timing(
                info.label, call.upstream_s, max(total - call.upstream_s, 0.0)
            )

    async def _forward(
        self, info: MethodInfo, request: bytes, context: Any, call: _Call
    ) -> tuple[bytes, Metadata]:
        """The upstream's answer and trailers (its initial metadata is sent on)."""
        server = self._server
        timeout = context.time_remaining()
        if timeout is None:
            timeout = server.config.default_timeout_s
        upstream_call = server.upstream.unary(info.name)(
            request, timeout=timeout, metadata=_forwardable(context.invocation_metadata())
        )
        t_up = time.perf_counter()
        try:
            response: bytes = await upstream_call
        except grpc.aio.AioRpcError as exc:
            call.upstream_s = time.perf_counter() - t_up
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                server.upstream.set_up(False)
            await call.fail(
                context, exc.code(), _upstream_details(exc, server.config),
                tuple(exc.trailing_metadata() or ()),
            )  # fmt: skip
        except asyncio.CancelledError:
            await self._cancelled(upstream_call, context, call)
            raise
        call.upstream_s = time.perf_counter() - t_up
        trailers = tuple(await upstream_call.trailing_metadata() or ())
        initial = await upstream_call.initial_metadata()
        if initial:
            await context.send_initial_metadata(initial)
        return response, trailers

    async def _cancelled(self, upstream_call: Any, context: Any, call: _Call) -> None:
        cut_off = self._server.cut_off
        if cut_off is not None and upstream_call.cancelled():
            # stop() closed the upstream channel: the grace period ran out.
            await call.fail(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "guard: shutting down, and the upstream had not answered when "
                f"shutdown_grace_s ({cut_off:g} s) ran out; the call was "
                "cancelled and may or may not have run. Retry it if it is idempotent",
            )
        upstream_call.cancel()
        call.count("CANCELLED")

    async def _guard(
        self,
        response: bytes,
        trailers: Metadata,
        spec: ModelSpecInfo | None,
        book: RuleBook,
        context: Any,
        call: _Call,
    ) -> tuple[bytes, Metadata]:
        try:
            guarded = guard_predict_response(response, spec, book, self._server.metrics)
        except GuardError as exc:
            await call.fail(
                context, grpc_code(exc), exc.details, trailers + (("x-guard-action", "rejected"),)
            )
        except Exception:
            # A bug of ours: log it here, and tell the client no internals.
            logger.exception("guarding a %s response failed", call.method_label)
            await call.fail(
                context,
                grpc.StatusCode.INTERNAL,
                "guard: internal error while guarding the response; see the guard's log",
                trailers,
            )
        if guarded is None:
            return response, trailers
        return guarded.body, trailers + guarded.trailers()


def _upstream_details(exc: grpc.aio.AioRpcError, config: Config) -> str:
    details = exc.details() or ""
    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return (
            f"guard: the upstream's response is larger than max_message_mb="
            f"{config.max_message_mb} ({details}); raise max_message_mb in the guard config"
        )
    return details


class ProxyHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Routes every method except the health service to :meth:`CallHandler.handle`."""

    def __init__(self, calls: CallHandler, method_label: Callable[[str], str]) -> None:
        self._calls = calls
        self._method_label = method_label
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
        info = MethodInfo(method, self._method_label(method), _SPEC_PATH.get(method))
        # No (de)serializers: the request and response stay bytes. A partial of
        # a coroutine function is still one, so grpc.aio awaits it on the loop.
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._calls.handle, info))
