"""One proxied call: admit it, receive its request, forward it, guard a
Predict response, and count what the client saw.

TF Serving's unary methods take the unary path: the request is read here (so
a request that never arrives is timed out, not left holding a slot), then
forwarded as one message. Every other method is relayed as a stream in both
directions (:mod:`guard.server.relay`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn, Protocol

import grpc

from guard.control.config import Config
from guard.dataplane.book import RuleBook
from guard.dataplane.codec.request import peek_model_spec
from guard.dataplane.codec.response import ModelSpecInfo
from guard.dataplane.errors import GuardError, ResponseTooLargeError
from guard.dataplane.pipeline import guard_predict_response
from guard.dataplane.results import REJECTED, verdict_headers
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.accounting import CallRecord
from guard.server.arrivals import Arrivals
from guard.server.deadlines import Deadlines, Overdue
from guard.server.gate import Gate, Held, Refusal
from guard.server.methods import PREDICT, MethodInfo
from guard.server.status import grpc_code
from guard.server.upstream import Upstream

__all__ = [
    "GRPC_COPIES",
    "Call",
    "CallHandler",
    "Metadata",
    "ServerState",
    "forwardable",
    "late_request",
    "sendable",
    "upstream_timeout",
]

logger = logging.getLogger("guard.proxy")

GRPC = "grpc"
"""The ``protocol`` label of calls made over gRPC."""

# Metadata that belongs to one HTTP/2 hop and must not be forwarded.
_HOP_HEADERS = frozenset({"user-agent", "te", "content-type", "host", "grpc-timeout"})
# After a request that never came (EOF), how long to give gRPC to say it ended
# the call itself (a message over max_request_mb). grpc.aio reads both as EOF;
# its cancellation comes through the completion queue's poller thread, which a
# loaded machine may not run for a while: three loop turns were once not
# enough, and the refused request went upstream as an empty one. No gRPC
# client sends a unary call without a message, so only such odd calls wait.
_EOF_SETTLE_S = 0.25
GRPC_COPIES = 2
"""gRPC holds a message twice: an answer until the client takes it (the bytes
handed to it, and its copy: 16 MB answers held 44 MB each, allocator slack
included), and a forwarded request while its call is in flight (a 31 MB
request to a slow model: 72 MB in use)."""
# What gRPC holds for a unary call besides its answer, until the client takes
# it: measured at 26 KB a call (2,000 small answers never taken: +52 MB).
_CALL_STATE_BYTES = 32 * 1024

Metadata = tuple[tuple[str, Any], ...]
# A client's own deadline ends its call a little before the guard's reading of
# it says so: the guard's clock starts when the headers arrive, and clients
# round the grpc-timeout they send. Python clients over loopback (deadlines of
# 1 to 2.5 s, a 3 s upstream) cancelled with 0.4 to 7.8 ms left; the rest is
# room for a network between them. A client that cancels this close to its
# deadline is counted as past it.
_DEADLINE_SLACK_S = 0.05
# What gRPC sends on (src/core/lib/surface/validate_metadata.cc): keys are
# lower-case header names, values printable ASCII unless the key ends in -bin.
_LEGAL_KEY = re.compile(r"[0-9a-z_.\-]+")
_GUARD_PREFIX = "x-guard-"
_TIMED_OUT = object()
_SHED = object()
_MORE = object()


# gRPC's deadlines are nanoseconds of int64 on its own clock: a grpc-timeout of
# 2562047H (Go's largest Duration) passed on as it is overflows, and the
# upstream call ended DEADLINE_EXCEEDED at once. Ten years is no deadline.
_TIMEOUT_MAX_S = 10 * 365 * 24 * 3600.0


def upstream_timeout(remaining: float | None) -> float | None:
    """The client's time left, as a timeout gRPC can take on."""
    return remaining if remaining is None else min(remaining, _TIMEOUT_MAX_S)


