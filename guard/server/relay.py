"""A stream relayed both ways: any method that is not one of TF Serving's
unary ones (client, server and bidirectional streaming included).

One message is in flight per direction: a message is read only once the
previous one was written, so a slow reader on either side slows the other
instead of filling the guard's memory. Initial and trailing metadata, the
status, half-close, zero-message calls, deadlines and cancellation reach the
other side as they were sent.

What either side sends ahead of what the relay reads is bounded by the
stream's HTTP/2 window (``stream_window_kb``) and counted with the message
the relay waits to pass on. A message gRPC is still receiving counts as an
arrival (:mod:`guard.server.arrivals`), as a unary request does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc

from guard.server.gate import Held, Refusal
from guard.server.handler import (
    GRPC_COPIES,
    Call,
    Metadata,
    ServerState,
    forwardable,
    sendable,
    upstream_details,
    upstream_timeout,
)
from guard.server.methods import MethodInfo

__all__ = ["StreamRelay"]

# gRPC hands a stream's reader EOF when its client half-closes and also when
# the call is cancelled (the client cancelled, its deadline passed, or a
# message over max_request_mb); the handler's cancellation follows 0.3-0.5 ms
# later. The half-close is passed on only once that has had time to come: an
# upload cut short must reach the upstream as a reset, never as its end.
_HALF_CLOSE_SETTLE_S = 0.02


class _Stream:
    """What the two directions of one relayed call share: when a message last
    moved, either way, and why the guard ended the call (set before it
    cancels the upstream call)."""

    __slots__ = ("ended", "last", "writing")

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.ended: tuple[Refusal, str, grpc.StatusCode | None] | None = None
        self.writing = False
        """Whether a message waits on the client to take it."""

    def touch(self) -> None:
        self.last = time.monotonic()

    def end(
        self,
        upstream_call: Any,
        reason: Refusal,
        details: str,
        status: grpc.StatusCode | None = None,
    ) -> None:
        if self.ended is None:
            self.ended = (reason, details, status)
        upstream_call.cancel()


_T = TypeVar("_T")
_Status = tuple[grpc.StatusCode, str, Any]
"""A call's code, details and trailing metadata (``grpc.aio.Metadata``)."""


def _at_once(coroutine: Coroutine[Any, Any, _T]) -> _T | None:
    """What ``coroutine`` returns where it does not wait (a done call's
    status), else ``None``."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    except Exception:  # run inside gRPC's status handling: nothing may escape
        return None
    coroutine.close()
    return None


class _Ended:
    """The status the upstream ended a call with, as first set.

    Where a write fails because the call has just ended, grpc.aio sets
    INTERNAL "Internal error from Core" over the status it had set a moment
    before (grpc/grpc#36066): a relayed call to a method the upstream does
    not serve got it one time in three instead of UNIMPLEMENTED. grpc.aio
    runs the done callbacks once, as the first status is set: they see the
    upstream's there. Where the write fails first (an error the upstream
    sends after messages, as the next one is written: 2 to 12 calls in 150),
    grpc.aio's status is the only one Python ever sees, and goes on as it is."""

    __slots__ = ("status",)

    def __init__(self, upstream_call: Any) -> None:
        self.status: _Status | None = None
        upstream_call.add_done_callback(self._first)

    def _first(self, upstream_call: Any) -> None:
        if self.status is not None:
            return
        code = _at_once(upstream_call.code())
        details = _at_once(upstream_call.details())
        trailers = _at_once(upstream_call.trailing_metadata())
        if code is not None and details is not None and trailers is not None:
            self.status = (code, details, trailers)

    async def read(self, upstream_call: Any, code: grpc.StatusCode) -> _Status:
        """The call's status: as first set, else as it reads now."""
        if self.status is not None:
            return self.status
        return code, await upstream_call.details(), await upstream_call.trailing_metadata()


