"""FakeUpstream faults: killed, slow, cancelled, garbage, oversized (issue 6, section 1)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.control.process import Child, start
from tests.conftest import GuardFactory
from tests.support.guard import rss_kb, scrape
from tests.support.protos import predict_request, predict_response
from tests.support.upstream import PREDICT, FakeUpstream, start_upstream

RULES = {
    "models": [
        {"name": "m", "outputs": [{"name": "*", "on_violation": "clamp", "threshold": 0.5}]},
        {"name": "slow", "outputs": [{"name": "*", "on_violation": "clamp"}]},
    ]
}
VALUES = np.array([[0.2], [0.7]], dtype=np.float32)
UPSTREAM_PROC = Path(__file__).with_name("upstream_proc.py")


async def _health(channel: grpc.aio.Channel) -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5
    )
    return int(resp.status)


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _start_upstream_proc(tmp: Path, port: int = 0) -> tuple[Child, int]:
    response = tmp / "response.bin"
    if not response.exists():
        response.write_bytes(predict_response("m", {"y": VALUES}).SerializeToString())
    argv = [sys.executable, str(UPSTREAM_PROC), "--port", str(port),
            "--response-file", str(response), "--slow-model", "slow", "--slow-s", "60"]  # fmt: skip
    child = await asyncio.to_thread(start, argv, timeout_s=30)
    return child, int(child.ports["grpc"])


async def test_upstream_killed_mid_traffic_then_back_on_the_same_port(
    make_guard: GuardFactory, tmp_path: Path
) -> None:
    proc, port = await _start_upstream_proc(tmp_path)
    try:
        guard = await make_guard(RULES, upstream=f"127.0.0.1:{port}")
        stub = guard.stub
        assert await _health(guard.channel) == health_pb2.HealthCheckResponse.SERVING
        resp = await stub.Predict(predict_request("m"), timeout=5)
        assert "y_class" in resp.outputs

        # Steady traffic, plus calls stuck in the upstream, when it dies.
        codes: Counter[grpc.StatusCode] = Counter()
        stop = asyncio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                codes[await _code(stub.Predict(predict_request("m"), timeout=10))] += 1
                await asyncio.sleep(0.005)

        workers = [asyncio.create_task(traffic()) for _ in range(4)]
        stuck = [stub.Predict(predict_request("slow"), timeout=10) for _ in range(8)]
        for _ in range(500):  # bounded: until the 8 slow calls are inside the guard
            if (guard.sample("guard_inflight_requests") or 0) >= 8:
                break
            await asyncio.sleep(0.01)
        assert (guard.sample("guard_inflight_requests") or 0) >= 8
        proc.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.process.wait)

        # In-flight calls fail with UNAVAILABLE, not at their 10 s deadline.
        stuck_codes = await asyncio.wait_for(
            asyncio.gather(*(_code(c) for c in stuck)), timeout=10 + 2
        )
        assert set(stuck_codes) == {grpc.StatusCode.UNAVAILABLE}
        assert await _code(stub.Predict(predict_request("m"), timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        for _ in range(100):  # bounded: 5 s for the 0.2 s probe to notice
            if await _health(guard.channel) == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.05)
        assert await _health(guard.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert guard.sample("guard_upstream_up") == 0

        # Back on the same port: within 2 s calls succeed and health is SERVING.
        proc, _ = await _start_upstream_proc(tmp_path, port)
        back = time.monotonic()
        ok = serving = False
        while time.monotonic() - back < 2.0 and not (ok and serving):
            ok = ok or await _code(stub.Predict(predict_request("m"), timeout=1)) == (
                grpc.StatusCode.OK
            )
            serving = serving or (
                await _health(guard.channel) == health_pb2.HealthCheckResponse.SERVING
            )
            await asyncio.sleep(0.05)
        assert ok and serving, f"after 2 s: call ok={ok}, health serving={serving}"
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=15)
        # Every call got an answer or a clean UNAVAILABLE: nothing else, nothing lost.
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        assert codes[grpc.StatusCode.OK] > 0
    finally:
        proc.process.kill()
        await asyncio.to_thread(proc.process.wait)


async def test_client_deadline_reaches_the_upstream_which_sees_the_cancellation(
    make_guard: GuardFactory,
) -> None:
    up = await start_upstream(FakeUpstream(gate=asyncio.Event()))
    try:
        guard = await make_guard(RULES, upstream=up.address, default_timeout_s=30)
        t0 = time.monotonic()
        code = await _code(guard.stub.Predict(predict_request("m"), timeout=1.0))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 1.0 + 2  # at its own deadline, not the guard's 30 s
        remaining = up.time_remaining[-1]
        # The client's 1 s, not the guard's 30 s (gRPC rounds the timeout header up).
        assert remaining is not None and 0 < remaining <= 1.5
        await up.wait_for("cancelled", 1)
        assert up.finished == 0
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_without_client_deadline_default_timeout_applies(make_guard: GuardFactory) -> None:
    up = await start_upstream(FakeUpstream(gate=asyncio.Event()))
    try:
        guard = await make_guard(RULES, upstream=up.address, default_timeout_s=1.0)
        t0 = time.monotonic()
        code = await _code(guard.stub.Predict(predict_request("m")))  # no deadline
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 1.0 + 2
        remaining = up.time_remaining[-1]
        assert remaining is not None and 0 < remaining <= 1.5  # 1 s, rounded up on the wire
        await up.wait_for("cancelled", 1)
        labels = {
            "protocol": "grpc",
            "model": "m",
            "method": "Predict",
            "code": "DEADLINE_EXCEEDED",
        }
        assert guard.sample("guard_requests_total", labels) == 1
    finally:
        assert up.server is not None
        await up.server.stop(0)


def _python_tasks() -> int:
    return len(asyncio.all_tasks())


async def test_client_cancel_cancels_upstream_and_leaks_nothing(make_guard: GuardFactory) -> None:
    up = await start_upstream(FakeUpstream(gate=asyncio.Event()))
    try:
        guard = await make_guard(RULES, upstream=up.address, max_streams_per_connection=300)
        stub = guard.stub
        call = stub.Predict(predict_request("m"), timeout=30)
        await up.wait_for("started", 1)
        call.cancel()
        await up.wait_for("cancelled", 1)

        request = predict_request("m")
        batch = 250

        async def cancel_batch() -> None:
            target = up.started + batch
            calls = [stub.Predict(request, timeout=60) for _ in range(batch)]
            await up.wait_for("started", target, bound_s=30)
            for c in calls:
                c.cancel()
            await up.wait_for("cancelled", target, bound_s=30)
            for c in calls:
                with pytest.raises(asyncio.CancelledError):
                    await c

        async def settled() -> None:
            for _ in range(500):  # bounded: until the guard has no call in flight
                if guard.sample("guard_inflight_requests") == 0:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("calls still in flight in the guard")

        await cancel_batch()  # warm-up: channels, caches, free lists
        await settled()
        gc.collect()
        tasks_before, rss_before = _python_tasks(), rss_kb(os.getpid())
        for _ in range(10_000 // batch):
            await cancel_batch()
        await settled()
        gc.collect()
        assert up.cancelled >= 10_000 + batch + 1
        for _ in range(100):  # bounded: handler tasks finish a moment after cancellation
            if _python_tasks() <= tasks_before:
                break
            await asyncio.sleep(0.02)
        assert _python_tasks() <= tasks_before, [t.get_coro() for t in asyncio.all_tasks()]
        growth_mb = (rss_kb(os.getpid()) - rss_before) / 1024
        assert growth_mb < 64, f"RSS grew {growth_mb:.0f} MB over 10,000 cancelled calls"
        # The guard still serves.
        up.gate = None
        up.reply("m", predict_response("m", {"y": VALUES}))
        assert "y_class" in (await stub.Predict(predict_request("m"), timeout=10)).outputs
    finally:
        assert up.server is not None
        await up.server.stop(0)


def _valid_body() -> bytes:
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    return predict_response("m", {"y": values}).SerializeToString()


BAD_BODIES = {
    "garbage": b"\xff" * 64,
    "truncated_last_byte": _valid_body()[:-1],
    "truncated_half": _valid_body()[: len(_valid_body()) // 2],
    "truncated_header": _valid_body()[:3],
    "not_a_predict_response": b"\x12\x04\x08\x01\x10\x1e",  # a GetModelStatusResponse
}


async def test_garbage_and_truncated_responses_are_internal_and_counted(
    make_guard: GuardFactory,
) -> None:
    up = await start_upstream(FakeUpstream())
    try:
        guard = await make_guard(RULES, upstream=up.address)
        for i, (case, body) in enumerate(BAD_BODIES.items(), 1):
            up.reply("m", body)
            code = await _code(guard.stub.Predict(predict_request("m"), timeout=10))
            assert code == grpc.StatusCode.INTERNAL, case
            try:
                await guard.stub.Predict(predict_request("m"), timeout=10)
            except grpc.aio.AioRpcError as exc:
                assert (exc.details() or "").startswith("guard: cannot decode"), exc.details()
            assert guard.sample("guard_decode_errors_total", {"model": "m"}) == 2 * i, case
            up.reply("m", _valid_body())  # and the guard keeps serving
            assert "y_class" in (await guard.stub.Predict(predict_request("m"), timeout=10)).outputs
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_an_upstreams_own_size_refusal_is_passed_on_as_it_came(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    """Found (red team): the upstream refusing what the guard sent it was
    answered 'the upstream's response is larger than max_message_mb; raise
    max_message_mb': the wrong limit, on the wrong side."""
    said = "SERVER: Received message larger than max (5000000 vs. 4194304)"
    upstream.fail("m", grpc.StatusCode.RESOURCE_EXHAUSTED, said)
    guard = await make_guard(RULES)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(predict_request("m"), timeout=10)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, said)
    assert not guard.sample("guard_refused_requests_total", {"reason": "response_too_large"})


