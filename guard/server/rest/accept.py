"""Accepting REST connections over TLS: counted before the handshake, and timed.

With ``ssl=`` on the listening socket, asyncio makes each connection's TLS
state (then about 300 KB; see :data:`_TLS_READ_BYTES`) when it accepts it,
gives the handshake 60 s, and tells the HTTP layer of the connection only
once the handshake is done: 3,000 connections that sent half a ClientHello
took the guard to 984 MB, unseen by ``max_connections``. Here the listener is plain
TCP; a connection is counted at once, and only one under ``max_connections``
gets a handshake (``loop.start_tls``), which must end within
``request_timeout_s``. The HTTP handler then takes the TLS transport.

A client that sends plain HTTP to the TLS port gets a 400 that says so, as
nginx answers it, not a connection closed without a word (curl: "Empty reply
from server"): the connection's first byte is peeked at before the handshake.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import os
import socket
import ssl
from typing import Any

from aiohttp import web

from guard.metrics.guard_metrics import OTHER
from guard.server.gate import Refusal
from guard.server.rest.call import REST, error_body
from guard.server.rest.http import HttpServer
from guard.server.rest.routes import code_of_status

__all__ = ["TlsSite"]

_PLAIN_HTTP_STATUS = 400
_PLAIN_HTTP_BODY = error_body(
    "guard: this port takes HTTPS (TLS) and the request came as plain HTTP; "
    "send it with https:// in the URL"
)
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)
_TLS_READ_BYTES = 32 * 1024
"""What asyncio's TLS layer reads from a socket at once. Its buffer, of
``SSLProtocol.max_size`` bytes (256 KiB), is made and zeroed for each
connection as its handshake begins, and kept: 500 connections that sent one
byte took +151 MB, 2,048 (``max_connections``) would take 600 MB. A TLS
record holds at most 16 KiB."""
_LINGER_S = 2.0
"""How long the connection stays open after the 400, its input read and
dropped, for the client to read the answer (closed on unread input, the
connection would be reset, the answer with it)."""


def _looks_like_http(first: bytes) -> bool:
    """Whether a connection's first bytes are an HTTP request line (a method
    is upper-case letters), not a TLS record (0x16, a handshake)."""
    return first[:1].isupper()


async def _peek(transport: asyncio.Transport, timeout: float) -> bytes | None:
    """The connection's first bytes, left for the handshake to read; ``b""``
    where the client closed it first; ``None`` where no descriptor was left
    to peek with (the handshake goes on without the peek). The transport
    reads nothing meanwhile: a twin of its socket waits for them."""
    try:
        fileno = os.dup(transport.get_extra_info("socket").fileno())
    except OSError:
        return None  # out of descriptors: such connections were reset, unseen
    transport.pause_reading()
    loop = asyncio.get_running_loop()
    with socket.socket(fileno=fileno) as twin:
        twin.setblocking(False)
        readable = loop.create_future()
        loop.add_reader(twin.fileno(), _settle, readable)
        try:
            await asyncio.wait_for(readable, timeout)
        finally:
            loop.remove_reader(twin.fileno())
        return twin.recv(8, socket.MSG_PEEK)


def _settle(readable: asyncio.Future[None]) -> None:
    if not readable.done():
        readable.set_result(None)


class _Handshake(asyncio.Protocol):
    """One accepted connection until its handshake is done."""

    def __init__(self, http: HttpServer, context: ssl.SSLContext) -> None:
        self._http = http
        self._context = context
        self._early: list[bytes] = []  # data that came before the handler took over
        self._task: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        """Set once plain HTTP is answered: input is then read only to be dropped."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        http = self._http
        if http.open_connections + http.handshakes >= http.config.max_connections:
            http.metrics.record_refusal(Refusal.CONNECTIONS.value)
            transport.close()  # no TLS yet: nothing to say it in
            return
        http.handshakes += 1
        self._task = asyncio.ensure_future(self._begin(transport))

    async def _begin(self, transport: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._http.config.request_timeout_s
        try:
            try:
                first = await _peek(transport, deadline - loop.time())
            except (OSError, TimeoutError):
                first = b""
            if first is not None and not first:
                transport.abort()
            elif first is not None and _looks_like_http(first):
                await self._answer_plain_http(transport)
            else:  # a TLS record, or no descriptor to peek with (None)
                await self._handshake(transport, max(deadline - loop.time(), 0.001))
        finally:
            self._http.handshakes -= 1

    async def _handshake(self, transport: Any, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport, self, self._context, server_side=True, ssl_handshake_timeout=timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            transport.abort()
            return
        if tls is None:
            return
        handler = self._http()
        tls.set_protocol(handler)
        handler.connection_made(tls)
        for data in self._early:
            handler.data_received(data)

    async def _answer_plain_http(self, transport: Any) -> None:
        self._http.metrics.record_request(REST, OTHER, OTHER, code_of_status(_PLAIN_HTTP_STATUS))
        self._closed = asyncio.get_running_loop().create_future()
        transport.resume_reading()
        transport.write(_PLAIN_HTTP_ANSWER)
        transport.write_eof()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed, _LINGER_S)
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self._closed is None:
            self._early.append(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._closed is not None:
            _settle(self._closed)
        elif self._task is not None and not self._task.done():
            self._task.cancel()


class TlsSite(web.TCPSite):
    """aiohttp's TCP site, with the TLS handshake done by :class:`_Handshake`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        *,
        context: ssl.SSLContext,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._tls_context = context

    async def start(self) -> None:
        # The one knob there is: a class attribute, read for every read.
        asyncio.sslproto.SSLProtocol.max_size = _TLS_READ_BYTES
        await web.BaseSite.start(self)  # registers the site with its runner
        http = self._runner.server
        assert isinstance(http, HttpServer)
        context = self._tls_context
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Handshake(http, context), self._host, self._port,
            backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )  # fmt: skip
        with contextlib.suppress(IndexError):
            self._bound_port = self._server.sockets[0].getsockname()[1]
