"""The HTTP layer of the REST front-end: aiohttp's server with the guard's own
answers to requests its parser refuses, answers sent within the budget and
``stream_idle_timeout_s``, and the headers a proxy must not forward.

aiohttp's parser stops reading a header line past ``max_field_size`` and a
request with more than ``max_headers`` headers; both are set a little above
``max_metadata_kb``/``max_metadata_entries``, whose exact check (the gate's)
answers first with the setting's name. What the parser itself refuses gets a
JSON error too, and is counted, never aiohttp's plain-text page.

aiohttp writes an answer whole and then waits, without limit, for the client
to take it: a client that reads nothing held each answer (twice) for as long
as it kept the connection open. Here an answer larger than a chunk is written
chunk by chunk, counted in the gate's budget until it is written, and every
answer must make progress within ``stream_idle_timeout_s``, or its connection
is cut (counted as ``stream_idle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from multidict import CIMultiDict

from guard.control.config import Config
from guard.metrics.guard_metrics import OTHER, GuardMetrics
from guard.server.deadlines import Deadlines
from guard.server.gate import Gate, Held, Refusal
from guard.server.rest.call import REST, AsGivenStream, RestCall, error_body, error_response
from guard.server.rest.routes import code_of_status

__all__ = [
    "HttpServer",
    "forward_headers",
    "request_factory",
    "reset",
    "response_headers",
]

_HEADER_SLACK = 1024
_HEADERS_SLACK = 8
_KEEPALIVE_S = 75.0
CHUNK = 64 * 1024
"""The most of an answer handed to the transport at once (aiohttp's own
buffer limit): a larger one waits for the client to take the last."""
# What the transport may hold with the answer (its head aside) and stay under
# asyncio's high-water mark (64 KiB), past which aiohttp waits for the client.
_CANNOT_BLOCK = CHUNK // 2

# RFC 9110 7.6.1: headers of one connection, never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip


# Expect: the guard already took the whole body (and answered 100-continue); the
# client's length is set again for the upstream, and its Host (in its place).
_REQUEST_DROP = _HOP_BY_HOP | {"content-length", "expect"}
_RESPONSE_DROP = _HOP_BY_HOP | {"content-length"}


def _kept(headers: Any, drop: frozenset[str]) -> CIMultiDict[str]:
    """``headers`` less those in ``drop`` and those their Connection header names."""
    if "Connection" in headers:
        named = {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")}
        drop = drop | named
    # A copy less a dozen names: 0.7 us, where filtering each header took 1.8.
    kept: CIMultiDict[str] = CIMultiDict(headers)
    for name in drop:
        if name in kept:
            del kept[name]  # every value of it
    return kept


def forward_headers(headers: Any, host: str, length: int | None) -> CIMultiDict[str]:
    """The client's headers that go on to the upstream, with its ``Host``
    and the body's ``length`` (none when ``None``)."""
    kept = _kept(headers, _REQUEST_DROP)
    kept["Host"] = host  # where the client's was, if it sent one
    if length is not None:
        kept["Content-Length"] = str(length)
    return kept


def response_headers(headers: Any, keep_length: bool = False) -> CIMultiDict[str]:
    """The upstream's headers that go back to the client; never its own
    ``x-guard-*``, which only the guard writes (an upstream's
    ``x-guard-action: clean`` reached clients on answers no rule read)."""
    kept = _kept(headers, _HOP_BY_HOP if keep_length else _RESPONSE_DROP)
    for name in {n.lower() for n in kept if n[:8].lower() == "x-guard-"}:
        del kept[name]
    return kept


# SO_LINGER on, with no time to linger: close() sends RST, not FIN.
_NO_LINGER = struct.pack("ii", 1, 0)


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Break a connection off with a TCP reset, whatever its transport holds.
    A FIN reads as the end of an answer without a length (HTTP/1.0, or one
    delimited by the close): a client took the first bytes of a broken-off
    answer for the whole of it."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    assert isinstance(transport, asyncio.WriteTransport)
    transport.abort()


