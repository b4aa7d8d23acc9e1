"""Accepting REST connections over TLS: counted before the handshake, and timed.

With ``ssl=`` on the listening socket, asyncio makes each connection's TLS
state (a 256 KiB buffer, about 300 KB in all) when it accepts it, gives the
handshake 60 s, and tells the HTTP layer of the connection only once the
handshake is done: 3,000 connections that sent half a ClientHello took the
guard to 984 MB, unseen by ``max_connections``. Here the listener is plain
TCP; a connection is counted at once, and only one under ``max_connections``
gets a handshake (``loop.start_tls``), which must end within
``request_timeout_s``. The HTTP handler then takes the TLS transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from aiohttp import web

from guard.server.gate import Refusal
from guard.server.rest.http import HttpServer

__all__ = ["TlsSite"]


class _Handshake(asyncio.Protocol):
    """One accepted connection until its handshake is done."""

    def __init__(self, http: HttpServer, context: ssl.SSLContext) -> None:
        self._http = http
        self._context = context
        self._early: list[bytes] = []  # data that came before the handler took over
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        http = self._http
        if http.open_connections + http.handshakes >= http.config.max_connections:
            http.metrics.record_refusal(Refusal.CONNECTIONS.value)
            transport.close()  # no TLS yet: nothing to say it in
            return
        http.handshakes += 1
        self._task = asyncio.ensure_future(self._handshake(transport))

    async def _handshake(self, transport: Any) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._http.config.request_timeout_s
        try:
            tls = await loop.start_tls(
                transport, self, self._context, server_side=True, ssl_handshake_timeout=timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            transport.abort()
            return
        finally:
            self._http.handshakes -= 1
        if tls is None:
            return
        handler = self._http()
        tls.set_protocol(handler)
        handler.connection_made(tls)
        for data in self._early:
            handler.data_received(data)

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._task is not None and not self._task.done():
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
