"""``grpc.health.v1``, answered from the guard's view of the upstream.

grpcio-health-checking's asyncio servicer writes to each watcher while it
holds the service's lock: one ``Watch`` whose client never opened its HTTP/2
window held that lock for good, so the status froze (a dead upstream stayed
SERVING to every ``Check``, the readiness probe's call) and SIGTERM's drain,
which first sets the status, never began. Here setting a status never waits
on anyone: it updates a dict and wakes the watchers, each of which writes on
its own, within ``stream_idle_timeout_s`` (else its connection is closed, as
for answers never taken). Watches are bounded too: at most one per client
connection allowed on average (``max_connections``), 23 KB each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.dataplane.errors import shown

__all__ = ["Health", "health_handler"]

Receive = Callable[[Any], Awaitable[bytes]]
"""A call's request message, read within the guard's limits (or the call ends)."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Check, Watch and List over a status per service that :meth:`set` changes."""

    def __init__(
        self,
        services: Iterable[str],
        max_watchers: int,
        write_timeout_s: float,
        cut: Callable[[Any, str], None],
    ) -> None:
        self._status = dict.fromkeys(services, _NOT_SERVING)
        self._changed = asyncio.Event()
        self._watchers = 0
        self._max_watchers = max_watchers
        self._write_timeout_s = write_timeout_s
        self._cut = cut

    def set(self, serving: bool) -> None:
        """Every service SERVING or NOT_SERVING; watchers are woken, never waited on."""
        status = _SERVING if serving else _NOT_SERVING
        for service in self._status:
            self._status[service] = status
        self._changed.set()
        self._changed = asyncio.Event()  # watchers hold the one that was set

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
        status = self._status.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown service {shown(request.service)!r}"
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
        statuses = {s: health_pb2.HealthCheckResponse(status=v) for s, v in self._status.items()}
        return health_pb2.HealthListResponse(statuses=statuses)

    async def Watch(self, request: Any, context: Any) -> None:  # noqa: N802 - gRPC's name
        if self._watchers >= self._max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"guard: {self._watchers} health watches are open, as many as max_connections "
                "allows; watch once per connection, or use Check",
            )
        self._watchers += 1
        try:
            await self._watch(request.service, context)
        finally:
            self._watchers -= 1

    async def _watch(self, service: str, context: Any) -> None:
        sent = None
        while True:
            changed = self._changed
            status = self._status.get(service, _SERVICE_UNKNOWN)
            if status != sent:
                try:
                    await asyncio.wait_for(
                        context.write(health_pb2.HealthCheckResponse(status=status)),
                        self._write_timeout_s,
                    )
                except TimeoutError:
                    self._cut(context, "a health watch took no status for stream_idle_timeout_s")
                    return
                sent = status
            await changed.wait()


def health_handler(servicer: Health, receive: Receive) -> grpc.GenericRpcHandler:
    """``grpc.health.v1`` as a generic handler whose methods read their
    request through ``receive``: within ``request_timeout_s`` and
    ``max_pending_requests``, as the guard's other calls. grpc.aio reads a
    unary request itself, for ever: 2,000 streams that sent only their
    headers held 43 MB for as long as their connections lived. Generic
    only: grpc.aio keeps a request pending in gRPC's core for each
    registered method, and when its accept loop raises it frees memory the
    core still writes the next call into (grpcio 1.85: SIGSEGV in 1 of 4
    hostile soaks)."""

    async def request(kind: type[Message], context: Any) -> Any:
        try:
            return kind.FromString(await receive(context))
        except DecodeError as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"guard: the request is not a grpc.health.v1.{kind.__name__}: {exc}",
            )

    async def check(_requests: Any, context: Any) -> Any:
        return await servicer.Check(await request(health_pb2.HealthCheckRequest, context), context)

    async def list_(_requests: Any, context: Any) -> Any:
        return await servicer.List(await request(health_pb2.HealthListRequest, context), context)

    async def watch(_requests: Any, context: Any) -> None:
        await servicer.Watch(await request(health_pb2.HealthCheckRequest, context), context)

    response = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": grpc.stream_unary_rpc_method_handler(check, response_serializer=response),
            "List": grpc.stream_unary_rpc_method_handler(
                list_, response_serializer=health_pb2.HealthListResponse.SerializeToString
            ),
            "Watch": grpc.stream_stream_rpc_method_handler(watch, response_serializer=response),
        },
    )
