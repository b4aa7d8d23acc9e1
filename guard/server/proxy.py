"""The guard's gRPC server: a raw-bytes proxy for every method, with Predict
responses guarded, a health service that follows the upstream, limits on what
any client may hold, several servers on one port so that one stopping by
itself refuses no connection, and a drain on shutdown.

Requests are forwarded unparsed (only the ModelSpec is peeked at, to route and
label). Responses come back byte-identical unless a rule changed them. Upstream
status codes, details and metadata reach the client unchanged; the client's
metadata and deadline reach the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from guard.control.config import Config
from guard.dataplane.book import RuleBook
from guard.metrics.guard_metrics import GuardMetrics
from guard.server import tls
from guard.server.arrivals import Arrivals
from guard.server.ceiling import MemoryCeiling
from guard.server.gate import Gate, Refusal
from guard.server.handler import CallHandler, late_request
from guard.server.health import Health, health_handler
from guard.server.methods import PREDICT, Handler, MethodInfo, ProxyHandler
from guard.server.relay import StreamRelay
from guard.server.sockets import parse_peer, shut_client_sockets
from guard.server.upstream import Upstream, window_options

__all__ = ["HEALTH_REQUEST_MAX", "PREDICT", "GuardServer", "server_options"]

logger = logging.getLogger("guard.proxy")

_HEALTH_SERVICES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
HEALTH_REQUEST_MAX = 4096
"""The largest health request taken: a service name, and room to spare."""
_SHED = object()  # a health request refused by the arrivals watch as it arrived
_DRAIN_POLL_S = 0.02
_FINAL_GRACE_S = 0.5
# The watch wakes on grpc.aio's error log at once; polling is only the
# fallback for a stop it did not log. At 50 ms, that poll alone kept an idle
# guard at 15 ms of CPU a second (190 epoll_wait calls a second).
_WATCH_S = 1.0
# grpc.aio's server stops by itself when its accept loop raises (in grpcio 1.85,
# a method name that is not UTF-8 does it). Four servers share the port
# (SO_REUSEPORT): while one is replaced, the others take the new connections.
# Measured with such calls back to back (docs/reliability.md): two servers
# kept a connected client's calls going up to 50 a second, four up to 100.
_LISTENERS = 4
_GRPC_LOGGER = logging.getLogger("grpc._cython.cygrpc")
_SETTLE_STEPS = 3
_METADATA_SLACK = 8 * 1024
# After closing the connections past max_memory_mb, gRPC frees what they held:
# the next reading waits that long.
_CEILING_SETTLE_S = 0.5
# Connections the guard closed, remembered to count their calls as their
# clients see them; bounded, and a port reused later is another connection.
_CUT_PEERS_KEPT = 256
_CUT_PEER_S = 5.0


def server_options(config: Config) -> list[tuple[str, Any]]:
    """Options for the listening gRPC server: gRPC's own limits, from the config."""
    ms = 1000
    # gRPC's own check counts pseudo-headers and its own headers too, and
    # holds only once the client has acknowledged the server's settings: it is
    # the backstop, a little above the guard's exact check (gate.py), which
    # answers with the limit's name.
    metadata = config.max_metadata_kb * 1024 + _METADATA_SLACK
    return [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # Each of the port's servers takes its share; gRPC closes what comes
        # past it before the HTTP/2 handshake (the kernel spreads connections
        # across the servers by their addresses).
        ("grpc.max_allowed_incoming_connections", -(-config.max_connections // _LISTENERS)),
        ("grpc.max_metadata_size", metadata),
        ("grpc.absolute_max_metadata_size", metadata),
        ("grpc.max_connection_idle_ms", int(config.max_connection_idle_s * ms)),
        ("grpc.max_connection_age_ms", int(config.max_connection_age_s * ms)),
        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * ms)),
        ("grpc.so_reuseport", 1),
        *window_options(config),
    ]


