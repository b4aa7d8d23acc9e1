"""The gRPC proxy: a raw-bytes passthrough for every unary method, with
Predict responses handed to the pipeline, and a health service that follows
the upstream.

Requests are forwarded unparsed (only the ModelSpec is peeked at, to route and
label). Responses come back byte-identical unless a rule changed them. Upstream
status codes, details and trailing metadata reach the client unchanged; the
client's metadata and deadline reach the upstream.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from guard.control.config import Config, TLSConfig
from guard.control.files import file_identity
from guard.dataplane.book import RuleBook
from guard.dataplane.codec.request import peek_model_spec
from guard.dataplane.errors import GuardError
from guard.dataplane.pipeline import guard_predict_response
from guard.metrics.guard_metrics import GuardMetrics
from guard.server import tls
from guard.server.status import grpc_code

__all__ = ["GuardServer", "PREDICT"]

logger = logging.getLogger("guard.server.proxy")

PREDICT = "/tensorflow.serving.PredictionService/Predict"
_PROBE = "/tensorflow.serving.ModelService/GetModelStatus"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_HEALTH_SERVICES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")

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
_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_CAP_BACKSTOP_MARGIN = 64
_DRAIN_POLL_S = 0.02
_FINAL_GRACE_S = 0.5


def _forwardable(metadata: Sequence[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    if not metadata:
        return ()
    return tuple(
        (k, v) for k, v in metadata if k not in _HOP_HEADERS and not k.startswith((":", "grpc-"))
    )


def server_options(config: Config) -> list[tuple[str, Any]]:
    """Options for the listening gRPC server."""
    size = config.max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 1),
    ]


def channel_options(config: Config) -> list[tuple[str, Any]]:
    """Options for the channel to the upstream."""
    size = config.max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        # Reconnect within about a second of the upstream coming back, not
        # after gRPC's default back-off of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 0),
    ]


@dataclass
class _MethodInfo:
    name: str
    label: str
    spec_path: tuple[int, ...] | None


class _Upstream:
    """One channel to the upstream and its per-method callables. Replaced whole
    when the upstream's TLS files change, so no call mixes two channels."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self._calls: dict[str, Any] = {}

    def call(self, method: str) -> Any:
        """The raw-bytes callable for ``method`` (bounded cache: clients choose names)."""
        found = self._calls.get(method)
        if found is None:
            found = self.channel.unary_unary(method)
            if len(self._calls) < GuardServer._METHOD_CACHE_LIMIT:
                self._calls[method] = found
        return found