def request_factory(client_max_size: int) -> Any:
    """aiohttp's request factory, with the body limit the guard's config sets."""

    def make(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        loop = asyncio.get_running_loop()
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=client_max_size
        )

    return make


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses in JSON,
    and closing a connection whose next request's headers do not arrive within
    ``request_timeout_s``: of the connection's start for the first request, of
    the first byte of the next one on a kept-alive connection (aiohttp itself
    would wait for ever, or until its keep-alive timeout)."""

    guard_metrics: GuardMetrics
    guard_config: Config
    guard_gate: Gate
    guard_deadlines: Deadlines
    guard_server: HttpServer
    _guard_timer: asyncio.TimerHandle | None = None
    _guard_armed_at = 0
    """The request count when the timer was armed: the head it waits for is the next."""

    _guard_counted = False
    """Whether this connection holds one of ``max_connections``."""
    _guard_silent = True
    """Whether the client has sent nothing yet on this connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self.guard_server
        if server.open_connections >= self.guard_config.max_connections:
            self._refuse_connection(transport)
            return
        server.open_connections += 1
        self._guard_counted = True
        self._arm_header_deadline(transport)

    def _refuse_connection(self, transport: asyncio.BaseTransport) -> None:
        """Answer 503 at once, saying why, and close: the listener holds
        ``max_connections`` already."""
        self._refuse_raw(
            transport, Refusal.CONNECTIONS, 503, "Service Unavailable",
            f"guard: the REST listener holds max_connections ({self.guard_config.max_connections}) "
            "connections already; retry with backoff, reuse connections, or raise "
            "max_connections in the guard config",
        )  # fmt: skip

    def _refuse_raw(
        self, transport: asyncio.BaseTransport, refusal: Refusal, status: int, reason: str,
        message: str,
    ) -> None:  # fmt: skip
        """Count a refusal made before any request was read, write the
        guard's JSON error on the raw transport, and close it."""
        self.guard_metrics.record_refusal(refusal.value)
        self.guard_metrics.record_request(REST, OTHER, OTHER, code_of_status(status))
        body = error_body(message)
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(head.encode() + body)
        transport.close()

    def data_received(self, data: bytes) -> None:
        self._guard_silent = False
        count = self._request_count
        super().data_received(data)
        if self._guard_timer is not None and self._guard_armed_at == self._request_count:
            return  # armed for the head in progress: the common case on a busy connection
        waiting = self._waiter is not None and not self._waiter.done()
        if (waiting or self._next_head_begun(count, data)) and self.transport is not None:
            # A kept-alive connection's next head, maybe begun while the
            # deadline of the last one still ran: its own deadline from now.
            if self._guard_timer is not None:
                self._guard_timer.cancel()
            self._arm_header_deadline(self.transport)

    def _next_head_begun(self, count: int, data: bytes) -> bool:
        """Bytes came while a request is handled, past its body, and no new
        head is whole: the next one has begun, and its deadline runs (a
        pipelined head left half-sent held its connection 80 s, not 10)."""
        if not data or not self._request_in_progress or self._request_count != count:
            return False
        current = self._current_request  # None once its answer is being sent
        return current is None or current.content.is_eof()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
        if self._guard_counted:
            self._guard_counted = False
            self.guard_server.open_connections -= 1
        super().connection_lost(exc)

    def _arm_header_deadline(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        self._guard_armed_at = self._request_count
        self._guard_timer = loop.call_later(
            self.guard_config.request_timeout_s, self._headers_late, transport
        )

    def _headers_late(self, transport: asyncio.BaseTransport) -> None:
        self._guard_timer = None  # a re-armed deadline cancels the one before: this is the last
        if self._request_count > self._guard_armed_at or transport.is_closing():
            return
        if self._request_in_progress:  # the head waits on the answer before it, not the client
            self._arm_header_deadline(transport)
            return
        if self._guard_silent:
            # A connection opened ahead of use (load balancers, HTTP clients'
            # preconnect), as a gRPC one that sends nothing: closed, and not
            # a request timed out (it counted a 408 in the error ratio).
            transport.close()
            return
        self._refuse_raw(
            transport, Refusal.REQUEST_TIMEOUT, 408, "Request Timeout",
            f"guard: the request's headers did not arrive within request_timeout_s "
            f"({self.guard_config.request_timeout_s:g} s); send them at once, or raise "
            "request_timeout_s",
        )  # fmt: skip

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """Send ``resp`` (a large one chunk by chunk, counted in the budget),
        cutting the connection where the client takes nothing of it for
        ``stream_idle_timeout_s``. An answer that leaves the transport under
        its high-water mark is never waited on, and goes as aiohttp sends it."""
        call = resp.guard_call if isinstance(resp, AsGivenStream) else None
        body = resp.body if isinstance(resp, web.Response) else None
        size = len(body) if isinstance(body, bytes) else 0
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() + size <= _CANNOT_BLOCK:
            # Below the transport's high-water mark aiohttp never waits: no deadline to keep.
            if call is not None:
                call.sent()
            return await super().finish_response(request, resp, start_time)
        timeout = self.guard_config.stream_idle_timeout_s
        try:
            if isinstance(body, bytes) and size > CHUNK and request.method != "HEAD":
                resp = await self._send_in_chunks(request, resp, body, timeout, call)
            elif call is not None:
                call.sent()  # handed to the transport whole
            return await self.guard_deadlines.wait(
                super().finish_response(request, resp, start_time), timeout
            )
        except TimeoutError:
            self.guard_metrics.record_refusal(Refusal.STREAM_IDLE.value)
            if call is not None:
                call.sent("UNAVAILABLE")  # as a streamed answer cut so is counted
            reset(self.transport)  # what it holds of the answer goes too
            return resp, True
        except BaseException:
            if call is not None:
                call.sent("CANCELLED")  # the client went away before it had the answer
            raise

    async def _send_in_chunks(
        self,
        request: web.BaseRequest,
        resp: web.StreamResponse,
        body: bytes,
        timeout: float,
        call: RestCall | None,
    ) -> web.StreamResponse:
        """``resp`` with ``body`` written a chunk at a time, each within
        ``timeout``; ``call`` counted as the last chunk is handed over."""
        out = AsGivenStream(status=resp.status, reason=resp.reason, headers=resp.headers)
        out.content_length = len(body)
        if not resp.keep_alive:
            out.force_close()
        held = Held(self.guard_gate)
        held.take(len(body))
        try:
            wait = self.guard_deadlines.wait
            await wait(out.prepare(request), timeout)
            view = memoryview(body)
            for start in range(0, len(body), CHUNK):
                if start + CHUNK >= len(body):
                    # The client may have it all before this write returns,
                    # and scrape at once: counted, and the budget given back.
                    held.release_all()
                    if call is not None:
                        call.sent()
                await wait(out.write(view[start : start + CHUNK]), timeout)
            await wait(out.write_eof(), timeout)
        finally:
            held.release_all()
        return out

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            if isinstance(exc, ConnectionResetError):  # the guard broke it off, counted
                reset(self.transport)  # before force_close, which closes it cleanly
                self.force_close()
                raise ConnectionError("the answer was broken off") from None
            return super().handle_error(request, status, exc, message)
        metrics, config = self.guard_metrics, self.guard_config
        said = str(message or exc or "").lower()
        if isinstance(exc, LineTooLong) or any(words in said for words in _TOO_MUCH):
            status, text = 431, _too_much_metadata(config)
            metrics.record_refusal(Refusal.METADATA.value)
        elif status == 500:
            self.log_exception("REST request failed", exc_info=exc)
            text = "guard: internal error while handling the request; see the guard's log"
        else:
            text = _malformed(exc, str(message or exc or status))
        metrics.record_request(REST, OTHER, OTHER, code_of_status(status))
        response = error_response(status, text)
        response.force_close()
        return response


# The parser's errors that carry the client's own bytes (the target, a method,
# a header), in words that do not: aiohttp's Python parser words most of its
# errors so, and both parsers a target that is not a URL.
_MALFORMED_WORDS: tuple[tuple[type[Exception], str], ...] = (
    (InvalidURLError, "the request target is not a valid URL"),
    (BadHttpMethod, "the method is not a valid HTTP method"),
    (InvalidHeader, "a header is malformed"),
    (BadStatusLine, "the request line is malformed"),
    (TransferEncodingError, "the chunked body is malformed"),
    (ContentLengthError, "the Content-Length is malformed"),
)


def _malformed(exc: BaseException | None, said: str) -> str:
    """What is wrong with a request, never the client's bytes quoted back:
    llhttp's first line is its reason, and the lines after it quote the
    request (its body among them) with a caret under them."""
    for kind, words in _MALFORMED_WORDS:
        if isinstance(exc, kind):
            return f"guard: malformed HTTP request: {words}"
    reason = said.strip().splitlines()[0] if said.strip() else "unreadable"
    if reason.startswith("Pause on PRI"):  # llhttp at HTTP/2's preface: a gRPC client
        return (
            "guard: this is the guard's REST port (HTTP/1.1); send gRPC to its gRPC port (listen)"
        )
    return f"guard: malformed HTTP request: {reason}"


# What the parsers (aiohttp's and llhttp) say of headers past their limits; a
# malformed header is a 400 with the parser's words, not a limit to raise.
_TOO_MUCH = ("too many headers", "header overflow", "too long", "too large")


def _too_much_metadata(config: Config) -> str:
    return (
        f"guard: the request's URL or headers are larger than max_metadata_kb "
        f"({config.max_metadata_kb} KiB), or its headers more than max_metadata_entries "
        f"({config.max_metadata_entries}); send less, or raise those limits in the guard config"
    )


class HttpServer(web.Server):
    """aiohttp's low-level server with :class:`_Handler` per connection and the
    guard's parser limits."""

    def __init__(
        self, handler: Any, config: Config, metrics: GuardMetrics, gate: Gate, **kwargs: Any
    ) -> None:
        super().__init__(
            handler,
            handler_cancellation=True,
            access_log=None,
            auto_decompress=False,
            keepalive_timeout=min(_KEEPALIVE_S, config.max_connection_idle_s),
            max_line_size=config.max_metadata_kb * 1024 + _HEADER_SLACK,
            max_field_size=config.max_metadata_kb * 1024 + _HEADER_SLACK,
            max_headers=config.max_metadata_entries + _HEADERS_SLACK,
            **kwargs,
        )
        self.config = config
        self.metrics = metrics
        self._guard_gate = gate
        self._guard_deadlines = Deadlines()
        self.open_connections = 0
        """Client connections held (refused ones are not counted)."""
        self.handshakes = 0
        """Connections in their TLS handshake (:mod:`guard.server.rest.accept`)."""

    def __call__(self) -> web.RequestHandler:
        handler = _Handler(self, loop=self._loop, **self._kwargs)
        handler.guard_metrics = self.metrics
        handler.guard_config = self.config
        handler.guard_gate = self._guard_gate
        handler.guard_deadlines = self._guard_deadlines
        handler.guard_server = self
        return handler