class GuardServer:
    """The guard's gRPC server. ``await start()``, then ``await stop(grace)``."""

    def __init__(self, config: Config, metrics: GuardMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._book = RuleBook(config.models, config.max_message_bytes)
        self.upstream = Upstream(config, self._upstream_state)
        self.gate = Gate(config)
        if self.gate.max_relayed < config.max_relayed_streams:
            logger.warning(
                "streaming calls may hold %d of max_concurrent_rpcs (%d), not max_relayed_streams "
                "(%d): the unary calls keep a quarter", self.gate.max_relayed,
                config.max_concurrent_rpcs, config.max_relayed_streams,
            )  # fmt: skip
        self.arrivals = Arrivals(self.gate)
        self._arrivals_watch: asyncio.Task[None] | None = None
        self._ceiling: asyncio.Task[None] | None = None
        self._health = Health(
            _HEALTH_SERVICES, config.max_connections, config.stream_idle_timeout_s,
            self.cut_connection,
        )  # fmt: skip
        self._servers: list[grpc.aio.Server] = []
        self._running: dict[grpc.aio.Server, _Running] = {}
        self.certificates: tls.ListenerCertificates | None = None
        """The listening side's TLS certificate, for every listener; made at start."""
        self._certificates_watch: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._cut_peers: dict[str, float] = {}  # peer -> when its connection was cut
        self._all_cut_at = -_CUT_PEER_S  # when every client connection was last cut
        self._stopping = False
        self.cut_off: float | None = None
        """The grace period, once a shutdown's ran out (calls still waiting are cut off)."""
        self.on_fatal: Callable[[str], None] = lambda reason: None
        """Called when the server stopped by itself and could not be started again."""
        self.metrics.track_gate(self.gate)
        for reason in Refusal:  # every series at 0 from the start: rate() needs one
            self.metrics.refusals.labels(reason.value)
        self.port = 0

    @property
    def inflight(self) -> int:
        """Calls in flight to the upstream."""
        return self.gate.inflight

    @property
    def rules(self) -> RuleBook:
        """The rule set new requests use."""
        return self._book

    def swap_rules(self, config: Config) -> None:
        """Install a new rule set. Requests already running keep the one they started with."""
        # Names first: the new book's plans keep the model label they resolve.
        self.metrics.set_model_names(config.model_names())
        self._book = RuleBook(config.models, config.max_message_bytes)
        self.config = config

    # ------------------------------------------------------------- lifecycle

    def _new_server(self, listen: str) -> tuple[grpc.aio.Server, int]:
        # No maximum_concurrent_rpcs: gRPC would count calls the guard never
        # sees (streams that never send their request) and refuse everyone
        # else; the guard's own limits (the gate) see every call.
        server = grpc.aio.server(options=server_options(self.config))
        server.add_generic_rpc_handlers((health_handler(self._health, self._health_request),))
        running = self._running[server] = _Running()
        handler = ProxyHandler(
            running.counted(CallHandler(self).unary), running.counted(StreamRelay(self).relay)
        )
        server.add_generic_rpc_handlers((handler,))
        if self.certificates is not None:
            port = server.add_secure_port(listen, self.certificates.credentials())
        else:
            port = server.add_insecure_port(listen)
        if not port:
            raise OSError(f"cannot listen on {listen}")
        return server, port

    async def start(self) -> int:
        """Bind, start serving and start probing the upstream. Returns the bound port."""
        if self.config.tls is not None:
            rest = self.config.rest_upstream is not None
            self.certificates = tls.ListenerCertificates(self.config.tls, rest=rest)
        server, self.port = self._new_server(self.config.listen)
        self._health.set(False)
        self.metrics.upstream_up.set(0)
        await server.start()
        self._servers = [server]
        while len(self._servers) < _LISTENERS:
            self._servers.append(await self._start_listener())
        await self.upstream.start()
        self._watch = asyncio.create_task(self._watch_servers(), name="guard-server-watch")
        self._arrivals_watch = asyncio.create_task(self.arrivals.run(), name="guard-arrivals")
        if self.certificates is not None:
            watch = self.certificates.watcher.run()
            self._certificates_watch = asyncio.create_task(watch, name="guard-tls-watch")
        if self.config.max_memory_mb:
            ceiling = MemoryCeiling(self.config.max_memory_mb * 2**20, self._close_connections)
            self._ceiling = asyncio.create_task(ceiling.run(), name="guard-memory-ceiling")
        return self.port

    async def _start_listener(self) -> grpc.aio.Server:
        server, _ = self._new_server(_same_port(self.config.listen, self.port))
        await server.start()
        return server

    async def _watch_servers(self) -> None:
        """Replace a server that stopped by itself; its in-flight calls finish
        on it, its clients reconnect to another. grpc.aio logs the error as its
        server stops: that wakes the watch at once (polling is the fallback),
        so that all are seldom down together."""
        wake = asyncio.Event()
        signal = _WakeOnError(wake)
        _GRPC_LOGGER.addHandler(signal)
        try:
            while not self._stopping:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), _WATCH_S)
                wake.clear()
                for _ in range(_SETTLE_STEPS):  # grpc.aio's shutdown task marks it stopped
                    await asyncio.sleep(0)
                for index, server in enumerate(self._servers):
                    if not self._stopping and not _is_serving(server):
                        await self._replace(index)
        finally:
            _GRPC_LOGGER.removeHandler(signal)

    async def _replace(self, index: int) -> None:
        logger.error(
            "a gRPC server stopped by itself (grpc.aio's accept loop raised, see the "
            "error above); the others serve while a new one starts on port %d", self.port,
        )  # fmt: skip
        try:
            server = await self._start_listener()
        except Exception as exc:  # cannot serve any more: the process must go
            logger.critical("cannot start a new gRPC server: %s", exc)
            self.on_fatal(f"the gRPC server stopped and could not be started again: {exc}")
            self._stopping = True
            return
        old, self._servers[index] = self._servers[index], server
        self.metrics.server_restarts.inc()
        retire = asyncio.create_task(self._retire(old), name="guard-server-retire")
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)

    async def _health_request(self, context: Any) -> bytes:
        """A health call's request, within ``max_pending_requests``,
        ``request_timeout_s`` and the arrivals watch, as a proxied call's
        (:class:`CallHandler`), and at most :data:`HEALTH_REQUEST_MAX` bytes:
        gRPC takes any up to ``max_request_mb``, and one Check naming a 31 MiB
        service took the guard from 58 to 727 MB (its error echoed the name)."""
        gate, arrivals = self.gate, self.arrivals
        problem = gate.pending_problem()
        if problem is not None:
            self.metrics.record_refusal(Refusal.PENDING.value)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
        if not arrivals.admit():
            await self._refuse_health(context, Refusal.INFLIGHT_BYTES, arrivals.problem())
        task = asyncio.current_task()
        assert task is not None
        gate.pending += 1
        arrivals.begin(task)
        try:
            message = await asyncio.wait_for(context.read(), self.config.request_timeout_s)
        except TimeoutError:
            message = None
        except asyncio.CancelledError:
            if not arrivals.was_shed(task):
                raise
            message = _SHED
        finally:
            gate.pending -= 1
            arrivals.end(task)
        if message is _SHED:
            await self._refuse_health(context, Refusal.INFLIGHT_BYTES, arrivals.problem())
        if message is None:
            self.metrics.record_refusal(Refusal.REQUEST_TIMEOUT.value)
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, late_request(self.config.request_timeout_s)
            )
        if message is grpc.aio.EOF:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "guard: a health call takes one request message"
            )
        assert isinstance(message, bytes)
        if len(message) > HEALTH_REQUEST_MAX:
            await self._refuse_health(
                context,
                Refusal.REQUEST_TOO_LARGE,
                f"guard: a health request of {len(message)} bytes; grpc.health.v1 requests name "
                f"a service, in at most {HEALTH_REQUEST_MAX} bytes here",
            )
        return message

    async def _refuse_health(self, context: Any, refusal: Refusal, details: str) -> None:
        self.metrics.record_refusal(refusal.value)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details)

    def cut_connection(self, context: Any, why: str) -> None:
        """Shut down the connection that ``context``'s call came on: gRPC then
        ends its calls and frees what they hold. Counted as ``stream_idle``."""
        peer = context.peer()
        self._cut_peers[peer] = time.perf_counter()
        while len(self._cut_peers) > _CUT_PEERS_KEPT:
            del self._cut_peers[next(iter(self._cut_peers))]
        address = parse_peer(peer)
        self.metrics.record_refusal(Refusal.STREAM_IDLE.value)
        shut = shut_client_sockets(self.port, address) if address is not None else 0
        logger.warning("closed the connection of %s (%d sockets): %s", peer, shut, why)

    def was_cut(self, peer: str, began: float) -> bool:
        """Whether the guard closed the connection of a call from ``peer`` that
        ``began`` (``time.perf_counter()``) before, in the last few seconds:
        the calls gRPC then cancels on it are counted as their clients see
        them, UNAVAILABLE, not CANCELLED. A call that began before every
        connection was closed (``max_memory_mb``) had its own closed."""
        now = time.perf_counter()
        if began < self._all_cut_at and now - self._all_cut_at < _CUT_PEER_S:
            return True
        at = self._cut_peers.get(peer)
        return at is not None and began < at and now - at < _CUT_PEER_S

    async def _close_connections(self) -> None:
        """Past max_memory_mb: end every client connection of the gRPC port
        (the listeners stay), so that gRPC frees what they hold."""
        self.metrics.memory_resets.inc()  # first: a client that sees its end may scrape
        self._all_cut_at = time.perf_counter()
        shut = shut_client_sockets(self.port)
        logger.error("closed %d gRPC client connections (max_memory_mb)", shut)
        await asyncio.sleep(_CEILING_SETTLE_S)

    async def _retire(self, server: grpc.aio.Server) -> None:
        """Finish the stopped server's shutdown: gRPC's own stopped halfway (it
        raised), before its calls were waited for and its core server freed.

        The calls its handlers run finish, within ``shutdown_grace_s``; then
        the rest are cancelled at once. The rest include a call its dead
        accept loop had asked gRPC for and never ran: left to the grace
        period, that call waited out its client's deadline (a health check's
        2 s, in one run of about 40 of the non-UTF-8 attack)."""
        running = self._running.pop(server, _Running())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace_s
        while running.count and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        try:
            await server.stop(0)
        except Exception as exc:  # nothing more can be done for it
            logger.warning("a stopped gRPC server could not be shut down: %s", exc)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight calls finish within ``grace`` seconds, close."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.upstream.stop_watching()
        self._health.set(False)
        # gRPC's shutdown closes the listeners and sends GOAWAY, so clients open
        # a new connection (to another replica) for new calls; in-flight calls
        # go on.
        stopping = [asyncio.ensure_future(s.stop(grace + _FINAL_GRACE_S)) for s in self._servers]
        while self.gate.inflight and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if self.gate.inflight:
            # The grace period ran out. Ending the upstream calls lets each handler
            # tell its client why, before gRPC's bare "Cancelling all calls".
            self.cut_off = grace
            await self.upstream.close()
        # Every call the handler took is done, or ending. A call that raced the
        # shutdown can sit in grpc.aio, never handed to the handler, until the
        # shutdown's grace runs out (seen in 3 of 270 SIGTERM tests on a busy
        # machine). Cut that short: a second stop cancels what is left once
        # the answers being sent have gone.
        await asyncio.gather(*(s.stop(_FINAL_GRACE_S) for s in self._servers))
        await asyncio.gather(*stopping, *self._retiring)
        await self.upstream.close()
        for task in (self._arrivals_watch, self._ceiling, self._certificates_watch):
            if task is not None:
                task.cancel()
        self.arrivals.close()

    # ---------------------------------------------------------------- health

    def _upstream_state(self, up: bool) -> None:
        self.metrics.upstream_up.set(1 if up else 0)
        self._health.set(up and not self._stopping)


class _WakeOnError(logging.Handler):
    """Sets an event on each error grpc.aio logs (it runs on the event loop)."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__(logging.ERROR)
        self._event = event

    def emit(self, record: logging.LogRecord) -> None:
        self._event.set()


class _Running:
    """How many of the guard's calls one gRPC server's handlers are running
    (health checks aside)."""

    def __init__(self) -> None:
        self.count = 0

    def counted(self, handler: Handler) -> Handler:
        async def run(info: MethodInfo, requests: Any, context: Any) -> Any:
            self.count += 1
            try:
                return await handler(info, requests, context)
            finally:
                self.count -= 1

        return run


def _is_serving(server: grpc.aio.Server) -> bool:
    """Whether gRPC's server still accepts calls (grpc.aio keeps this on its
    Cython core server; without it, assume it does)."""
    core = getattr(server, "_server", None)
    is_running = getattr(core, "is_running", None)
    return bool(is_running()) if callable(is_running) else True


def _same_port(listen: str, port: int) -> str:
    host = listen.rpartition(":")[0]
    return f"{host}:{port}"