class GuardServer:
    """The guard's gRPC server. ``await start()``, then ``await stop(grace)``."""

    _METHOD_CACHE_LIMIT = 256

    def __init__(
        self,
        config: Config,
        metrics: GuardMetrics,
        server_credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        if config.upstream is None:
            raise ValueError("config.upstream must be set before the server starts")
        self.config = config
        self.metrics = metrics
        self._book = RuleBook(config.models, config.max_message_bytes)
        self._upstream = _Upstream(self._new_channel())
        self._tls_task: asyncio.Task[None] | None = None
        if server_credentials is None and config.tls is not None:
            server_credentials = tls.server_credentials(config.tls)
        self._server_credentials = server_credentials
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._upstream_up: bool | None = None
        self._inflight = 0
        self._cut_off: float | None = None  # the grace period, once it ran out
        self.metrics.track_inflight(lambda: self._inflight)
        self.port = 0

    def _new_channel(self) -> grpc.aio.Channel:
        assert self.config.upstream is not None
        options = channel_options(self.config)
        upstream_tls = self.config.upstream_tls
        if upstream_tls is None:
            return grpc.aio.insecure_channel(self.config.upstream, options)
        if upstream_tls.server_name:
            options.append(("grpc.ssl_target_name_override", upstream_tls.server_name))
        creds = tls.channel_credentials(upstream_tls)
        return grpc.aio.secure_channel(self.config.upstream, creds, options)

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> int:
        """Bind, start serving and start probing the upstream. Returns the bound port."""
        server = grpc.aio.server(
            options=server_options(self.config),
            # The handler enforces max_concurrent_rpcs itself, so refusals are
            # counted and explained; gRPC's own limit is only a backstop.
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs + _CAP_BACKSTOP_MARGIN,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server.add_generic_rpc_handlers((_ProxyHandler(self),))
        if self._server_credentials is not None:
            self.port = server.add_secure_port(self.config.listen, self._server_credentials)
        else:
            self.port = server.add_insecure_port(self.config.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.config.listen}")
        for service in _HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.upstream_up.set(0)
        await server.start()
        self._server = server
        await self._probe_once()
        self._probe_task = asyncio.create_task(self._probe_loop(), name="guard-upstream-probe")
        if self.config.upstream_tls is not None:
            self._tls_task = asyncio.create_task(
                self._watch_upstream_tls(self.config.upstream_tls), name="guard-upstream-tls"
            )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight calls finish within ``grace`` seconds, close."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for task in (self._probe_task, self._tls_task):
            if task is not None:
                task.cancel()
        for service in _HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        stopping = None
        if self._server is not None:
            # gRPC's shutdown closes the listener and sends GOAWAY, so clients open
            # a new connection (to another replica) for new calls; in-flight calls
            # go on.
            stopping = asyncio.ensure_future(self._server.stop(grace + _FINAL_GRACE_S))
        while self._inflight and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if self._inflight:
            # The grace period ran out. Ending the upstream calls lets each handler
            # tell its client why, before gRPC's bare "Cancelling all calls".
            self._cut_off = grace
            await self._upstream.channel.close()
        if self._server is not None and stopping is not None:
            # Every call the handler took is done, or ending. A call that raced the
            # shutdown can sit in grpc.aio, never handed to the handler, until the
            # shutdown's grace runs out (seen in 3 of 270 SIGTERM tests on a busy
            # machine). Cut that short: a second stop cancels what is left once
            # the answers being sent have gone.
            await self._server.stop(_FINAL_GRACE_S)
            await stopping
        await self._upstream.channel.close()

    async def wait_for_termination(self) -> None:
        """Block until the server stops."""
        assert self._server is not None
        await self._server.wait_for_termination()

    def swap_rules(self, config: Config) -> None:
        """Install a new rule set. Requests already running keep the one they started with."""
        # Names first: the new book's plans keep the model label they resolve.
        self.metrics.set_model_names(config.model_names())
        self._book = RuleBook(config.models, config.max_message_bytes)

    @property
    def rules(self) -> RuleBook:
        """The rule set new requests use."""
        return self._book

    async def _watch_upstream_tls(self, upstream_tls: TLSConfig, interval_s: float = 1.0) -> None:
        """Rebuild the upstream channel when its certificate files change."""
        paths = (upstream_tls.ca_file, upstream_tls.cert_file, upstream_tls.key_file)
        seen = file_identity(paths)
        while True:
            await asyncio.sleep(interval_s)
            now = file_identity(paths)
            if now == seen:
                continue
            try:
                channel = self._new_channel()
            except OSError as exc:  # a file mid-rotation: try again on the next tick
                logger.warning("upstream TLS files changed but cannot be read yet: %s", exc)
                continue
            seen = now
            old, self._upstream = self._upstream, _Upstream(channel)
            logger.info("upstream TLS files changed: reconnecting with the new certificates")
            # Calls already on the old channel finish (their deadline bounds them).
            asyncio.create_task(old.channel.close(grace=self.config.default_timeout_s))

    # ---------------------------------------------------------------- health

    async def _probe_once(self) -> None:
        timeout = max(self.config.health_check_interval_s, 0.5)
        try:
            await self._upstream.call(_PROBE)(b"", timeout=timeout)
            up = True
        except grpc.aio.AioRpcError as exc:
            # Any answer, even an error about the empty request, means it is up.
            up = exc.code() not in _UNAVAILABLE_CODES
        self._set_upstream_up(up)

    def _set_upstream_up(self, up: bool) -> None:
        if up == self._upstream_up:
            return
        self._upstream_up = up
        self.metrics.upstream_up.set(1 if up else 0)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if up
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in _HEALTH_SERVICES:
            # HealthServicer.set only touches dicts and wakes watchers; it never blocks.
            asyncio.ensure_future(self._health.set(service, status))
        logger.info("upstream %s is %s", self.config.upstream, "up" if up else "DOWN")

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval_s)
            try:
                await self._probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the probe die silently
                logger.exception("upstream probe failed")

    # ----------------------------------------------------------------- calls

    @staticmethod
    def method(name: str) -> _MethodInfo:
        """Per-method state (the handler that holds it is cached per method)."""
        return _MethodInfo(
            name=name, label=GuardMetrics.method_label(name), spec_path=_SPEC_PATH.get(name)
        )

    async def handle(self, info: _MethodInfo, request: bytes, context: Any) -> bytes:
        """Forward one unary call, guarding Predict responses."""
        start = time.perf_counter()
        upstream_s = 0.0
        code = "OK"  # counted when the call ends; "" once _fail has counted it
        metrics = self.metrics
        book = self._book  # one consistent rule set for the whole request
        spec = peek_model_spec(request, info.spec_path) if info.spec_path else None
        model_label = metrics.model_label(spec.name if spec else None)
        if self._inflight >= self.config.max_concurrent_rpcs:
            await self._fail(
                context,
                model_label,
                info.label,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"guard: {self._inflight} calls already in flight, the max_concurrent_rpcs "
                "limit; retry with backoff, or raise max_concurrent_rpcs in the guard config",
            )
        self._inflight += 1
        try:
            timeout = context.time_remaining()
            if timeout is None:
                timeout = self.config.default_timeout_s
            call = self._upstream.call(info.name)(
                request,
                timeout=timeout,
                metadata=_forwardable(context.invocation_metadata()),
            )
            t_up = time.perf_counter()
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as exc:
                upstream_s = time.perf_counter() - t_up
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    self._set_upstream_up(False)
                code = ""
                await self._fail(
                    context,
                    model_label,
                    info.label,
                    exc.code(),
                    _upstream_details(exc, self.config),
                    tuple(exc.trailing_metadata() or ()),
                )
            except asyncio.CancelledError:
                if self._cut_off is not None and call.cancelled():
                    # stop() closed the upstream channel: the grace period ran out.
                    code = ""
                    await self._fail(
                        context,
                        model_label,
                        info.label,
                        grpc.StatusCode.UNAVAILABLE,
                        "guard: shutting down, and the upstream had not answered when "
                        f"shutdown_grace_s ({self._cut_off:g} s) ran out; the call was "
                        "cancelled and may or may not have run. Retry it if it is idempotent",
                    )
                call.cancel()
                code = "CANCELLED"
                raise
            upstream_s = time.perf_counter() - t_up
            trailers = tuple(await call.trailing_metadata() or ())
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(initial)

            if info.name == PREDICT and book.may_apply(spec.name if spec else None):
                try:
                    guarded = guard_predict_response(response, spec, book, metrics)
                except GuardError as exc:
                    code = ""
                    await self._fail(
                        context,
                        model_label,
                        info.label,
                        grpc_code(exc),
                        exc.details,
                        trailers + (("x-guard-action", "rejected"),),
                    )
                except Exception:
                    # A bug of ours: log it here, and tell the client no internals.
                    logger.exception("guarding a %s response failed", info.label)
                    code = ""
                    await self._fail(
                        context,
                        model_label,
                        info.label,
                        grpc.StatusCode.INTERNAL,
                        "guard: internal error while guarding the response; see the guard's log",
                        trailers,
                    )
                if guarded is not None:
                    response = guarded.body
                    trailers += guarded.trailers()
            if trailers:
                context.set_trailing_metadata(trailers)
            return response
        finally:
            self._inflight -= 1
            if code:
                metrics.record_request(model_label, info.label, code)
            total = time.perf_counter() - start
            metrics.record_timing(info.label, upstream_s, max(total - upstream_s, 0.0))

    async def _fail(
        self,
        context: Any,
        model_label: str,
        method_label: str,
        status: grpc.StatusCode,
        details: str,
        trailers: tuple[tuple[str, Any], ...] = (),
    ) -> NoReturn:
        """Count the call, then end it with ``status``.

        Counted first: once the client has its answer, a scrape must see it.
        """
        self.metrics.record_request(model_label, method_label, status.name)
        await context.abort(status, details, trailers)
        raise AssertionError("context.abort() returned")  # it raises; for type checkers


def _upstream_details(exc: grpc.aio.AioRpcError, config: Config) -> str:
    details = exc.details() or ""
    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return (
            f"guard: the upstream's response is larger than max_message_mb="
            f"{config.max_message_mb} ({details}); raise max_message_mb in the guard config"
        )
    return details


class _ProxyHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Routes every method except the health service to :meth:`GuardServer.handle`."""

    def __init__(self, server: GuardServer) -> None:
        self._server = server
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if method.startswith(_HEALTH_PREFIX):
            return None
        handler = self._handlers.get(method)
        if handler is None:
            info = self._server.method(method)
            # No (de)serializers: the request and response stay bytes. A partial of
            # a coroutine function is still one, so grpc.aio awaits it on the loop.
            handler = grpc.unary_unary_rpc_method_handler(
                functools.partial(self._server.handle, info)
            )
            if len(self._handlers) < GuardServer._METHOD_CACHE_LIMIT:
                self._handlers[method] = handler
        return handler
