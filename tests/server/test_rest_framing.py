"""HTTP framing between client, guard and upstream, from a red-team pass: an
answer broken off must never look whole, and what cannot be passed on as
it came gets a status that says so. The upstream here writes raw bytes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator

import pytest

from tests.server.test_rest_limits import MakeGuard, fake, make_guard
from tests.support.guard import RunningGuard, sample_sum
from tests.support.rest_upstream import metadata_body

__all__ = ["fake", "make_guard"]  # fixtures, used by name

REJECT_ABOVE_1 = {
    "name": "m",
    "outputs": [{"name": "*", "valid_range": [0, 1], "on_violation": "reject"}],
}
METADATA = metadata_body("m", {"y": ("DT_FLOAT", [-1, 1])})


class ScriptedUpstream:
    """Answers every request (head and Content-Length body read) with
    :attr:`answer`, then closes the connection (after :attr:`stall_s`);
    model metadata as usual."""

    def __init__(self) -> None:
        self.answer = b""
        self.stall_s = 0.0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            self.requests.append(head + await reader.readexactly(length))
            if b"/metadata " in head.split(b"\r\n")[0]:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(METADATA))
                writer.write(METADATA)
            else:
                writer.write(self.answer)
            await writer.drain()
            await asyncio.sleep(self.stall_s)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    scripted = ScriptedUpstream()
    await scripted.start()
    yield scripted
    await scripted.stop()


@pytest.fixture
async def guard(upstream: ScriptedUpstream, make_guard: MakeGuard) -> RunningGuard:
    return await make_guard(
        rest_upstream=f"127.0.0.1:{upstream.port}", default_timeout_s=1.0, models=[REJECT_ABOVE_1]
    )


def _exchange(port: int, request: bytes) -> tuple[bytes, str]:
    """Send ``request``; what came back, and how the connection ended."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        try:
            while data := sock.recv(65536):
                got += data
        except ConnectionResetError:
            return got, "reset"
    return got, "closed"


async def _send(guard: RunningGuard, request: bytes) -> tuple[bytes, str]:
    assert guard.rest is not None
    return await asyncio.to_thread(_exchange, guard.rest.port, request)


def _error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


def _requests(guard: RunningGuard, code: str) -> float:
    return sample_sum(guard.metrics_url, "guard_requests_total", protocol="rest", code=code)


GET_1_0 = b"GET /v1/models/n HTTP/1.0\r\nHost: x\r\n\r\n"
GET = b"GET /v1/models/n HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
PREDICT = (
    b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


async def test_an_answer_broken_off_is_reset_never_ended_cleanly(
    upstream: ScriptedUpstream, guard: RunningGuard
) -> None:
    """Found: to an HTTP/1.0 client (no chunked framing, so the answer ends
    where the connection does) an upstream answer that broke off was ended
    with a clean close: 16 bytes of a 200 taken for the whole answer."""
    upstream.answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n"
        b'{"model_versio\r\n'  # and no last chunk: the upstream went away
    )
    for request in (GET_1_0, GET):
        answer, ended = await _send(guard, request)
        assert answer.split(b"\r\n")[0].endswith(b"200 OK")
        assert ended == "reset", answer
    assert _requests(guard, "UNAVAILABLE") == 2


async def test_an_answer_that_stalls_past_default_timeout_s_is_reset_and_counted_so(
    upstream: ScriptedUpstream, guard: RunningGuard
) -> None:
    upstream.answer = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"mo\r\n'
    upstream.stall_s = 3.0
    answer, ended = await _send(guard, GET)
    assert answer.endswith(b'{"mo\r\n') and ended == "reset", (answer, ended)
    assert _requests(guard, "DEADLINE_EXCEEDED") == 1 and _requests(guard, "UNAVAILABLE") == 0