async def test_size_limits_name_the_config_key_and_stop_big_requests_early(
    make_guard: GuardFactory,
) -> None:
    up = await start_upstream(FakeUpstream())
    big = np.zeros((2 * 1024 * 1024,), dtype=np.float32)  # 8 MiB
    up.reply("m", predict_response("m", {"y": big}, encoding="content"))
    try:
        guard = await make_guard(RULES, upstream=up.address, max_message_mb=1, max_request_mb=2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await guard.stub.Predict(predict_request("m"), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_message_mb=1" in err.value.details()
        assert "raise max_message_mb" in err.value.details()
        # A request between max_message_mb and max_request_mb is the request
        # limit's business: it reaches the upstream.
        started = up.started
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await guard.stub.Predict(predict_request("m", x=np.zeros(256 * 1024)), timeout=30)
        assert "max_message_mb=1" in err.value.details()  # the same 8 MiB answer
        assert up.started == started + 1
        refused = guard.sample("guard_refused_requests_total", {"reason": "response_too_large"})
        assert refused == 2  # as REST counts them (it was none)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await guard.stub.Predict(predict_request("m", x=np.zeros(512 * 1024)), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # gRPC's own words (it stops reading there, so it answers first), and the
        # guard's count.
        assert "Received message larger than max" in (err.value.details() or "")
        assert up.started == started + 1  # refused before the upstream
        assert guard.sample("guard_refused_requests_total", {"reason": "request_too_large"}) == 1
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_a_200mb_response_passes_intact_within_a_raised_limit(
    make_guard: GuardFactory,
) -> None:
    values = np.random.default_rng(0).random(50 * 1024 * 1024, dtype=np.float32)  # 200 MiB
    body = predict_response("m", {"y": values}, encoding="content").SerializeToString()
    del values
    up = await start_upstream(FakeUpstream())
    up.reply("m", body)
    rules = {"models": [{"name": "m", "outputs": [{"name": "y", "on_violation": "observe"}]}]}
    try:
        guard = await make_guard(rules, upstream=up.address, max_message_mb=300)
        raw = guard.channel.unary_unary(PREDICT)
        t0 = time.monotonic()
        got = await raw(predict_request("m").SerializeToString(), timeout=120)
        elapsed = time.monotonic() - t0
        assert got == body  # guarded (every value checked) and byte-identical
        total = sum(
            s.value
            for f in scrape(guard.metrics_url)
            for s in f.samples
            if s.name == "guard_output_values_total"
        )
        assert total == 50 * 1024 * 1024
        print(f"200 MiB response through the guard in {elapsed:.2f} s")
    finally:
        assert up.server is not None
        await up.server.stop(0)
