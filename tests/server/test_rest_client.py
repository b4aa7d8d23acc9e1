"""guard.server.rest.client: the REST front-end's client to its upstream,
against a real TCP server on an ephemeral port that answers as it is
scripted, byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp.client_exceptions import ServerDisconnectedError
from aiohttp.http_exceptions import HttpProcessingError

from guard.server.deadlines import Deadlines
from guard.server.rest.client import UpstreamClient, UpstreamUnreachable, read_limited
from guard.server.rest.http import forward_headers

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# What the upstream does with each request it reads: the bytes to answer
# (None: close without answering).
Script = Callable[[int, bytes], Awaitable[bytes | None]]


class Upstream:
    """Reads each request (head and Content-Length body) and answers as
    ``script`` says; counts connections and keeps what it read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = await self.script(len(self.requests), request)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # cancelled: the test is over, and its loop closing
        finally:
            writer.close()


@asynccontextmanager
async def upstream(script: Script) -> AsyncIterator[Upstream]:
    up = Upstream(script)
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()


def client_of(
    up: Upstream, timeout_s: float = 5.0, max_idle: int = 4, keepalive_s: float = 15.0
) -> UpstreamClient:
    return UpstreamClient(f"127.0.0.1:{up.port}", Deadlines(), timeout_s, max_idle, keepalive_s)


async def fetch(client: UpstreamClient, method: str = "GET", body: bytes | None = None) -> bytes:
    headers = forward_headers({}, client.address, None if body is None else len(body))
    answer = await client.request(method, "/v1/models/m", headers, body)
    try:
        data = await read_limited(answer, 1 << 20)
    finally:
        answer.release()
    assert data is not None
    return data


async def answer_ok(n: int, request: bytes) -> bytes:
    return OK


async def test_requests_go_as_given_on_one_kept_alive_connection() -> None:
    async with upstream(answer_ok) as up:
        client = client_of(up, max_idle=4)
        assert [await fetch(client), await fetch(client, "POST", b"{}")] == [b"ok", b"ok"]
        assert up.connections == 1 and client.open_connections == 1
        host = f"127.0.0.1:{up.port}".encode()
        assert up.requests == [
            b"GET /v1/models/m HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
            b"POST /v1/models/m HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 2\r\n\r\n{}",
        ]
        client.close()


async def test_an_idempotent_request_goes_again_once_where_a_kept_connection_was_closed() -> None:
    """The upstream reads the second request and closes without a word (an
    idle timeout racing the request): a GET goes again on a new connection,
    a POST (it may have run) does not."""

    async def close_the_second(n: int, request: bytes) -> bytes | None:
        return None if n == 2 else OK

    async with upstream(close_the_second) as up:
        client = client_of(up, max_idle=4)
        assert await fetch(client) == b"ok"
        assert await fetch(client) == b"ok"  # read once, closed, sent again
        assert len(up.requests) == 3 and up.connections == 2
        client.close()

    async def close_every_second(n: int, request: bytes) -> bytes | None:
        return None if n % 2 == 0 else OK

    async with upstream(close_every_second) as up:
        client = client_of(up, max_idle=4)
        await fetch(client)
        with pytest.raises(ServerDisconnectedError):
            await fetch(client, "POST", b"{}")
        assert len(up.requests) == 2, "a POST is never sent twice"
        client.close()


async def test_a_new_connection_closed_before_its_answer_is_not_retried() -> None:
    async def close(n: int, request: bytes) -> bytes | None:
        return None

    async with upstream(close) as up:
        client = client_of(up, max_idle=4)
        with pytest.raises(ServerDisconnectedError):
            await fetch(client)
        assert len(up.requests) == 1 and client.open_connections == 0


async def test_idle_connections_expire_and_at_most_max_idle_are_kept() -> None:
    async def slow(n: int, request: bytes) -> bytes:
        await asyncio.sleep(0.05)
        return OK

    async with upstream(slow) as up:
        client = client_of(up, max_idle=2, keepalive_s=0.2)
        await asyncio.gather(*(fetch(client) for _ in range(5)))
        assert up.connections == 5 and client.open_connections == 2
        await asyncio.sleep(0.5)
        assert client.open_connections == 0
        await fetch(client)
        assert up.connections == 6
        client.close()


async def test_informational_answers_are_skipped() -> None:
    async def hints(n: int, request: bytes) -> bytes:
        return b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK

    async with upstream(hints) as up:
        client = client_of(up, max_idle=4)
        assert await fetch(client) == b"ok"
        client.close()


async def test_an_answer_that_is_not_http_is_the_parsers_error() -> None:
    async def garbage(n: int, request: bytes) -> bytes:
        return b"SSH-2.0-OpenSSH\r\n\r\n"

    async with upstream(garbage) as up:
        client = client_of(up, max_idle=4)
        with pytest.raises(HttpProcessingError):
            await fetch(client)
        assert client.open_connections == 0