class _QuietClientNoise(logging.Filter):
    """Warning lines, not tracebacks, for what gRPC logs of clients' doing,
    which the log handler's ``RepeatQuota`` then lets through once a minute,
    as every line a client can repeat (:mod:`guard.control.app`):

    - each metadata value it receives that is not UTF-8 (it reads it as
      Latin-1; :func:`_sendable` then drops it);
    - each answer it could not send because the call had ended: its client
      went away, or the guard closed a connection that took nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("ExecuteBatchError raised in core"):
            method = message.partition("[")[2].rstrip("]")[:200]  # formatted already
            # The method as an argument: the quota keys on the template, and a
            # client chooses the method's name.
            record.msg = (
                "could not send the answer to %s: its call had ended "
                "(the client's connection is gone)"
            )
            record.args = (method,)
        elif not message.startswith("Invalid encoding on"):
            return True
        record.exc_info = record.exc_text = None
        record.levelno = logging.WARNING
        record.levelname = "WARNING"
        return True


logging.getLogger("grpc._cython.cygrpc").addFilter(_QuietClientNoise())


@functools.lru_cache(maxsize=1024)  # keys repeat on every call; bounded: clients choose them
def _legal_key(key: str) -> bool:
    return _LEGAL_KEY.fullmatch(key) is not None


def _legal(key: Any, value: Any) -> bool:
    if not isinstance(key, str) or not _legal_key(key):
        return False
    if key.endswith("-bin"):
        return isinstance(value, bytes | str)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    # Printable ASCII is 0x20-0x7e, what gRPC sends (two C calls, not a regex).
    return isinstance(value, str) and value.isascii() and value.isprintable()


def _sendable(
    metadata: Sequence[tuple[Any, Any]] | None, whose: str, unwanted: Callable[[str], bool]
) -> Metadata:
    """``metadata`` less the ``unwanted`` keys and what gRPC would refuse to
    send on (failing the whole call as it sends it: with an upstream's
    trailers, as it ends a call the guard counted OK). The latter is logged,
    as ``whose``."""
    if not metadata:
        return ()
    kept, dropped = [], []
    for key, value in metadata:
        if unwanted(key):
            continue
        if _legal(key, value):
            kept.append((key, value))
        else:
            dropped.append(ascii(key)[:64])
    if dropped:
        logger.warning(
            "dropped %d entries of %s that gRPC cannot send on (keys %s): keys must be "
            "lower-case header names, values printable ASCII unless the key ends in -bin",
            len(dropped), whose, ", ".join(dropped[:8]),
        )  # fmt: skip
    return tuple(kept)


def _hop_header(key: str) -> bool:
    return key in _HOP_HEADERS or key.startswith((":", "grpc-"))


def _guard_header(key: str) -> bool:
    return key.startswith(_GUARD_PREFIX)


def _no_header(key: str) -> bool:
    return False


def sendable(
    metadata: Sequence[tuple[Any, Any]] | None, where: str, guarded: bool = False
) -> Metadata:
    """The upstream's ``where`` (``initial``, ``trailing``) metadata that the
    guard can send on; where the guard adds its own (``guarded``), less the
    upstream's ``x-guard-*`` entries."""
    unwanted = _guard_header if guarded else _no_header
    return _sendable(metadata, f"the upstream's {where} metadata", unwanted)


def forwardable(metadata: Sequence[tuple[str, Any]] | None) -> Metadata:
    """The client's metadata that goes on to the upstream."""
    return _sendable(metadata, "a client's metadata", _hop_header)


class ServerState(Protocol):
    """What a call needs of the server that runs it."""

    config: Config
    metrics: GuardMetrics
    upstream: Upstream
    gate: Gate
    arrivals: Arrivals
    cut_off: float | None
    """The grace period, once a shutdown's ran out (``None`` until then)."""

    def cut_connection(self, context: Any, why: str) -> None:
        """Close the connection of ``context``'s call (:mod:`guard.server.sockets`)."""

    def was_cut(self, peer: str, began: float) -> bool:
        """Whether the guard closed the connection of a call from ``peer``
        (``context.peer()`` as the call began: it is empty once closed) that
        ``began`` before, a moment ago."""

    @property
    def rules(self) -> RuleBook: ...


