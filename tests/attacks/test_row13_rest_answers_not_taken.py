"""Row 13: REST clients that ask for large predict answers and read nothing.
aiohttp would write each answer whole and wait for ever: eight such clients
held 270 MB, uncounted, for as long as they kept their connections. An
answer is now written a chunk at a time and counted in ``max_inflight_mb``
until it is written: past the budget the upstream's answer gets 429 naming
the setting, and an answer of which the client takes nothing for
``stream_idle_timeout_s`` has its connection cut (``stream_idle``). A client
that reads slowly but steadily gets its whole answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.guard import GuardProcess, guard_process
from tests.support.rest_upstream import FakeRestUpstream

BUDGET_MB = 64
IDLE_S = 15.0
RULES = (
    f"max_inflight_mb: {BUDGET_MB}\n"
    "models:\n  - name: m\n    outputs: [{name: p, valid_range: [0, 1], argmax: true}]\n"
    "  - name: s\n    outputs: [{name: p, valid_range: [0, 1], argmax: true}]\n"
)
# 12 MB of short strings: no rule applies to them, so the answer goes back as it came.
ANSWER = b'{"predictions": [' + b",".join([b'"a"'] * 3_000_000) + b"]}"
SLOW_ANSWER = ANSWER[: 4 * 1_000_000] + b'"a"]}'  # 4 MB
SLOW_IDLE_S = 1.0
CLIENTS = 8
HELD = 5  # 5 x 12 MB fit in 64 MiB, a sixth does not


@pytest.fixture
async def fake() -> AsyncIterator[FakeRestUpstream]:
    upstream = FakeRestUpstream()
    await upstream.start()
    upstream.predict("m", ANSWER)
    upstream.metadata("m", {"p": ("DT_STRING", [-1])})  # as DT_FLOAT: refused
    upstream.predict("x", b'{"predictions": [[0.5]]}')
    upstream.predict("s", SLOW_ANSWER)
    upstream.metadata("s", {"p": ("DT_STRING", [-1])})
    yield upstream
    await upstream.stop()


@contextlib.asynccontextmanager
async def _guard(fake: FakeRestUpstream, tmp: Path, idle_s: float) -> AsyncIterator[GuardProcess]:
    config = tmp / "guard.yaml"
    config.write_text(f"{RULES}stream_idle_timeout_s: {idle_s}\n")
    flags = ("--upstream", "127.0.0.1:9", "--rest-listen", "127.0.0.1:0")
    async with guard_process(config, tmp, *flags, "--rest-upstream", fake.address) as running:
        yield running


def _ask_and_never_read(port: int, model: str = "m", window: int = 4096) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    sock.connect(("127.0.0.1", port))
    head = f"POST /v1/models/{model}:predict HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\n{{}}"
    sock.sendall(head.encode())
    return sock


async def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def test_answers_a_client_never_reads_are_bounded_then_cut(
    fake: FakeRestUpstream, tmp_path: Path
) -> None:
    async with _guard(fake, tmp_path, IDLE_S) as guard:
        await _bounded_then_cut(guard)


async def _bounded_then_cut(guard: GuardProcess) -> None:
    port = int(guard.ports["rest"])
    rss_before = guard.rss_kb()
    socks = [_ask_and_never_read(port) for _ in range(CLIENTS)]
    try:

        def refused() -> float:
            return guard.sample("guard_refused_requests_total", reason="inflight_bytes")

        await _wait_for(lambda: refused() >= CLIENTS - HELD, 10)
        # Answers are counted as they arrive: the last held ones may still be coming.
        await _wait_for(lambda: guard.sample("guard_inflight_bytes") == HELD * len(ANSWER), 5)
        held = guard.sample("guard_inflight_bytes")
        # What the refused answers took is trimmed within a few seconds.

        def grown_mb() -> float:
            return (guard.rss_kb() - rss_before) / 1024

        await _wait_for(lambda: grown_mb() < 1.5 * BUDGET_MB, 8)
        held_rss_mb = grown_mb()
        assert guard.sample("guard_inflight_bytes") == held
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{guard.rest_url}/v1/models/x:predict", data=b"{}") as r:
                legit = (r.status, await r.read())
        assert held == HELD * len(ANSWER)
        assert refused() == CLIENTS - HELD
        assert legit == (200, b'{"predictions": [[0.5]]}')
        assert held_rss_mb < 1.5 * BUDGET_MB, f"RSS grew {held_rss_mb:.0f} MB"
        answers = [_whatever_came(s) for s in socks]
        refusals = [a for a in answers if a.startswith(b"HTTP/1.1 429")]
        assert len(refusals) == CLIENTS - HELD
        error = json.loads(refusals[0].partition(b"\r\n\r\n")[2])["error"]
        assert "max_inflight_mb (64 MiB)" in error and "not yet taken" in error

        def cut() -> float:
            return guard.sample("guard_refused_requests_total", reason="stream_idle")

        await _wait_for(lambda: cut() >= HELD, IDLE_S + 5)
        assert cut() == HELD
        assert guard.sample("guard_inflight_bytes") == 0
        assert sum(_ended(s) for s in socks) == CLIENTS
    finally:
        for sock in socks:
            sock.close()


async def test_a_slow_reader_that_keeps_reading_gets_the_whole_answer(
    fake: FakeRestUpstream, tmp_path: Path
) -> None:
    """A 4 MB answer read through a 128 KiB window four times a second: each
    part is taken well within stream_idle_timeout_s (1 s), the whole takes
    longer than it, and nothing is cut."""
    async with _guard(fake, tmp_path, SLOW_IDLE_S) as guard:
        started = time.monotonic()
        got = await _read_slowly(int(guard.ports["rest"]))
        assert got.partition(b"\r\n\r\n")[2] == SLOW_ANSWER
        took = time.monotonic() - started
        assert took > 2 * SLOW_IDLE_S, f"the answer came in {took:.1f} s, too fast for the test"
        assert guard.sample("guard_refused_requests_total", reason="stream_idle") == 0


async def _read_slowly(port: int) -> bytearray:
    sock = _ask_and_never_read(port, "s", window=128 * 1024)
    got = bytearray()
    sock.setblocking(False)
    started = time.monotonic()
    try:
        while not got.endswith(b"]}") and time.monotonic() - started < 30:
            await asyncio.sleep(0.25)
            try:
                got += sock.recv(1 << 20)
            except BlockingIOError:
                pass
    finally:
        sock.close()
    return got


def _whatever_came(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    try:
        return sock.recv(1 << 16)
    except (BlockingIOError, ConnectionResetError):
        return b""


def _ended(sock: socket.socket) -> bool:
    """Whether the guard closed (or reset) the connection: its end arrives
    after whatever it had sent, so read everything first."""
    sock.settimeout(5)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True
