"""The REST front-end's limits, over real sockets: headers, body size, body
time, calls in flight, response size, and the drain on shutdown; and what
reading a hostile upstream answer may cost (the event loop held, numbers
read from text, metadata). Every refusal is a JSON error naming the setting
or the bound, and is counted by reason."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from guard.control.config import parse_config
from guard.server.rest.call import AsGivenStream
from tests.support.guard import RunningGuard, sample_sum, start_in_process
from tests.support.looplag import loop_lag
from tests.support.rest_upstream import FakeRestUpstream, Reply, metadata_body

MakeGuard = Callable[..., Awaitable[RunningGuard]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeRestUpstream]:
    upstream = FakeRestUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def make_guard(fake: FakeRestUpstream) -> AsyncIterator[MakeGuard]:
    started: list[RunningGuard] = []

    async def factory(**overrides: Any) -> RunningGuard:
        data: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "upstream": "127.0.0.1:9",
            "rest_listen": "127.0.0.1:0",
            "rest_upstream": fake.address,
            "health_check_interval_s": 5.0,
            "models": [],
        }
        data.update(overrides)
        running = await start_in_process(parse_config(data, "test.yaml", Path.cwd()))
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.stop()


def refused(guard: RunningGuard, reason: str) -> float:
    return guard.sample("guard_refused_requests_total", {"reason": reason}) or 0.0


async def raw_exchange(guard: RunningGuard, head: bytes, parts: list[tuple[float, bytes]]) -> bytes:
    """Send ``head`` then each part after its delay; the whole answer (until close)."""
    assert guard.rest is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", guard.rest.port)
    try:
        writer.write(head)
        for delay, data in parts:
            await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
        return await asyncio.wait_for(reader.read(1 << 20), 10)
    finally:
        writer.close()


def split(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


async def test_headers_over_max_metadata_kb_get_431_naming_the_setting(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    guard = await make_guard(max_metadata_kb=1)
    url = f"{guard.rest_url}/v1/models/m"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"X-Big": "a" * 1500}) as response:
            gate = (response.status, await response.json())
        # Past what aiohttp's parser reads at all: refused by the parser, in JSON too.
        async with session.get(url, headers={"X-Huge": "a" * 4000}) as response:
            parser = (response.status, await response.json())

    assert gate[0] == 431
    assert "max_metadata_kb (1 KiB)" in gate[1]["error"]
    assert parser[0] == 431
    assert "max_metadata_kb" in parser[1]["error"]
    long_url = await raw_exchange(
        guard, b"GET /" + b"a" * 4000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", []
    )
    assert split(long_url)[0] == 431
    assert "URL or headers are larger than max_metadata_kb (1 KiB)" in split(long_url)[1]["error"]
    assert refused(guard, "metadata") == 3
    assert fake.seen == []


async def test_a_body_over_max_request_mb_gets_413(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    guard = await make_guard(max_request_mb=1)
    big = b"{" + b" " * (1024 * 1024) + b"}"
    async with aiohttp.ClientSession() as session:
        url = f"{guard.rest_url}/v1/models/m:predict"
        async with session.post(url, data=io.BytesIO(big)) as response:
            declared = (response.status, await response.json())

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 65536

    async with aiohttp.ClientSession() as session:  # chunked: no length to judge by
        async with session.post(f"{guard.rest_url}/v1/models/m:predict", data=chunks()) as r:
            streamed = (r.status, await r.json())

    for status, body in (declared, streamed):
        assert status == 413
        assert "max_request_mb (1 MiB)" in body["error"]
    assert refused(guard, "request_too_large") == 2
    assert fake.seen == []


async def test_a_slow_body_and_a_chunked_body_without_end_get_408(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    guard = await make_guard(request_timeout_s=0.3)
    slow = await raw_exchange(
        guard,
        b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{",
        [(1.0, b"}        ")],
    )
    endless = await raw_exchange(
        guard,
        b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        [(0.0, b"1\r\n{\r\n"), (0.2, b"1\r\n \r\n"), (0.2, b"1\r\n \r\n")],
    )

    for answer in (slow, endless):
        status, body = split(answer)
        assert status == 408
        assert "request_timeout_s (0.3 s)" in body["error"]
    assert refused(guard, "request_timeout") == 2
    assert fake.seen == []


async def test_headers_that_do_not_arrive_get_408_and_the_connection_closes(
    make_guard: MakeGuard,
) -> None:
    guard = await make_guard(request_timeout_s=0.3)
    started = asyncio.get_running_loop().time()
    answer = await raw_exchange(guard, b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\nX-Slow: ", [])
    status, body = split(answer)
    assert status == 408
    assert "headers did not arrive within request_timeout_s (0.3 s)" in body["error"]
    assert asyncio.get_running_loop().time() - started < 5
    assert refused(guard, "request_timeout") == 1


async def test_a_connection_that_sends_nothing_is_closed_and_is_not_a_request(
    make_guard: MakeGuard,
) -> None:
    """Found (red team): it was answered 408 and counted as a request timed
    out, so a load balancer that opens connections ahead of use raised the
    error ratio. gRPC counts no such connection either."""
    guard = await make_guard(request_timeout_s=0.3)
    started = asyncio.get_running_loop().time()
    assert await raw_exchange(guard, b"", []) == b""  # closed, nothing said
    assert asyncio.get_running_loop().time() - started < 5
    assert sample_sum(guard.metrics_url, "guard_requests_total", protocol="rest") == 0
    assert refused(guard, "request_timeout") == 0


async def test_a_kept_alive_connection_gets_the_same_header_deadline(
    make_guard: MakeGuard,
) -> None:
    """After a first request answered in time, the next request's headers
    trickle in: 408 within request_timeout_s of their first byte, not
    aiohttp's keep-alive timeout."""
    guard = await make_guard(request_timeout_s=0.5)
    assert guard.rest is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", guard.rest.port)
    try:
        writer.write(b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(0.8)  # idle between requests is allowed (keep-alive)
        started = asyncio.get_running_loop().time()
        for part in (b"GET /v1/models/m HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: 1\r\n"):
            if reader.at_eof():
                break
            try:
                writer.write(part)
                await writer.drain()
            except ConnectionError:
                break  # the guard already answered and closed
            await asyncio.sleep(0.3)
        answer = await asyncio.wait_for(reader.read(1 << 20), 10)
        waited = asyncio.get_running_loop().time() - started
    finally:
        writer.close()
    status, body = split(answer)
    assert status == 408
    assert "headers did not arrive within request_timeout_s (0.5 s)" in body["error"]
    assert waited < 3, "refused on the guard's deadline, not the keep-alive timeout"
    assert refused(guard, "request_timeout") == 1


async def test_a_head_begun_while_the_last_deadline_runs_gets_its_own(
    make_guard: MakeGuard,
) -> None:
    """The next request's first bytes arrive before the deadline armed for
    the first request's head has run out, then nothing more: 408 within
    request_timeout_s of those bytes, not when the connection is idle too long."""
    guard = await make_guard(request_timeout_s=1.0, max_connection_idle_s=60)
    assert guard.rest is not None
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", guard.rest.port)
    connected = loop.time()
    try:
        writer.write(b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(max(0.0, connected + 0.6 - loop.time()))
        started = loop.time()
        writer.write(b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\n")
        answer = await asyncio.wait_for(reader.read(1 << 20), 10)
        waited = loop.time() - started
    finally:
        writer.close()
    status, body = split(answer)
    assert status == 408
    assert "headers did not arrive within request_timeout_s (1 s)" in body["error"]
    assert 0.8 < waited < 3, "the deadline runs from the head's first bytes"
    assert refused(guard, "request_timeout") == 1


async def test_calls_over_max_concurrent_rpcs_get_429_and_the_first_ones_finish(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.reply("GET", "/v1/models/m", Reply(body=b"{}", delay_s=0.5))
    guard = await make_guard(max_concurrent_rpcs=2)

    async def get(session: aiohttp.ClientSession) -> int:
        async with session.get(f"{guard.rest_url}/v1/models/m") as response:
            await response.read()
            return response.status

    async with aiohttp.ClientSession() as session:
        held = [asyncio.create_task(get(session)) for _ in range(2)]
        await asyncio.sleep(0.2)
        extra = await get(session)
        assert sorted(await asyncio.gather(*held)) == [200, 200]

    assert extra == 429
    assert refused(guard, "inflight_calls") == 1
    labels = {"protocol": "rest", "model": "__other__", "method": "GetModelStatus"}
    assert guard.sample("guard_requests_total", {**labels, "code": "RESOURCE_EXHAUSTED"}) == 1
    assert guard.sample("guard_requests_total", {**labels, "code": "OK"}) == 2


async def test_a_response_over_max_message_mb_is_refused(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.reply("GET", "/v1/models/m", Reply(body=b" " * (1024 * 1024 + 1)))
    guard = await make_guard(max_message_mb=1)

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{guard.rest_url}/v1/models/m") as response:
            status, body = response.status, await response.json()

    assert status == 429  # RESOURCE_EXHAUSTED, as TF Serving maps it
    assert "max_message_mb" in body["error"]
    assert refused(guard, "response_too_large") == 1


async def test_stop_lets_a_call_in_flight_finish_and_refuses_new_connections(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.reply("GET", "/v1/models/m", Reply(body=b'{"slow": 1}', delay_s=0.5))
    guard = await make_guard()
    assert guard.rest is not None
    port = guard.rest.port

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{guard.rest_url}/v1/models/m") as response:
            assert response.status == 200  # a warm keep-alive connection
            await response.read()
        in_flight = asyncio.create_task(_get_body(session, f"{guard.rest_url}/v1/models/m"))
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(guard.rest.stop(5.0))
        await asyncio.sleep(0.1)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        assert await in_flight == (200, b'{"slow": 1}')
        await stopping


async def test_stop_past_its_grace_answers_503_saying_why(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.reply("GET", "/v1/models/m", Reply(body=b"{}", delay_s=5.0))
    guard = await make_guard()
    assert guard.rest is not None

    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(_get_body(session, f"{guard.rest_url}/v1/models/m"))
        await asyncio.sleep(0.2)
        await guard.rest.stop(0.3)
        status, body = await in_flight

    assert status == 503
    assert "shutdown_grace_s (0.3 s) ran out" in json.loads(body)["error"]


async def _get_body(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


_RULE_OF_M = {"name": "m", "outputs": [{"name": "p", "valid_range": [0.0, 1.0], "argmax": True}]}


async def _predict_timing_the_loop(guard: RunningGuard) -> tuple[int, bytes, float]:
    """A predict, and the longest the event loop (the guard's: it runs in
    this process) was held meanwhile, from a task that ticks every 5 ms."""
    async with aiohttp.ClientSession() as session, loop_lag() as lag:
        async with session.post(f"{guard.rest_url}/v1/models/m:predict", data=b"{}") as response:
            status, body = response.status, await response.read()
    return status, body, lag.worst


@pytest.mark.parametrize(
    "instance, count, outcome",
    [(b'"a"', 4_000_000, "unchanged"), (b"[]", 4_000_000, "unchanged"),
     (b'{"b64": "YQ=="}', 1_000_000, "unchanged"), (b"{}", 4_000_000, "refused")],
)  # fmt: skip
async def test_a_huge_non_numeric_upstream_answer_holds_the_loop_for_under_a_second(
    fake: FakeRestUpstream, make_guard: MakeGuard, instance: bytes, count: int, outcome: str
) -> None:
    """Millions of tiny strings, empty lists, b64 objects or objects for a
    model with rules: no rule applies to such an output, so it goes back as it
    came, or, where the guard would visit every object, a clear error; in both
    cases within a second of the event loop (it took 20-30 s and 0.3-1.4 GB
    for 16 MB before)."""
    body = b'{"predictions": [' + b",".join([instance] * count) + b"]}"
    fake.predict("m", body)
    fake.metadata("m", {"p": ("DT_STRING", [-1])})  # declared DT_FLOAT, each is refused
    guard = await make_guard(models=[_RULE_OF_M])
    status, answer, worst_wait = await _predict_timing_the_loop(guard)
    if outcome == "unchanged":
        assert (status, answer) == (200, body)
    else:
        assert status == 500
        error = json.loads(answer)["error"]
        assert "more than 65536 objects, members and elements" in error
        assert "send smaller batches" in error
    assert worst_wait < 1.0, f"the event loop was held {worst_wait:.2f} s"


async def test_an_answer_that_may_hold_more_numbers_than_max_message_mb_reads_is_refused(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """Reading a number from text holds 32 bytes: 16 MB of one-digit integers
    would take about 300 MB. Refused before any is read with the status TF Serving
    gives RESOURCE_EXHAUSTED, naming max_message_mb; with the limit raised, the
    same kind of answer is read and goes back as it came."""
    ones = b'{"predictions": [[' + b",".join([b"1"] * 8_000_000) + b"]]}"
    fake.predict("m", ones)
    fake.metadata("m", {"p": ("DT_INT64", [-1, -1])})
    guard = await make_guard(models=[_RULE_OF_M])
    status, answer, worst_wait = await _predict_timing_the_loop(guard)
    assert status == 429
    error = json.loads(answer)["error"]
    assert "8000000 numbers" in error and "max_message_mb (67108864 bytes)" in error
    assert refused(guard, "response_too_large") == 1
    assert worst_wait < 1.0, f"the event loop was held {worst_wait:.2f} s"

    fewer = b'{"predictions": [[' + b",".join([b"1"] * 2_500_000) + b"]]}"  # 80 MB to read
    fake.predict("m", fewer)
    raised = await make_guard(models=[_RULE_OF_M], max_message_mb=128)
    status, answer, _ = await _predict_timing_the_loop(raised)
    assert (status, answer) == (200, fewer)


async def test_model_metadata_is_read_up_to_1_mib(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """The guard reads a model's metadata whole: past 1 MiB (TF Serving's is
    a few KB) it is not read, and a one-output answer, whose output only the
    metadata names, gets an error saying why."""
    fake.predict("m", b'{"predictions": [[0.5, 0.25, 0.25]]}')
    body = metadata_body("m", {"p": ("DT_FLOAT", [-1, 3])})
    fake.reply("GET", "/v1/models/m/metadata", Reply(body=body + b" " * (1024 * 1024)))
    guard = await make_guard(models=[_RULE_OF_M])
    status, answer, _ = await _predict_timing_the_loop(guard)
    assert status == 500
    error = json.loads(answer)["error"]
    assert "the metadata is larger than 1048576 bytes" in error

    fake.reply("GET", "/v1/models/m/metadata", Reply(body=body + b" " * (1024 * 1024 - 4096)))
    fresh = await make_guard(models=[_RULE_OF_M])
    status, answer, _ = await _predict_timing_the_loop(fresh)
    assert status == 200 and json.loads(answer)["guard_outputs"][0]["p_class"] == 0


async def test_connections_past_max_connections_get_503_and_a_freed_one_is_taken(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """Idle connections up to the cap are held; the next gets 503 naming
    max_connections, and is closed; once one of the held ones goes, a new
    connection is served."""
    fake.reply("GET", "/v1/models/m", Reply(body=b'{"ok": true}'))
    guard = await make_guard(max_connections=4)
    assert guard.rest is not None
    held = [await asyncio.open_connection("127.0.0.1", guard.rest.port) for _ in range(4)]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", guard.rest.port)
        answer = await asyncio.wait_for(reader.read(), 5)  # then the guard closes it
        writer.close()
        status, error = split(answer)
        assert status == 503
        assert "max_connections (4)" in error["error"]
        assert refused(guard, "connections") == 1
        held[0][1].close()
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{guard.rest_url}/v1/models/m") as response:
                assert (response.status, await response.read()) == (200, b'{"ok": true}')
    finally:
        for _, held_writer in held:
            held_writer.close()


def _call_state(guard: RunningGuard) -> tuple[float, float, float, float]:
    """What a scrape would say of REST calls: counted, timed, in flight, bytes held."""
    counted = timed = 0.0
    for family in guard.registry.collect():
        for s in family.samples:
            if s.labels.get("protocol") == "rest":
                if s.name == "guard_requests_total":
                    counted += s.value
                elif s.name == "guard_overhead_seconds_count":
                    timed += s.value
    inflight = guard.registry.get_sample_value("guard_inflight_requests") or 0.0
    held = guard.registry.get_sample_value("guard_inflight_bytes") or 0.0
    return counted, timed, inflight, held


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Callable[[RunningGuard], list[tuple[str, Any]]]:
    """Each write of an answer by the guard, with what a scrape would have
    said as it was handed over (the client may have it all at once)."""

    def watch(guard: RunningGuard) -> list[tuple[str, Any]]:
        seen: list[tuple[str, Any]] = []
        write, write_eof = AsGivenStream.write, AsGivenStream.write_eof

        async def watched_write(self: AsGivenStream, data: Any) -> None:
            seen.append((f"write {len(data)}", _call_state(guard)))
            await write(self, data)

        async def watched_eof(self: AsGivenStream, data: bytes = b"") -> None:
            seen.append(("eof", _call_state(guard)))
            await write_eof(self, data)

        monkeypatch.setattr(AsGivenStream, "write", watched_write)
        monkeypatch.setattr(AsGivenStream, "write_eof", watched_eof)
        return seen

    return watch


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_streamed_answer_is_counted_timed_and_given_back_before_its_last_bytes_go(
    fake: FakeRestUpstream, make_guard: MakeGuard, writes: Any, chunked: bool
) -> None:
    """A client that has a whole answer may scrape at once. Found: the
    request's slot and bytes were given back, and the call timed, a drain or
    a loop turn after the last bytes went, so a scrape could see a call its
    client had seen end."""
    body = b"[" + b"0.25," * 60_000 + b"0.5]"
    fake.reply("GET", "/v1/models/m/metadata", Reply(body=body, chunked=chunked))
    guard = await make_guard()
    seen = writes(guard)
    async with aiohttp.ClientSession() as session:
        assert await _get_body(session, f"{guard.rest_url}/v1/models/m/metadata") == (200, body)
    # The guard's own end of the answer (aiohttp ends it again after the handler).
    ours = [(what, state) for what, state in seen if what != "write 0"]
    end = [what for what, _ in ours].index("eof")
    # The last bytes: a chunked answer's end, or the last of its length.
    last = ours[end if chunked else end - 1]
    assert last[1] == (1.0, 1.0, 0.0, 0.0), seen[-3:]


async def test_a_guarded_answer_sent_in_chunks_is_counted_and_given_back_before_its_last_chunk(
    fake: FakeRestUpstream, make_guard: MakeGuard, writes: Any
) -> None:
    rows = 20_000
    fake.metadata("m", {"p": ("DT_FLOAT", [-1, 2])})
    fake.predict("m", '{"predictions": [' + ", ".join(["[0.25, 0.75]"] * rows) + "]}")
    guard = await make_guard(models=[_RULE_OF_M])
    seen = writes(guard)
    async with aiohttp.ClientSession() as session:
        url = f"{guard.rest_url}/v1/models/m:predict"
        async with session.post(url, data=b'{"instances": [1]}') as response:
            assert response.status == 200
            assert len((await response.json())["guard_outputs"]) == rows
    chunks = [state for what, state in seen if what.startswith("write")]
    assert len(chunks) > 2
    assert chunks[0][0] == 0.0 and chunks[0][3] > 0  # the answer is held while it goes
    assert chunks[-1] == (1.0, 1.0, 0.0, 0.0), seen[-3:]