class Call(CallRecord):
    """One gRPC call's bookkeeping, and how the guard ends one itself."""

    __slots__ = ()
    protocol = GRPC

    def ended_by_client(self, context: Any, cut: bool = False) -> None:
        """Count a call gRPC cancelled: its client went past its deadline or
        cancelled it, or (``cut``) the guard closed its connection, and its
        client sees the stream removed: UNAVAILABLE."""
        if cut:
            self.count("UNAVAILABLE")
            return
        self.count("DEADLINE_EXCEEDED" if _past_deadline(context) else "CANCELLED")

    def ended_under_send(self, context: Any) -> None:
        """Count a call that ended while the guard sent it something: past
        its deadline, DEADLINE_EXCEEDED, as its client saw it; else its
        connection was closed under it (a client that took nothing, or
        another stream's on its connection), and its client saw the stream
        removed: UNAVAILABLE. (A send into a call its deadline had just ended
        was counted UNKNOWN: seen once in CI, one relayed call of six.)"""
        self.count("DEADLINE_EXCEEDED" if _past_deadline(context) else "UNAVAILABLE")

    async def fail(
        self, context: Any, status: grpc.StatusCode, details: str, trailers: Metadata = ()
    ) -> NoReturn:
        """Count the call, then end it with ``status``.

        Counted, timed, and its slots given back, first: grpc.aio sends the
        status from within ``abort``, and once the client has its answer a
        scrape must see it.
        """
        self.count(status.name)
        self.answered()
        await context.abort(status, details, trailers)
        raise AssertionError("context.abort() returned")  # it raises; for type checkers

    async def refuse(
        self, context: Any, reason: Refusal, details: str, status: grpc.StatusCode | None = None
    ) -> NoReturn:
        """Count a refusal by reason, then end the call (RESOURCE_EXHAUSTED by default)."""
        self._metrics.record_refusal(reason.value)
        await self.fail(context, status or grpc.StatusCode.RESOURCE_EXHAUSTED, details)


