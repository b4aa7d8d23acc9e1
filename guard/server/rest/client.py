"""The REST front-end's client to ``rest_upstream``: kept-alive HTTP/1.1
connections to one plain-HTTP address, each read by aiohttp's own client
protocol and its C response parser.

aiohttp's ``ClientSession`` spent about 50 us of Python on every call on what
a proxy to one upstream does not use (redirects, cookies, proxies, auth,
traces, middlewares, merging headers into new dicts): the raw aiohttp
passthrough took 116 us of CPU per 1x1 predict with it, 66 us with its
protocol and parser driven directly (``docs/benchmarks.md``). What this keeps
of aiohttp: :class:`~aiohttp.client_proto.ResponseHandler` (the parser, the
body's stream, the errors of a connection lost) and its exceptions. Request
heads are written here (:func:`request_head`), with the bytes the client sent.

Each request is sent whole, with ``Content-Length``, on the most recently
used idle connection or a new one. A connection goes back to the idle pool
only when its answer was read to the end and nothing else came on it: an
upstream that wrote a second answer unasked would have had it read as the
next call's (a connection that received bytes while idle is closed when it
is next taken). Idle connections are closed after ``keepalive_s``; at most
``max_idle`` are kept. Connections in use are bounded by the calls in flight
(each REST call holds a slot of the gate while it has one), not here.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections import deque
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp.client_exceptions import ClientOSError, ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from guard.server.deadlines import Deadlines
from guard.server.rest.heads import head_bytes

__all__ = [
    "KEEPALIVE_S", "UpstreamAnswer", "UpstreamClient", "UpstreamUnreachable", "get_limited",
    "read_limited", "request_head",
]  # fmt: skip

T = TypeVar("T")

KEEPALIVE_S = 15.0
"""How long an idle upstream connection is kept (aiohttp's connector's default)."""

# Smaller bodies go out in one write with the head; a larger one is not
# copied to be joined to it (Python 3.11's writelines joins).
_JOIN_BELOW = 64 * 1024
_INFORMATIONAL = range(100, 200)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def request_head(method: str, target: str, headers: CIMultiDict[str]) -> bytes:
    """A request's head, with the bytes the client sent (:mod:`.heads`);
    ``ValueError`` for a control character."""
    return head_bytes(f"{method} {target} HTTP/1.1", headers.items())


class UpstreamUnreachable(Exception):
    """No connection to the upstream could be made."""

    def __init__(self, error: OSError) -> None:
        self.reason = _reason(error)
        super().__init__(self.reason)


def _reason(error: OSError) -> str:
    """``Connection refused``, not asyncio's ``Connect call failed (ADDRESS)``
    (the address is named where the error is reported)."""
    if isinstance(error, socket.gaierror) or not error.errno or error.errno < 0:
        return error.strerror or str(error)
    return os.strerror(error.errno)


class UpstreamAnswer:
    """The head of an upstream's answer and its body as it arrives. Its
    connection is the call's until :meth:`release`."""

    __slots__ = ("status", "reason", "headers", "content", "_proto", "_client", "_until")

    def __init__(
        self,
        client: UpstreamClient,
        proto: ResponseHandler,
        message: Any,
        content: StreamReader,
        until: float,
    ) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content
        self._proto: ResponseHandler | None = proto
        self._client = client
        self._until = until

    @property
    def content_length(self) -> int | None:
        """The declared length (the parser refused an invalid one)."""
        length = self.headers.get("Content-Length")
        return None if length is None else int(length)

    async def timed(self, awaitable: Awaitable[T]) -> T:
        """``await awaitable`` (a read of the body) within what is left of
        the call's time; :class:`TimeoutError` past it, at once: a body that
        keeps coming has a read to give each time, and took each one's new
        tick as more time (a 1.5 s limit let 12 s of answer through)."""
        left = self._until - asyncio.get_running_loop().time()
        if left <= 0:
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # never awaited: no warning that it was not
            raise TimeoutError
        return await self._client.deadlines.wait(awaitable, left)

    async def read(self, n: int) -> bytes:
        """At most ``n`` bytes of the body, within the call's time; b"" at its end."""
        content = self.content
        if content.is_eof():  # all of it came: nothing to wait for
            return content.read_nowait(n)
        return await self.timed(content.read(n))

    def release(self) -> None:
        """Give the connection back: to the idle pool if the answer was read
        whole and nothing else came, else closed."""
        proto, self._proto = self._proto, None
        if proto is not None:
            self._client.put_back(proto, reusable=self.content.at_eof())