class _ConnectionGone(Exception):
    """Something could not be sent: the call had ended (its deadline passed,
    or its connection is closed)."""


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A side of the relay that failed (its call ended) has nothing more to say:
    the status the client gets comes from the upstream call."""
    if not task.cancelled():
        task.exception()


class StreamRelay:
    """Relays streaming calls between a client and the upstream."""

    def __init__(self, server: ServerState) -> None:
        self._server = server

    async def relay(self, info: MethodInfo, _requests: Any, context: Any) -> None:
        """Relay one call (grpc.aio's stream-stream handler signature)."""
        server = self._server
        call = Call(server.metrics, info.label)
        peer = context.peer()  # empty once its connection is gone
        try:
            received = context.invocation_metadata()  # a new tuple on each call: read once
            problem = server.gate.metadata_problem(received)
            if problem is not None:
                await call.refuse(context, Refusal.METADATA, problem)
            refused = server.gate.admit_stream()
            if refused is not None:
                await call.refuse(context, *refused)
            call.hold(server.gate.release_stream)
            await self._run(info, forwardable(received), context, call)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                call.ended_by_client(context, server.was_cut(peer, call.start))
            # gRPC keeps an ended call's exception, and with it every frame it
            # passed, until a cyclic collection: with them the pump's task and
            # the message it was passing on (a burst of 48 relayed 31 MB
            # messages left 263 MB in use, and the arrivals watch refused
            # every call after it).
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            call.finish()

    async def _run(self, info: MethodInfo, metadata: Metadata, context: Any, call: Call) -> None:
        upstream_call = self._server.upstream.stream_stream(info.name)(
            timeout=upstream_timeout(context.time_remaining()), metadata=metadata
        )
        ended = _Ended(upstream_call)
        stream = _Stream()
        held = Held(self._server.gate)
        context.add_done_callback(held.release_all)
        t_up = time.perf_counter()
        pump = asyncio.ensure_future(self._requests(context, upstream_call, stream, held))
        watch = asyncio.ensure_future(self._watch(stream, upstream_call, context))
        for task in (pump, watch):
            task.add_done_callback(_retrieve)
        try:
            await self._responses(upstream_call, context, stream, held)
            code = await upstream_call.code()
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        except _ConnectionGone:
            call.ended_under_send(context)
            return
        except asyncio.CancelledError:
            # gRPC raises it from a call cancelled here; only the guard's own
            # cancellations, which say why, are answered here.
            current = asyncio.current_task()
            if stream.ended is None or (current is not None and current.cancelling()):
                raise
            code = grpc.StatusCode.CANCELLED
        finally:
            call.upstream_s = time.perf_counter() - t_up
            for task in (pump, watch):
                task.cancel()
            upstream_call.cancel()
        if stream.ended is not None:
            await call.refuse(context, *stream.ended)
        await self._finish(upstream_call, await ended.read(upstream_call, code), context, call)

    async def _requests(
        self, context: Any, upstream_call: Any, stream: _Stream, held: Held
    ) -> None:
        """Client to upstream, then the client's half-close. While a message
        waits on the upstream, the guard reads nothing more, and the client's
        next ones fill the stream's window: counted with the message."""
        task = asyncio.current_task()
        assert task is not None
        try:
            await self._pump(context, upstream_call, stream, held)
        except asyncio.CancelledError:
            # The arrivals watch may cancel a read that has just ended: the
            # cancellation lands at the next wait.
            if not self._server.arrivals.was_shed(task):
                raise
            stream.end(upstream_call, Refusal.INFLIGHT_BYTES, self._server.arrivals.problem())

    async def _pump(self, context: Any, upstream_call: Any, stream: _Stream, held: Held) -> None:
        while True:
            message = await self._next(context, upstream_call, stream)
            if message is None:
                return
            if message is grpc.aio.EOF:
                await asyncio.sleep(_HALF_CLOSE_SETTLE_S)  # a cancelled call cancels this task
                await upstream_call.done_writing()
                return
            size = self._hold(message, stream, held, upstream_call, "the client's next message")
            if size is None:
                return
            await upstream_call.write(message)
            held.give_back(size)

    async def _next(self, context: Any, upstream_call: Any, stream: _Stream) -> Any:
        """The client's next message, or EOF, as for a unary request: gRPC
        reads a message whole before handing it over, so while it arrives the
        stream counts as receiving for the arrivals watch, which may refuse
        it (by cancelling this task); ``None`` where it is refusing new
        arrivals (the stream is ended)."""
        arrivals = self._server.arrivals
        task = asyncio.current_task()
        assert task is not None
        if not arrivals.admit():
            stream.end(upstream_call, Refusal.INFLIGHT_BYTES, arrivals.problem())
            return None
        arrivals.begin(task)
        try:
            return await context.read()
        finally:
            arrivals.end(task)

    async def _responses(
        self, upstream_call: Any, context: Any, stream: _Stream, held: Held
    ) -> None:
        """Upstream to client: its initial metadata first, then each message,
        counted in the budget until the client has taken it; the call is
        ended where the budget cannot take the next one. While the relay
        waits on its client it reads nothing, so the upstream's window fills
        too: that is counted with the message."""
        # Sent even when empty: a client may wait for the upstream's headers
        # before it sends (they were held until the first message, a deadlock).
        initial = sendable(await upstream_call.initial_metadata(), "initial")
        try:
            await context.send_initial_metadata(initial)
        except Exception:  # grpc's ExecuteBatchError: the call ended as they came
            raise _ConnectionGone from None
        while True:
            message = await upstream_call.read()
            if message is grpc.aio.EOF:
                return
            size = self._hold(message, stream, held, upstream_call, "the upstream's answer")
            if size is None:
                return
            stream.writing = True
            try:
                await context.write(message)
            except Exception:  # grpc's ExecuteBatchError: the connection is gone
                raise _ConnectionGone from None
            stream.writing = False
            held.give_back(size)

    def _hold(
        self, message: bytes, stream: _Stream, held: Held, upstream_call: Any, what: str
    ) -> int | None:
        """Count ``message`` (twice: gRPC's copy) and the stream's window,
        which the other side fills while the relay waits on this one, in the
        budget; the bytes counted, or ``None`` where the budget cannot take
        them (the stream is ended)."""
        stream.touch()
        size = GRPC_COPIES * len(message) + self._server.config.stream_window_bytes
        refused = self._server.gate.answer_problem(size, held.size, what)
        if refused is not None:
            stream.end(upstream_call, *refused)
            return None
        held.take(size)
        return size

    async def _watch(self, stream: _Stream, upstream_call: Any, context: Any) -> None:
        """End a stream on which nothing moved for stream_idle_timeout_s. One
        whose message waits on a client that takes nothing cannot be ended
        (its status would queue behind the message): its connection is
        closed."""
        limit = self._server.config.stream_idle_timeout_s
        while time.monotonic() - stream.last < limit:
            await asyncio.sleep(max(limit - (time.monotonic() - stream.last), 0.0) + 0.01)
        if stream.writing:
            self._server.cut_connection(
                context,
                f"its client did not take a message of a stream whole within "
                f"stream_idle_timeout_s ({limit:g} s)",
            )
            return
        stream.end(
            upstream_call,
            Refusal.STREAM_IDLE,
            f"guard: no message moved on this stream for stream_idle_timeout_s ({limit:g} s); "
            "raise stream_idle_timeout_s in the guard config for longer pauses",
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )

    async def _finish(
        self,
        upstream_call: Any,
        status: _Status,
        context: Any,
        call: Call,
    ) -> None:
        """End the client's call as the upstream ended it."""
        code, details, received = status
        trailers = sendable(received, "trailing")
        if code is not grpc.StatusCode.OK:
            details = upstream_details(code, details, self._server)
            await self._fail_with_initial(upstream_call, code, details, trailers, context, call)
        if trailers:
            context.set_trailing_metadata(trailers)
        call.count("OK")

    async def _fail_with_initial(
        self,
        upstream_call: Any,
        code: grpc.StatusCode,
        details: str,
        trailers: Metadata,
        context: Any,
        call: Call,
    ) -> None:
        if code is grpc.StatusCode.UNAVAILABLE:
            self._server.upstream.suspect()
        initial = sendable(await upstream_call.initial_metadata(), "initial")
        if initial:
            with contextlib.suppress(Exception):  # sent already with the first message
                await context.send_initial_metadata(initial)
        await call.fail(context, code, details or "", trailers)