def _past_deadline(context: Any) -> bool:
    """Whether the call's deadline has passed (give or take a client's early cancel)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_SLACK_S


class CallHandler:
    """Forwards TF Serving's unary calls to the upstream, guarding Predict responses."""

    def __init__(self, server: ServerState) -> None:
        self._server = server
        self._deadlines = Deadlines()
        self._untaken = Overdue(server.config.stream_idle_timeout_s, self._not_taken)

    async def unary(self, info: MethodInfo, _requests: Any, context: Any) -> bytes | None:
        """Forward one unary call (grpc.aio's stream-unary handler signature)."""
        server = self._server
        call = Call(server.metrics, info.label)
        peer = context.peer()  # empty once its connection is gone; 0.2 us
        try:
            # invocation_metadata() builds a new tuple on each call: read it once.
            received = context.invocation_metadata()
            request = await self._receive(received, context, call)
            metadata = forwardable(received)
            if request is None:
                await self._hold_slot(call, context, 0)
                return await self._relay_empty(info, metadata, context, call)
            book = server.rules  # one consistent rule set for the whole call
            spec = peek_model_spec(request, info.spec_path) if info.spec_path else None
            call.model_label = server.metrics.model_label(spec.name if spec else None)
            await self._hold_slot(call, context, GRPC_COPIES * len(request))
            return await self._answer(info, request, metadata, spec, book, context, call)
        except asyncio.CancelledError:
            call.ended_by_client(context, server.was_cut(peer, call.start))
            raise
        except BaseException as exc:
            # gRPC keeps an ended call's exception, and with it every frame it
            # passed, until a cyclic collection, which may not come for long:
            # not the request and answer too (three refused requests of 31 MB
            # were held for good, and the arrivals watch saw them as arriving).
            request = None
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            call.finish()

    async def _hold_slot(self, call: Call, context: Any, size: int) -> None:
        """Hold an in-flight slot and ``size`` bytes of the budget while the
        call is answered, or refuse it."""
        gate = self._server.gate
        refused = gate.admit(size)
        if refused is not None:
            await call.refuse(context, *refused)
        call.hold(functools.partial(gate.release, size))

    async def _answer(
        self,
        info: MethodInfo,
        request: bytes,
        metadata: Metadata,
        spec: ModelSpecInfo | None,
        book: RuleBook,
        context: Any,
        call: Call,
    ) -> bytes:
        guards = info.name == PREDICT and book.may_apply(spec.name if spec else None)
        response, trailers = await self._forward(info, request, metadata, guards, context, call)
        gate = self._server.gate
        held = len(response)
        refused = gate.answer_problem(held, GRPC_COPIES * len(request))
        if refused is not None:
            # gRPC keeps the refusal's traceback, and with it this frame, until
            # a cyclic collection: not the answer too.
            del response
            await call.refuse(context, *refused)
        guarded = Held(gate)  # the budget counts the response while it is guarded
        guarded.take(held)
        call.hold(guarded.release_all)
        if guards:
            response, trailers = await self._guard(response, trailers, spec, book, context, call)
        guarded.release_all()
        if trailers:
            context.set_trailing_metadata(trailers)
        self._hold_until_taken(context, response)
        call.count("OK")
        return response

    # ------------------------------------------------------------- receiving

    async def _receive(
        self, received: Sequence[tuple[str, Any]] | None, context: Any, call: Call
    ) -> bytes | None:
        """The request message; ``None`` when the client sent none. Refuses
        what would hold the guard: oversized metadata (``received``), too many
        calls still receiving, a request that does not arrive within
        request_timeout_s."""
        gate = self._server.gate
        problem = gate.metadata_problem(received)
        if problem is not None:
            await call.refuse(context, Refusal.METADATA, problem)
        problem = gate.pending_problem()
        if problem is not None:
            await call.refuse(context, Refusal.PENDING, problem)
        task = asyncio.current_task()
        assert task is not None
        arrivals = self._server.arrivals
        if not arrivals.admit():
            await call.refuse(context, Refusal.INFLIGHT_BYTES, arrivals.problem())
        gate.pending += 1
        arrivals.begin(task)
        try:
            message = await self._read(context, task)
        finally:
            gate.pending -= 1  # before any answer: a scrape after it sees the slot free
            arrivals.end(task)
        if message is _SHED:
            await call.refuse(context, Refusal.INFLIGHT_BYTES, arrivals.problem())
        if message is _MORE:
            await call.fail(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "guard: a unary call takes one request message, and this client sent more "
                "before ending its stream",
            )
        if message is _TIMED_OUT:
            await call.refuse(
                context,
                Refusal.REQUEST_TIMEOUT,
                late_request(self._server.config.request_timeout_s),
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        if message is grpc.aio.EOF:
            await self._settle_after_eof(context, call)
            return None
        assert isinstance(message, bytes)
        return message

    async def _read(self, context: Any, task: asyncio.Task[Any]) -> Any:
        """The request (read to the end of the stream: :func:`_whole_request`),
        EOF, ``_MORE``, ``_TIMED_OUT`` after request_timeout_s, or ``_SHED``
        when the requests arriving hold too much (:mod:`arrivals`)."""
        try:
            return await self._deadlines.wait(
                _whole_request(context), self._server.config.request_timeout_s
            )
        except TimeoutError:
            return _TIMED_OUT
        except asyncio.CancelledError:
            if self._server.arrivals.was_shed(task):
                return _SHED
            raise

    async def _settle_after_eof(self, context: Any, call: Call) -> None:
        """A request that ended with no message: either the client sent none,
        or gRPC refused it (over max_request_mb, or cancelled) and is about to
        cancel this call. Give gRPC a moment to say which."""
        try:
            await asyncio.sleep(_EOF_SETTLE_S)
        except asyncio.CancelledError:
            # gRPC ended the call: its deadline passed as the request arrived,
            # or its client has RESOURCE_EXHAUSTED ('message larger than
            # max'). Or the client cancelled the call mid-request: gRPC shows
            # the handler nothing that tells that from the refusal.
            if _past_deadline(context):
                call.count("DEADLINE_EXCEEDED")
            else:
                self._server.metrics.record_refusal(Refusal.REQUEST_TOO_LARGE.value)
                call.count("RESOURCE_EXHAUSTED")
            raise

    async def _relay_empty(
        self, info: MethodInfo, metadata: Metadata, context: Any, call: Call
    ) -> bytes | None:
        """A unary call that carried no request: the upstream decides, as if
        the client had called it directly. It holds an in-flight slot, taken
        by :meth:`unary`, as any call does (without one, such calls passed
        max_concurrent_rpcs)."""
        upstream_call = self._server.upstream.stream_unary(info.name)(
            _no_messages(), timeout=self._timeout(context), metadata=metadata
        )
        try:
            response: bytes | None = await upstream_call
        except grpc.aio.AioRpcError as exc:
            await self._upstream_failed(exc, context, call)
        if response is None:
            await _no_answer(context, call)
        self._hold_until_taken(context, response)
        call.count("OK")
        return response

    def _hold_until_taken(self, context: Any, response: bytes) -> None:
        """Count ``response`` in the budget until its call ends: gRPC holds the
        answer until the client's flow-control window takes it, which a client
        may never open (20 answers of 16 MB held 700 MB, uncounted), and its
        call's state with it (2,000 small answers: 52 MB, 0.45 MB counted). gRPC
        cannot end such a call (its status queues behind the answer): one not
        over within stream_idle_timeout_s has its connection closed."""
        held = Held(self._server.gate)
        held.take(GRPC_COPIES * len(response) + _CALL_STATE_BYTES)
        untaken = self._untaken
        untaken.add(context)

        def ended(*_: object) -> None:
            held.release_all()
            untaken.discard(context)

        context.add_done_callback(ended)
        if context.done():  # ended already (the client went away): no callback may come
            ended()

    def _not_taken(self, context: Any) -> None:
        limit = self._server.config.stream_idle_timeout_s
        self._server.cut_connection(
            context, f"its client took no answer within stream_idle_timeout_s ({limit:g} s)"
        )

    # ------------------------------------------------------------- forwarding

    def _timeout(self, context: Any) -> float:
        remaining: float | None = context.time_remaining()
        if remaining is None:
            return self._server.config.default_timeout_s
        return min(remaining, _TIMEOUT_MAX_S)

    async def _forward(
        self,
        info: MethodInfo,
        request: bytes,
        metadata: Metadata,
        guards: bool,
        context: Any,
        call: Call,
    ) -> tuple[bytes, Metadata]:
        """The upstream's answer and trailers (its initial metadata is sent on),
        less the metadata gRPC cannot send and, on a call the guard ``guards``,
        the upstream's ``x-guard-*`` entries: the guard's are the only ones."""
        upstream_call = self._server.upstream.unary(info.name)(
            request, timeout=self._timeout(context), metadata=metadata
        )
        t_up = time.perf_counter()
        try:
            response: bytes | None = await upstream_call
        except grpc.aio.AioRpcError as exc:
            call.upstream_s = time.perf_counter() - t_up
            await self._upstream_failed(exc, context, call)
        except asyncio.CancelledError:
            await self._cut_off(upstream_call, context, call)
            raise
        call.upstream_s = time.perf_counter() - t_up
        if response is None:
            await _no_answer(context, call)
        trailers = sendable(await upstream_call.trailing_metadata(), "trailing", guards)
        initial = sendable(await upstream_call.initial_metadata(), "initial", guards)
        if initial:
            await context.send_initial_metadata(initial)
        return response, trailers

    async def _upstream_failed(
        self, exc: grpc.aio.AioRpcError, context: Any, call: Call
    ) -> NoReturn:
        """End the call as the upstream ended it: its code, details, initial
        and trailing metadata."""
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            self._server.upstream.suspect()
        initial = sendable(exc.initial_metadata(), "initial")
        if initial:
            await context.send_initial_metadata(initial)
        await call.fail(
            context, exc.code(), upstream_details(exc.code(), exc.details(), self._server),
            sendable(exc.trailing_metadata(), "trailing"),
        )  # fmt: skip

    async def _cut_off(self, upstream_call: Any, context: Any, call: Call) -> None:
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

    async def _guard(
        self,
        response: bytes,
        trailers: Metadata,
        spec: ModelSpecInfo | None,
        book: RuleBook,
        context: Any,
        call: Call,
    ) -> tuple[bytes, Metadata]:
        try:
            guarded = guard_predict_response(response, spec, book, self._server.metrics)
        except ResponseTooLargeError as exc:
            self._server.metrics.record_refusal(Refusal.RESPONSE_TOO_LARGE.value)
            await call.fail(context, grpc_code(exc), exc.details, trailers)
        except GuardError as exc:
            verdict = verdict_headers(REJECTED, exc.violations)
            await call.fail(context, grpc_code(exc), exc.details, trailers + verdict)
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


def late_request(timeout_s: float) -> str:
    """The details of a call whose request did not arrive in time."""
    return (
        f"guard: the request message did not arrive within request_timeout_s ({timeout_s:g} s) "
        "of its headers; send it at once, or raise request_timeout_s in the guard config"
    )


async def _whole_request(context: Any) -> Any:
    """A unary call's one message once its client has ended the stream (every
    gRPC client sends both together), EOF for none, or ``_MORE``. Forwarded
    before the end, whatever the client went on sending waited unread in its
    stream's window for as long as the upstream took (100 calls to a slow
    model on one connection: 4.8 GB with gRPC's window sizing)."""
    message = await context.read()
    if message is grpc.aio.EOF:
        return message
    return message if await context.read() is grpc.aio.EOF else _MORE


async def _no_answer(context: Any, call: Call) -> NoReturn:
    """A unary call the upstream ended OK without its one message (what a
    C++, Java or Go client of the upstream gets as INTERNAL)."""
    await call.fail(
        context,
        grpc.StatusCode.INTERNAL,
        "guard: the upstream answered OK without a response message, which a unary "
        "method must return; the upstream is at fault (TF Serving always sends one)",
    )


async def _no_messages() -> AsyncIterator[bytes]:
    return
    yield  # an async generator that yields nothing


# How gRPC's client words a channel that cannot reach its target.
_CHANNEL_FAILURES = (
    "failed to connect to all addresses", "DNS resolution failed", "errors resolving",
)  # fmt: skip


def upstream_details(code: grpc.StatusCode, details: str | None, server: ServerState) -> str:
    """The upstream's details, or the guard's own where its channel could
    not reach the upstream, or refused the upstream's answer as over
    max_message_mb (counted as a refusal). The upstream's own refusal of what
    the guard sent it ('SERVER: Received message larger than max') is passed
    on as it came: it was once told to raise max_message_mb, the wrong limit
    on the wrong side."""
    details = details or ""
    if (
        code is grpc.StatusCode.UNAVAILABLE
        and details.startswith(_CHANNEL_FAILURES)
        and not server.upstream.reachable()
    ):
        # gRPC's words about the guard's own channel read, to the client, as
        # though its own connection had failed.
        return f"guard: cannot reach the upstream {server.config.upstream}: {details}"
    if (
        code is grpc.StatusCode.RESOURCE_EXHAUSTED
        and "larger than max" in details
        and not details.startswith("SERVER:")
    ):
        server.metrics.record_refusal(Refusal.RESPONSE_TOO_LARGE.value)
        return (
            f"guard: the upstream's response is larger than max_message_mb="
            f"{server.config.max_message_mb} ({details}); raise max_message_mb in the guard config"
        )
    return details