class UpstreamClient:
    """Requests to one ``host:port`` over kept-alive connections (event loop only)."""

    def __init__(
        self,
        address: str,
        deadlines: Deadlines,
        timeout_s: float,
        max_idle: int,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self.deadlines = deadlines
        self._host, self._port = host.strip("[]"), int(port)
        self._timeout_s = timeout_s
        self._max_idle = max_idle
        self._keepalive_s = keepalive_s
        self._idle: deque[tuple[ResponseHandler, float]] = deque()  # the newest on the right
        self._busy: set[ResponseHandler] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections idle or in use."""
        return len(self._idle) + len(self._busy)

    async def request(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes | None
    ) -> UpstreamAnswer:
        """Send a request (``headers`` as they go, Host and length included)
        and return its answer's head, all within the client's ``timeout_s``:
        :class:`TimeoutError` past it, :class:`UpstreamUnreachable` where no
        connection could be made, aiohttp's errors for an answer that is
        malformed or broken off (``HttpProcessingError``, ``ClientError``)."""
        if self._closed:
            raise UpstreamUnreachable(ConnectionAbortedError("the guard is shutting down"))
        head = request_head(method, target, headers)
        until = asyncio.get_running_loop().time() + self._timeout_s
        send = self._exchange(method, head, body, until)
        return await self.deadlines.wait(send, self._timeout_s)

    async def _exchange(
        self, method: str, head: bytes, body: bytes | None, until: float
    ) -> UpstreamAnswer:
        """Send on a kept-alive connection; where it turns out closed before
        any answer came, an idempotent request goes again, once, on a new
        one (RFC 9112 9.3.1): an upstream that closed an idle connection as
        a request went out on it. Other requests may have run: not resent."""
        proto, reused = await self._connection()
        try:
            return await self._send(proto, method, head, body, until)
        except (ServerDisconnectedError, ClientOSError):
            if not reused or method not in _IDEMPOTENT or self._closed:
                raise
        proto, _ = await self._connection(fresh=True)
        return await self._send(proto, method, head, body, until)

    async def _send(
        self, proto: ResponseHandler, method: str, head: bytes, body: bytes | None, until: float
    ) -> UpstreamAnswer:
        self._busy.add(proto)
        try:
            proto.set_response_params(
                skip_payload=method == "HEAD", read_until_eof=True, auto_decompress=False
            )
            transport = proto.transport
            assert transport is not None
            if body and len(body) >= _JOIN_BELOW:
                transport.write(head)
                transport.write(body)
            else:
                transport.write(head + body if body else head)
            message, content = await proto.read()
            while message.code in _INFORMATIONAL and message.code != 101:
                message, content = await proto.read()  # 100 Continue, 103 Early Hints
        except BaseException:
            self._busy.discard(proto)
            proto.close()
            raise
        return UpstreamAnswer(self, proto, message, content, until)

    async def _connection(self, fresh: bool = False) -> tuple[ResponseHandler, bool]:
        """The newest idle connection still usable (unless ``fresh``), or a
        new one; and whether it was kept from an earlier request."""
        while self._idle and not fresh:
            proto, _ = self._idle.pop()
            if proto.is_connected() and not proto.should_close:
                return proto, True
            proto.close()  # closed by the upstream, or it sent something unasked
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(
                lambda: ResponseHandler(loop), self._host, self._port
            )
        except OSError as exc:
            raise UpstreamUnreachable(exc) from None
        if self._closed:  # shut down while it connected
            proto.close()
            raise UpstreamUnreachable(ConnectionAbortedError("the guard is shutting down"))
        return proto, False

    def put_back(self, proto: ResponseHandler, reusable: bool) -> None:
        """End a request's use of ``proto``; keep it if it can take another."""
        self._busy.discard(proto)
        transport = proto.transport
        keep = (
            reusable
            and not self._closed
            and len(self._idle) < self._max_idle
            and transport is not None
            and not transport.is_closing()
            # An answer that came before all of its request was sent: the
            # rest would go ahead of the next request's head.
            and not transport.get_write_buffer_size()
            and not proto.should_close
        )
        if not keep:
            proto.close()
            return
        loop = asyncio.get_running_loop()
        self._idle.append((proto, loop.time()))
        if self._expiry is None:
            self._expiry = loop.call_later(self._keepalive_s, self._expire)

    def _expire(self) -> None:
        """Close the connections idle for ``keepalive_s``; time the next."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        horizon = loop.time() - self._keepalive_s
        while self._idle and self._idle[0][1] <= horizon:
            self._idle.popleft()[0].close()
        if self._idle:
            self._expiry = loop.call_at(self._idle[0][1] + self._keepalive_s, self._expire)

    def close(self) -> None:
        """Close every connection, idle or in use: a call still waiting on
        one gets a lost connection (``ServerDisconnectedError``), or a body
        broken off (``ClientPayloadError``) where its answer had begun."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for proto, _ in self._idle:
            proto.close()
        self._idle.clear()
        for proto in list(self._busy):
            # The transport, not the protocol: ResponseHandler.close() lets go
            # of the body being read first, and its reader then waited until
            # the drain's end was cancelled (no 503, and a streamed answer
            # ended cleanly, cut short).
            if proto.transport is not None:
                proto.transport.close()
        self._busy.clear()


async def read_limited(answer: UpstreamAnswer, limit: int) -> bytes | None:
    """The whole body, or ``None`` as soon as it is known to pass ``limit`` bytes."""
    if (answer.content_length or 0) > limit:
        return None  # the parser reads no more than the length it declared
    chunks: list[bytes] = []
    size = 0
    while chunk := await answer.read(limit + 1):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def get_limited(
    client: UpstreamClient, path: str, limit: int, what: str = "answer"
) -> tuple[int, bytes]:
    """GET ``path``: the answer's status and body, with ``Host`` only, read
    within the client's time; ``ValueError`` for a body past ``limit`` bytes
    (``what`` names it there)."""
    headers = CIMultiDict(Host=client.address)
    answer = await client.request("GET", path, headers, None)
    try:
        data = await read_limited(answer, limit)
    finally:
        answer.release()
    if data is None:
        raise ValueError(f"the {what} is larger than {limit} bytes")
    return answer.status, data