@pytest.mark.parametrize(
    ("answer", "says", "requests"),
    [(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
      "answered with Transfer-Encoding 'gzip, chunked'", [GET, PREDICT]),
     (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
      "answered 101 Switching Protocols", [GET, PREDICT]),
     # Streamed back, a short body breaks off as in the test above; read whole first, 502.
     (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"predictions": [[0.',
      "malformed or incomplete HTTP response", [PREDICT]),
     (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
      "malformed or incomplete HTTP response", [GET, PREDICT])],
    ids=["gzip-coding", "101", "short-body", "two-lengths"],
)  # fmt: skip
async def test_an_answer_that_cannot_be_passed_on_gets_502_saying_why(
    upstream: ScriptedUpstream, guard: RunningGuard, answer: bytes, says: str, requests: list[bytes]
) -> None:
    """Found: a gzip transfer coding went out de-chunked and undecoded, a
    plain 200 of gzip bytes; a 101 nobody asked for was forwarded; answers
    the upstream sent malformed were 503 'cannot reach the REST upstream'."""
    upstream.answer = answer
    for request in requests:
        status, error = _error((await _send(guard, request))[0])
        assert status == 502 and says in error, (status, error)
    assert _requests(guard, "UNAVAILABLE") == len(requests)


async def test_a_request_in_a_transfer_coding_other_than_chunked_gets_501(
    upstream: ScriptedUpstream, guard: RunningGuard
) -> None:
    """Found: `Transfer-Encoding: gzip, chunked` reached the upstream
    de-chunked and still gzipped, as if it were the plain body."""
    request = (
        b"POST /v1/models/n:predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    status, error = _error((await _send(guard, request))[0])
    assert status == 501 and "Transfer-Encoding 'gzip, chunked' is not supported" in error
    assert upstream.requests == []
    assert _requests(guard, "UNIMPLEMENTED") == 1


async def test_the_upstreams_own_guard_headers_never_reach_the_client(
    upstream: ScriptedUpstream, guard: RunningGuard
) -> None:
    """Found: an answer no rule read went out with the upstream's own
    `x-guard-action: clean`, as if the guard had checked it."""
    body = b'{"predictions": [[7.5]]}'
    upstream.answer = (
        b"HTTP/1.1 200 OK\r\nX-Guard-Action: clean\r\nx-guard-violations: 0\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    answer, _ = await _send(guard, GET)
    head, _, got = answer.partition(b"\r\n\r\n")
    assert got == body and b"x-guard" not in head.lower()
    status, error = _error((await _send(guard, PREDICT))[0])
    assert status == 500 and "values above 1" in error  # guarded: the guard's own verdict


@pytest.mark.parametrize(
    "path",
    ["//v1/models/m:predict", "/v1/models/x/../m:predict", "/v1/./models/m:predict",
     "/v1/models/%2e%2e/m:predict", "/v1%2Fmodels/m:predict", "/v1\\models/m:predict"],
)  # fmt: skip
async def test_a_path_not_in_normal_form_gets_400(
    upstream: ScriptedUpstream, guard: RunningGuard, path: str
) -> None:
    """Found (red team): such a path was routed as sent, a pass-through no rule
    saw. TF Serving refuses it too, but a hop between them that normalizes
    paths (Envoy, nginx) would have made it a predict of model m."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}"
    ).encode()
    status, error = _error((await _send(guard, request))[0])
    assert status == 400 and "not in normal form" in error, (status, error)
    assert upstream.requests == []
    upstream.answer = b'HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\n{"predictions": [[0.5]]}'
    answer, _ = await _send(guard, PREDICT)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"predictions": [[0.5]]}')


def _names(answer: bytes) -> set[str]:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    return {line.split(":")[0].lower() for line in head.split("\r\n")[1:]}


async def test_the_guard_adds_no_header_of_its_own_but_its_verdict(
    upstream: ScriptedUpstream, guard: RunningGuard
) -> None:
    """Found: aiohttp gave every answer that lacked them `Server:
    Python/3.11 aiohttp/3.x` (TF Serving sends none: every client learned the
    guard's language and library versions) and `Content-Type:
    application/octet-stream` (a body the upstream left untyped, typed)."""
    body = b'{"predictions": [[0.5]]}'
    sent = {"content-length", "date", "x-up"}
    upstream.answer = (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nDate: Thu, 03 Dec 2026 22:00:00 GMT\r\n"
        b"X-Up: 1\r\n\r\n" % len(body) + body
    )
    passed, _ = await _send(guard, GET)
    guarded, _ = await _send(guard, PREDICT)
    refused, _ = await _send(guard, PREDICT.replace(b"POST /", b"POST //"))
    connection = {"connection"}  # the client's Connection: close, answered
    assert _names(passed) - connection == sent, passed
    assert _names(guarded) - connection == sent | {"x-guard-action", "x-guard-violations"}
    assert passed.endswith(body) and guarded.endswith(body)
    assert refused.startswith(b"HTTP/1.1 400 ") and "server" not in _names(refused), refused


async def test_an_answer_of_no_declared_length_past_max_message_mb_is_cut(
    upstream: ScriptedUpstream, make_guard: MakeGuard
) -> None:
    """Red team: a pass-through answer was held to max_message_mb only by its
    Content-Length; chunked answers of 55-84 MB went through a 64 MB limit.
    Its head is sent, so past the limit the connection is reset."""
    chunk = b"%x\r\n" % (256 << 10) + b" " * (256 << 10) + b"\r\n"
    upstream.answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 12 + b"0\r\n\r\n"
    )
    guard = await make_guard(rest_upstream=f"127.0.0.1:{upstream.port}", max_message_mb=1)
    answer, ended = await _send(guard, GET)
    assert answer.split(b"\r\n")[0].endswith(b"200 OK")
    assert ended == "reset" and len(answer) < 2 << 20
    assert _requests(guard, "RESOURCE_EXHAUSTED") == 1
    assert guard.sample("guard_refused_requests_total", {"reason": "response_too_large"}) == 1


async def test_a_head_answer_declaring_a_large_length_passes(
    upstream: ScriptedUpstream, make_guard: MakeGuard
) -> None:
    """Red team: the length of a HEAD's answer (or a 304's) describes a body
    that is not sent; it was refused as too large."""
    upstream.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n"
    guard = await make_guard(rest_upstream=f"127.0.0.1:{upstream.port}", max_message_mb=1)
    head = b"HEAD /v1/models/n HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer, _ = await _send(guard, head)
    assert answer.split(b"\r\n")[0].endswith(b"200 OK"), answer
    assert b"content-length: 104857600" in answer.lower()
    assert _requests(guard, "OK") == 1


async def test_calls_mid_answer_at_shutdown_get_503_or_a_reset_within_the_grace(
    upstream: ScriptedUpstream, guard: RunningGuard
) -> None:
    """Red team: the upstream client let go of a body being read as it
    closed, so its reader waited until the drain's end cancelled it: the
    predict's client got no answer at all, the streamed one a clean close
    of an answer cut short, and stop() took its grace plus a second."""
    upstream.answer = b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"pred'
    upstream.stall_s = 10.0
    predict = asyncio.ensure_future(_send(guard, PREDICT))
    passed = asyncio.ensure_future(_send(guard, GET))
    await asyncio.sleep(0.3)
    assert guard.rest is not None
    start = time.monotonic()
    await guard.rest.stop(0.3)
    assert time.monotonic() - start < 0.8
    status, error = _error((await predict)[0])
    assert status == 503 and "shutdown_grace_s (0.3 s) ran out" in error
    answer, ended = await passed
    assert answer.split(b"\r\n")[0].endswith(b"200 OK") and ended == "reset"


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_the_upstreams_header_values_reach_the_client_byte_for_byte(
    upstream: ScriptedUpstream, guard: RunningGuard, framing: str
) -> None:
    """A value's bytes that are not UTF-8 (obs-text, RFC 9110 5.5) were
    dropped on their way back (``a\\xffb`` reached the client as ``ab``):
    aiohttp's parser decodes them with surrogateescape and its serializer
    skipped the surrogates. Passed on, guarded and streamed alike."""
    raw = b"a\xffb\xc3\xa9c\tz"
    body = b'{"predictions": [[0.5]]}'
    framed = (
        b"Content-Length: %d\r\n\r\n" % len(body) + body
        if framing == "length"
        else b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    )
    upstream.answer = b"HTTP/1.1 200 \xc0K\r\nX-A: " + raw + b"\r\nX-B: plain\r\n" + framed
    for request in (GET, PREDICT):
        answer, _ = await _send(guard, request)
        head = answer.partition(b"\r\n\r\n")[0]
        assert answer.startswith(b"HTTP/1.1 200 \xc0K\r\n"), answer
        assert b"\r\nX-A: " + raw + b"\r\n" in head and b"\r\nX-B: plain\r\n" in head, head


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])  # llhttp refuses the rest
async def test_a_request_line_not_http_1_gets_505_in_http_1_1(
    upstream: ScriptedUpstream, guard: RunningGuard, version: bytes
) -> None:
    """Red team: aiohttp's parser takes these, and a `POST ... HTTP/2.0`
    was forwarded and answered `HTTP/2.0 200`; nginx answers 505."""
    answer, _ = await _send(guard, PREDICT.replace(b"HTTP/1.1", version, 1))
    status, error = _error(answer)
    assert answer.startswith(b"HTTP/1.1 505 ") and status == 505, answer
    assert error.startswith(f"guard: {version.decode()} is not spoken here")
    assert upstream.requests == []
