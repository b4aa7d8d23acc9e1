"""The guard's gRPC server: a raw-bytes proxy for every method, with Predict
responses guarded, a health service that follows the upstream, and a drain
on shutdown.

Requests are forwarded unparsed (only the ModelSpec is peeked at, to route and
label). Responses come back byte-identical unless a rule changed them. Upstream
status codes, details and trailing metadata reach the client unchanged; the
client's metadata and deadline reach the upstream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from guard.control.config import Config
from guard.dataplane.book import RuleBook
from guard.metrics.guard_metrics import GuardMetrics
from guard.server import tls
from guard.server.handler import PREDICT, CallHandler, ProxyHandler
from guard.server.upstream import Upstream

__all__ = ["PREDICT", "GuardServer", "server_options"]

logger = logging.getLogger("guard.proxy")

_HEALTH_SERVICES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
_CAP_BACKSTOP_MARGIN = 64
_DRAIN_POLL_S = 0.02
_FINAL_GRACE_S = 0.5


def server_options(config: Config) -> list[tuple[str, Any]]:
    """Options for the listening gRPC server."""
    size = config.max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 1),
    ]


class GuardServer:
    """The guard's gRPC server. ``await start()``, then ``await stop(grace)``."""

    def __init__(
        self,
        config: Config,
        metrics: GuardMetrics,
        server_credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._book = RuleBook(config.models, config.max_message_bytes)
        self.upstream = Upstream(config, self._upstream_state)
        if server_credentials is None and config.tls is not None:
            server_credentials = tls.server_credentials(config.tls)
        self._server_credentials = server_credentials
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.inflight = 0
        self.cut_off: float | None = None
        """The grace period, once a shutdown's ran out (calls still waiting are cut off)."""
        self.metrics.track_inflight(lambda: self.inflight)
        self.port = 0

    @property
    def rules(self) -> RuleBook:
        """The rule set new requests use."""
        return self._book

    def swap_rules(self, config: Config) -> None:
        """Install a new rule set. Requests already running keep the one they started with."""
        # Names first: the new book's plans keep the model label they resolve.
        self.metrics.set_model_names(config.model_names())
        self._book = RuleBook(config.models, config.max_message_bytes)

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
        server.add_generic_rpc_handlers(
            (ProxyHandler(CallHandler(self), GuardMetrics.method_label),)
        )
        if self._server_credentials is not None:
            self.port = server.add_secure_port(self.config.listen, self._server_credentials)
        else:
            self.port = server.add_insecure_port(self.config.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self._set_health(False)
        self.metrics.upstream_up.set(0)
        await server.start()
        self._server = server
        await self.upstream.start()
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight calls finish within ``grace`` seconds, close."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.upstream.stop_watching()
        await self._set_health(False)
        stopping = None
        if self._server is not None:
            # gRPC's shutdown closes the listener and sends GOAWAY, so clients open
            # a new connection (to another replica) for new calls; in-flight calls
            # go on.
            stopping = asyncio.ensure_future(self._server.stop(grace + _FINAL_GRACE_S))
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if self.inflight:
            # The grace period ran out. Ending the upstream calls lets each handler
            # tell its client why, before gRPC's bare "Cancelling all calls".
            self.cut_off = grace
            await self.upstream.close()
        if self._server is not None and stopping is not None:
            # Every call the handler took is done, or ending. A call that raced the
            # shutdown can sit in grpc.aio, never handed to the handler, until the
            # shutdown's grace runs out (seen in 3 of 270 SIGTERM tests on a busy
            # machine). Cut that short: a second stop cancels what is left once
            # the answers being sent have gone.
            await self._server.stop(_FINAL_GRACE_S)
            await stopping
        await self.upstream.close()

    async def wait_for_termination(self) -> None:
        """Block until the server stops."""
        assert self._server is not None
        await self._server.wait_for_termination()

    # ---------------------------------------------------------------- health

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in _HEALTH_SERVICES:
            await self._health.set(service, status)

    def _upstream_state(self, up: bool) -> None:
        self.metrics.upstream_up.set(1 if up else 0)
        # HealthServicer.set only touches dicts and wakes watchers; it never blocks.
        asyncio.ensure_future(self._set_health(up))
