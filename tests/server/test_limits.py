"""The limits on what a client may hold, through a real in-process guard:
each refusal reaches the client with the limit's name, is counted with its
reason, and never reaches the upstream. Raw HTTP/2 (tests/attacks/h2raw.py)
sends what grpc's client cannot."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.attacks import h2raw
from tests.conftest import GuardFactory
from tests.support.guard import sample_sum
from tests.support.protos import predict_request, predict_response
from tests.support.upstream import ECHO_METHOD, PREDICT, FakeUpstream

RULES = {"models": [{"name": "m", "outputs": [{"name": "*", "on_violation": "clamp"}]}]}
VALUES = np.array([[0.2], [1.3]], dtype=np.float32)
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 4, 8


def _port(guard: Any) -> int:
    return int(guard.address.rsplit(":", 1)[1])


def _refused(guard: Any, reason: str) -> float:
    return guard.sample("guard_refused_requests_total", {"reason": reason}) or 0.0


async def _status(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _half_sent_request(port: int, wait_s: float, timeout: bytes | None = None) -> h2raw.StreamState:
    """HEADERS (with ``grpc-timeout``) and half of a request's bytes, then
    nothing: what the server says."""
    body = h2raw.grpc_message(predict_request("m").SerializeToString())
    with h2raw.H2Client("127.0.0.1", port, timeout=wait_s + 5) as client:
        sid = client.new_stream_id()
        client.send_headers(sid, h2raw.grpc_request_headers(PREDICT, timeout=timeout))
        client.send_data(sid, body[: len(body) // 2])
        return client.wait_stream(sid, wait_s + 3)


async def test_a_request_that_never_completes_is_timed_out_and_counted(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("m", predict_response("m", {"y": VALUES}))
    guard = await make_guard(RULES, request_timeout_s=0.5)
    state = await asyncio.to_thread(_half_sent_request, _port(guard), 0.5)
    assert state.grpc_status == DEADLINE_EXCEEDED
    assert "request_timeout_s" in (state.grpc_message or "")
    assert _refused(guard, "request_timeout") == 1
    assert guard.sample("guard_pending_requests") == 0
    assert not [r for r in upstream.received if r.method == "Predict"]
    # Nothing was held: a normal call goes through.
    assert "y_class" not in (await guard.stub.Predict(predict_request("m"), timeout=5)).outputs


async def test_calls_still_receiving_are_capped_and_visible(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("m", predict_response("m", {"y": VALUES}))
    guard = await make_guard(RULES, request_timeout_s=3, max_pending_requests=2)
    stuck = [asyncio.to_thread(_half_sent_request, _port(guard), 3) for _ in range(2)]
    tasks = [asyncio.ensure_future(s) for s in stuck]
    for _ in range(200):  # bounded: until both are inside the guard
        if guard.sample("guard_pending_requests") == 2:
            break
        await asyncio.sleep(0.01)
    assert guard.sample("guard_pending_requests") == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(predict_request("m"), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_pending_requests" in (err.value.details() or "")
    assert _refused(guard, "pending_requests") == 1
    assert {s.grpc_status for s in await asyncio.gather(*tasks)} == {DEADLINE_EXCEEDED}


async def test_bytes_in_flight_are_budgeted(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("m", predict_response("m", {"y": VALUES}))
    guard = await make_guard(RULES, max_inflight_mb=1)
    big = predict_request("m", x=np.zeros(300_000))  # 1.2 MB
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(big, timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_inflight_mb" in (err.value.details() or "")
    assert _refused(guard, "inflight_bytes") == 1
    assert guard.sample("guard_inflight_bytes") == 0
    assert not [r for r in upstream.received if r.method == "Predict"]


async def test_a_request_over_max_request_mb_is_refused_and_counted(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("m", predict_response("m", {"y": VALUES}))
    guard = await make_guard(RULES, max_request_mb=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(predict_request("m", x=np.zeros(300_000)), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The handler counts as gRPC cancels it, a moment after the client's
    # answer (seconds on a loaded machine): bounded wait.
    for _ in range(200):
        if _refused(guard, "request_too_large"):
            break
        await asyncio.sleep(0.05)
    assert _refused(guard, "request_too_large") == 1
    labels = {
        "protocol": "grpc",
        "model": "__other__",
        "method": "Predict",
        "code": "RESOURCE_EXHAUSTED",
    }
    assert guard.sample("guard_requests_total", labels) == 1
    assert not [r for r in upstream.received if r.method == "Predict"]


async def test_metadata_over_the_limit_is_refused_before_the_upstream(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("m", predict_response("m", {"y": VALUES}))
    guard = await make_guard(RULES, max_metadata_entries=5, max_metadata_kb=2)
    for metadata, key in (
        ([(f"x-k{i}", "v") for i in range(6)], "max_metadata_entries"),
        ([("x-big", "v" * 2500)], "max_metadata_kb"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await guard.stub.Predict(predict_request("m"), metadata=metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert key in (err.value.details() or "")
    assert _refused(guard, "metadata") == 2
    assert not [r for r in upstream.received if r.method == "Predict"]


async def test_an_expired_client_deadline_is_counted_as_deadline_exceeded(
    make_guard: GuardFactory,
) -> None:
    from tests.support.upstream import start_upstream

    slow = await start_upstream(FakeUpstream(delay_s=2.0))
    slow.reply("m", predict_response("m", {"y": VALUES}))
    try:
        guard = await make_guard(RULES, upstream=slow.address)
        code = await _status(guard.stub.Predict(predict_request("m"), timeout=0.3))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        labels = {
            "protocol": "grpc",
            "model": "m",
            "method": "Predict",
            "code": "DEADLINE_EXCEEDED",
        }
        for _ in range(100):
            if guard.sample("guard_requests_total", labels):
                break
            await asyncio.sleep(0.01)
        assert guard.sample("guard_requests_total", labels) == 1
        cancelled = dict(labels, code="CANCELLED")
        assert not guard.sample("guard_requests_total", cancelled)
    finally:
        assert slow.server is not None
        await slow.server.stop(0)


async def test_a_deadline_that_passes_while_the_request_arrives_is_not_a_refusal(
    make_guard: GuardFactory,
) -> None:
    """Found (red team): gRPC ends such a call with EOF, then cancels it, as
    it refuses a request over max_request_mb: it was counted
    RESOURCE_EXHAUSTED and as a request_too_large refusal."""
    guard = await make_guard(RULES)
    state = await asyncio.to_thread(_half_sent_request, _port(guard), 0.5, b"200m")
    assert state.grpc_status == DEADLINE_EXCEEDED
    labels = {"protocol": "grpc", "model": "__other__", "method": "Predict"}
    expired = labels | {"code": "DEADLINE_EXCEEDED"}
    for _ in range(100):
        if guard.sample("guard_requests_total", expired):
            break
        await asyncio.sleep(0.02)
    assert guard.sample("guard_requests_total", expired) == 1
    assert _refused(guard, "request_too_large") == 0


def _health_headers_only(port: int, streams: int, wait_s: float) -> list[int | None]:
    """``streams`` health Checks that send their headers and nothing more;
    the status each got within ``wait_s``."""
    with h2raw.H2Client("127.0.0.1", port, timeout=wait_s + 5) as client:
        ids = [client.new_stream_id() for _ in range(streams)]
        for sid in ids:
            client.send_headers(sid, h2raw.grpc_request_headers("/grpc.health.v1.Health/Check"))
        client.wait(
            lambda: all(client.streams.get(s, h2raw.StreamState()).done for s in ids), wait_s
        )
        return [client.streams[s].grpc_status if s in client.streams else None for s in ids]


async def test_health_requests_that_never_arrive_are_bounded_as_other_calls(
    make_guard: GuardFactory,
) -> None:
    """Found (red team): grpc.aio read a health call's request itself, with
    no time limit and outside max_pending_requests: 2,000 streams that sent
    only their headers held 43 MB for as long as their connections lived."""
    guard = await make_guard(RULES, request_timeout_s=0.5, max_pending_requests=16)
    statuses = await asyncio.to_thread(_health_headers_only, _port(guard), 40, 5.0)
    assert statuses.count(RESOURCE_EXHAUSTED) == 24, statuses
    assert statuses.count(DEADLINE_EXCEEDED) == 16, statuses
    assert _refused(guard, "pending_requests") == 24
    assert _refused(guard, "request_timeout") == 16
    assert guard.sample("guard_pending_requests") == 0
    channel = grpc.aio.insecure_channel(guard.address)
    async with channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_other_services_are_relayed_and_labelled_other(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    guard = await make_guard(RULES)
    echo = guard.channel.unary_unary(ECHO_METHOD)
    call = echo(b"abc", timeout=5)
    assert await call == b"cba"
    assert dict(await call.trailing_metadata()).get("x-echo") == "1"
    # A method named like TF Serving's, on another service, is not TF Serving's.
    lookalike = await _status(guard.channel.unary_unary("/my.Service/Predict")(b"", timeout=5))
    assert lookalike == grpc.StatusCode.UNIMPLEMENTED
    other = {"protocol": "grpc", "model": "__other__", "method": "__other__"}
    assert guard.sample("guard_requests_total", dict(other, code="OK")) == 1
    assert guard.sample("guard_requests_total", dict(other, code="UNIMPLEMENTED")) == 1


async def test_a_unary_call_without_a_request_is_answered_as_the_upstream_answers(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    async def nothing() -> Any:
        return
        yield

    guard = await make_guard(RULES)
    direct = grpc.aio.insecure_channel(upstream.address)
    try:
        answers = []
        for channel in (direct, guard.channel):
            call = channel.stream_unary(PREDICT)(nothing(), timeout=5)
            answers.append(await _status(call))
        assert answers[0] == answers[1] != grpc.StatusCode.OK
    finally:
        await direct.close()


async def test_unary_calls_without_a_request_hold_in_flight_slots(
    make_guard: GuardFactory,
) -> None:
    """Found (a red-team pass): a call with no request went to the upstream
    before any slot was taken: 60 such calls waited there while
    guard_inflight_requests read 0, and max_concurrent_rpcs let others in."""
    release = asyncio.Event()

    async def held(requests: Any, _context: Any) -> bytes:
        async for _ in requests:
            pass
        await release.wait()
        return b""

    async def nothing() -> Any:
        return
        yield

    upstream = grpc.aio.server()
    methods = {"Predict": grpc.stream_unary_rpc_method_handler(held)}
    service = grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", methods)
    upstream.add_generic_rpc_handlers((service,))
    port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    try:
        guard = await make_guard(RULES, upstream=f"127.0.0.1:{port}", max_concurrent_rpcs=2)
        calls = [guard.channel.stream_unary(PREDICT)(nothing(), timeout=10) for _ in range(2)]
        for _ in range(200):  # bounded: until both wait at the upstream
            if guard.sample("guard_inflight_requests") == 2:
                break
            await asyncio.sleep(0.02)
        assert guard.sample("guard_inflight_requests") == 2
        third = await _status(guard.channel.stream_unary(PREDICT)(nothing(), timeout=5))
        release.set()
        assert [await _status(call) for call in calls] == [grpc.StatusCode.OK] * 2
        assert third == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert guard.sample("guard_inflight_requests") == 0
    finally:
        await upstream.stop(None)


async def test_the_server_comes_back_after_a_method_name_that_is_not_utf8(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("m", predict_response("m", {"y": VALUES}))
    guard = await make_guard(RULES)

    def bad_path() -> None:
        with h2raw.H2Client("127.0.0.1", _port(guard), timeout=3) as client:
            client.unary(b"/\xff\xfe/Predict", b"", timeout=2)

    await asyncio.to_thread(bad_path)
    for _ in range(100):  # bounded: the watch wakes on grpc.aio's error log
        if guard.sample("guard_server_restarts_total") == 1:
            break
        await asyncio.sleep(0.05)
    assert guard.sample("guard_server_restarts_total") == 1
    fresh = grpc.aio.insecure_channel(guard.address)
    try:
        reply = await predict_stub(fresh).Predict(predict_request("m"), timeout=5)
        assert "y" in reply.outputs
        health = await health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await fresh.close()


def predict_stub(channel: grpc.aio.Channel) -> Any:
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


async def test_a_server_stopping_by_itself_costs_a_connected_client_little(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    """While a server is replaced the others take the reconnecting client;
    the only calls lost are those the stopping server had taken but not
    handed over (CANCELLED, before the guard), and, where the client's
    reconnection reached the stopping server's listener, those its channel
    refuses for one reconnect backoff (UNAVAILABLE, about 1 s: once in CI,
    10,921 calls of a tight loop; never in the runs here)."""
    upstream.reply("m", predict_response("m", {"y": VALUES}))
    guard = await make_guard(RULES)
    attacks = 6

    def bad_paths() -> None:
        for _ in range(attacks):
            with h2raw.H2Client("127.0.0.1", _port(guard), timeout=3) as client:
                client.unary(b"/\xff\xfe/Predict", b"", timeout=2)
            time.sleep(0.15)

    stub = predict_stub(guard.channel)
    hostile = asyncio.ensure_future(asyncio.to_thread(bad_paths))
    codes: list[grpc.StatusCode] = []
    refused_at: list[float] = []
    loop = asyncio.get_running_loop()
    while not hostile.done() or len(codes) < 50:
        codes.append(await _status(stub.Predict(predict_request("m"), timeout=5)))
        if codes[-1] == grpc.StatusCode.UNAVAILABLE:
            refused_at.append(loop.time())
    await hostile
    # gRPC's first reconnect backoff is 1 s (+-20 %); one per attack at most.
    assert not refused_at or refused_at[-1] - refused_at[0] < 1.3 * attacks, refused_at[-1]
    # Served again once the channel has reconnected (its backoff may still run).
    again = stub.Predict(predict_request("m"), timeout=10, wait_for_ready=True)
    assert await _status(again) == grpc.StatusCode.OK
    for _ in range(100):
        if guard.sample("guard_server_restarts_total") == attacks:
            break
        await asyncio.sleep(0.05)
    assert guard.sample("guard_server_restarts_total") == attacks
    lost = [c for c in codes if c != grpc.StatusCode.OK]
    cancelled = lost.count(grpc.StatusCode.CANCELLED)
    assert set(lost) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}, set(lost)
    assert cancelled <= attacks, f"{len(codes)} calls, {cancelled} cancelled"
    guarded = sample_sum(guard.metrics_url, "guard_requests_total", model="m")
    assert guarded == len(codes) + 1 - len(lost)  # the lost ones never reached the guard


async def test_a_forwarded_request_counts_twice_while_in_flight(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    """gRPC holds a forwarded request twice while its call is in flight (a
    31 MB request to a slow model: 72 MB in use), so the budget counts it so."""
    upstream.reply("m", predict_response("m", {"y": VALUES}))
    upstream.gate = asyncio.Event()
    guard = await make_guard(RULES, max_inflight_mb=1)
    request = predict_request("m", x=np.zeros(100_000))  # 0.4 MB
    size = len(request.SerializeToString())
    call = asyncio.ensure_future(guard.stub.Predict(request, timeout=5))
    for _ in range(200):  # bounded: until it is in flight
        if guard.sample("guard_inflight_requests") == 1:
            break
        await asyncio.sleep(0.01)
    assert guard.sample("guard_inflight_bytes") == 2 * size
    # 0.2 MB more, counted 0.4 MB: past the 1 MiB budget beside it (counted
    # once each, 0.6 MB, they would fit).
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(predict_request("m", x=np.zeros(50_000)), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    upstream.gate.set()
    await call
    # The answer's bytes are released once the handler returns, a moment
    # after the client has them (bounded wait).
    for _ in range(200):
        if guard.sample("guard_inflight_bytes") == 0:
            break
        await asyncio.sleep(0.02)
    assert guard.sample("guard_inflight_bytes") == 0


async def test_a_retired_server_ends_what_its_handlers_do_not_run_once_they_are_done(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    """A gRPC server that stopped by itself (a non-UTF-8 :path) is retired:
    the calls its handlers run finish, then the rest end at once. Found (a
    flake hunt): a call its dead accept loop had taken and never ran waited
    out the grace period, or its client's deadline (a 2 s health check).
    A health Watch stands in for that call here: the guard's handlers do
    not run it either."""
    upstream.reply("m", predict_response("m", {"y": VALUES}))
    upstream.gate = asyncio.Event()
    guard = await make_guard(RULES, shutdown_grace_s=8)
    async with grpc.aio.insecure_channel(guard.address) as channel:  # one connection
        stub = predict_stub(channel)
        predict = asyncio.ensure_future(stub.Predict(predict_request("m"), timeout=20))
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        for _ in range(200):  # bounded: until the Predict runs on its server
            busy = [s for s in guard.server._servers if guard.server._running[s].count]
            if busy:
                break
            await asyncio.sleep(0.01)
        assert len(busy) == 1
        retire = asyncio.ensure_future(guard.server._retire(busy[0]))
        await asyncio.sleep(0.3)
        assert not retire.done()  # the Predict it runs is waited for
        upstream.gate.set()
        assert list((await predict).outputs) == ["y"]
        await asyncio.wait_for(retire, 2)  # not the 8 s grace, for the Watch
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(watch.read(), 2)