async def test_an_upstream_that_does_not_answer_times_out_within_the_limit() -> None:
    async def never(n: int, request: bytes) -> bytes:
        await asyncio.sleep(30)
        return OK

    async with upstream(never) as up:
        client = client_of(up, timeout_s=0.2, max_idle=4)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await fetch(client)
        assert 0.2 <= time.monotonic() - start < 1.0
        assert client.open_connections == 0
        client.close()


async def test_a_body_that_stops_coming_times_out_within_the_calls_limit() -> None:
    async def half(n: int, request: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"

    async with upstream(half) as up:
        client = client_of(up, timeout_s=0.3, max_idle=4)
        headers = forward_headers({}, client.address, None)
        answer = await client.request("GET", "/", headers, None)
        assert await answer.read(100) == b"half"
        with pytest.raises(TimeoutError):
            await answer.read(100)
        answer.release()
        assert client.open_connections == 0  # not read to the end: closed
        client.close()


async def test_an_address_nobody_listens_on_is_unreachable() -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        client = UpstreamClient(f"127.0.0.1:{bound.getsockname()[1]}", Deadlines(), 5.0, max_idle=4)
        with pytest.raises(UpstreamUnreachable) as caught:
            await fetch(client)
    assert "refused" in caught.value.reason.lower()


async def test_close_ends_calls_waiting_and_refuses_new_ones() -> None:
    async def slow(n: int, request: bytes) -> bytes:
        await asyncio.sleep(30)
        return OK

    async with upstream(slow) as up:
        client = client_of(up, max_idle=4)
        waiting = asyncio.ensure_future(fetch(client))
        await asyncio.sleep(0.1)
        client.close()
        with pytest.raises(ServerDisconnectedError):
            await asyncio.wait_for(waiting, 2)
        with pytest.raises(UpstreamUnreachable):
            await fetch(client)
        assert client.open_connections == 0


async def test_a_connection_whose_request_was_not_all_sent_is_not_kept() -> None:
    """The upstream answers on the head alone and reads none of a 32 MiB
    body: what is still unsent would go ahead of the next request's head."""
    stalled: list[asyncio.StreamWriter] = []

    async def answer_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        stalled.append(writer)  # kept open, never read again

    server = await asyncio.start_server(answer_early, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = UpstreamClient(address, Deadlines(), 5.0, max_idle=4)
    body = b"x" * (32 << 20)
    answer = await client.request("POST", "/", forward_headers({}, address, len(body)), body)
    assert await read_limited(answer, 100) == b"ok"
    answer.release()
    assert client.open_connections == 0
    client.close()
    server.close()
    for writer in stalled:
        writer.close()


async def test_a_body_that_keeps_coming_is_cut_at_the_calls_limit() -> None:
    """Red team: with a read to give each time, every read past the limit
    took a new tick as more time; a 1.5 s limit let 12 s of answer (5 GB)
    through. Now the first read past it times out."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (64 << 10) + b" " * (64 << 10) + b"\r\n"
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(chunk)
                await writer.drain()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = UpstreamClient(address, Deadlines(), 0.5, max_idle=4)
    start = time.monotonic()
    answer = await client.request("GET", "/", forward_headers({}, address, None), None)
    with pytest.raises(TimeoutError):
        while await answer.read(64 << 10):
            assert time.monotonic() - start < 3, "read past the limit"
    assert 0.5 <= time.monotonic() - start < 1.0
    answer.release()
    client.close()
    server.close()


async def test_a_header_value_reaches_the_upstream_byte_for_byte() -> None:
    """Red team: a value's bytes that are not UTF-8 (obs-text, RFC 9110 5.5)
    were dropped on their way (``a\\xffb`` arrived as ``ab``): aiohttp's
    parser decodes them with surrogateescape, and its serializer skipped the
    surrogates. A control character is refused, never written."""
    async with upstream(answer_ok) as up:
        client = client_of(up)
        address = f"127.0.0.1:{up.port}"
        raw = b"a\xffb\xc3\xa9c\tz"
        sent = {"X-A": raw.decode("utf-8", "surrogateescape")}
        answer = await client.request("GET", "/m", forward_headers(sent, address, None), None)
        answer.release()
        assert b"\r\nX-A: " + raw + b"\r\n" in up.requests[0]
        for bad in ("a\r\nX-Smuggled: 1", "a\nb", "a\x00b", "a\x7fb"):
            headers = forward_headers({"X-A": bad}, address, None)
            with pytest.raises(ValueError):
                await client.request("GET", "/m", headers, None)
        assert len(up.requests) == 1
        client.close()
