"""Overload: the in-flight cap sheds load, and SIGTERM drains (issue 6, section 2)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.conftest import GuardFactory
from tests.support.guard import guard_process
from tests.support.protos import predict_request, predict_response
from tests.support.upstream import FakeUpstream, start_upstream

VALUES = np.array([[0.2], [1.3]], dtype=np.float32)
RULES = {"models": [{"name": "m", "outputs": [{"name": "*", "on_violation": "clamp"}]}]}


async def _status(call: Any) -> tuple[str, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name), exc.details() or ""
    return "OK", ""


async def _code(call: Any) -> str:
    return (await _status(call))[0]


def _clamping_config(tmp_path: Path, up: FakeUpstream, model: str, **settings: float) -> Path:
    """A guard config file: ``settings``, and a clamp rule for ``model``."""
    lines = [f"upstream: {up.address}", *(f"{k}: {v}" for k, v in settings.items())]
    lines += ["models:", f"  - {{name: {model}, outputs: [{{name: '*', on_violation: clamp}}]}}"]
    cfg = tmp_path / "guard.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


async def test_the_in_flight_cap_is_exact(make_guard: GuardFactory) -> None:
    cap = 4
    up = await start_upstream(FakeUpstream(gate=asyncio.Event()))
    up.reply("m", predict_response("m", {"y": VALUES}))
    try:
        guard = await make_guard(RULES, upstream=up.address, max_concurrent_rpcs=cap)
        held = [guard.stub.Predict(predict_request("m"), timeout=30) for _ in range(cap)]
        await up.wait_for("started", cap)
        # Call number cap+1 is refused at once, without reaching the upstream.
        assert await _code(guard.stub.Predict(predict_request("m"), timeout=30)) == (
            "RESOURCE_EXHAUSTED"
        )
        assert up.started == cap
        assert up.gate is not None
        up.gate.set()
        assert [await _code(c) for c in held] == ["OK"] * cap
        assert await _code(guard.stub.Predict(predict_request("m"), timeout=30)) == "OK"
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_far_above_capacity_sheds_load_with_bounded_memory(tmp_path: Path) -> None:
    cap, burst, waves = 16, 2000, 4
    up = await start_upstream(FakeUpstream(delay_s=0.2))
    up.reply("m", predict_response("m", {"y": VALUES}))
    cfg = _clamping_config(tmp_path, up, "m", max_concurrent_rpcs=cap)
    try:
        async with guard_process(cfg, tmp_path) as guard:
            async with grpc.aio.insecure_channel(guard.address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                request = predict_request("m")
                codes: Counter[str] = Counter()
                rss: list[int] = []
                for _ in range(waves):
                    calls = [stub.Predict(request, timeout=60) for _ in range(burst)]
                    codes.update(await asyncio.gather(*(_code(c) for c in calls)))
                    rss.append(guard.rss_kb())
        # The guard's handler refuses (and counts) calls over the cap. A burst this
        # large also overruns gRPC's backstop limit (the cap + 64), whose refusals can
        # reach the client as CANCELLED (an HTTP/2 reset racing the status). Either
        # way the call was never forwarded: the upstream saw exactly the calls that
        # succeeded, and never more than the cap at once.
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED"}, codes
        assert codes["OK"] >= cap and codes["RESOURCE_EXHAUSTED"] > burst // 2, codes
        assert up.started == codes["OK"]
        assert up.peak <= cap, f"the upstream saw {up.peak} calls at once, cap {cap}"
        growth_mb = (rss[-1] - rss[0]) / 1024
        assert growth_mb < 32, f"guard RSS grew {growth_mb:.0f} MB across overload waves: {rss}"
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(tmp_path: Path) -> None:
    grace = 10.0
    up = await start_upstream(FakeUpstream(gate=asyncio.Event(), only="slow"))
    up.reply("slow", predict_response("slow", {"y": VALUES}))
    up.reply("m", predict_response("m", {"y": VALUES}))
    cfg = _clamping_config(tmp_path, up, "slow", shutdown_grace_s=grace)
    try:
        async with guard_process(cfg, tmp_path) as guard:
            channel = grpc.aio.insecure_channel(guard.address)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            in_flight = [stub.Predict(predict_request("slow"), timeout=60) for _ in range(5)]
            await up.wait_for("started", 5)
            guard.signal(signal.SIGTERM)
            t_term = time.monotonic()

            # New calls are refused once the server stops accepting; calls sent
            # before that are served.
            async def first_refusal() -> tuple[str, int]:
                for _ in range(100):
                    forwarded_before = up.started
                    code = await _code(stub.Predict(predict_request("m"), timeout=60))
                    if code != "OK":
                        return code, forwarded_before
                    await asyncio.sleep(0.05)
                return "OK", up.started

            probe = asyncio.ensure_future(first_refusal())
            # Usually refused at once. A call that raced the shutdown can instead
            # wait in gRPC until the drain is over, so it is only collected below.
            await asyncio.wait({probe}, timeout=3)
            fresh = grpc.aio.insecure_channel(guard.address)
            again = await _code(
                prediction_service_pb2_grpc.PredictionServiceStub(fresh).Predict(
                    predict_request("m"), timeout=5
                )
            )
            assert again == "UNAVAILABLE"  # the listener is closed
            await fresh.close()
            assert guard.process.poll() is None  # still draining
            assert up.gate is not None
            up.gate.set()
            codes = await asyncio.wait_for(asyncio.gather(*(_code(c) for c in in_flight)), 30)
            assert codes == ["OK"] * 5
            # gRPC refuses calls on a stopping server as UNAVAILABLE, or CANCELLED
            # when the stream was already open as it shut down. Either way the call
            # is answered by the end of the drain, not left to its deadline, and
            # never reaches the upstream.
            refused, forwarded_before = await asyncio.wait_for(probe, 5)
            assert refused in ("UNAVAILABLE", "CANCELLED"), refused
            assert up.started == forwarded_before
            assert await guard.wait(grace + 2) == 0
            assert time.monotonic() - t_term < grace + 2
            await channel.close()
            log = guard.log()
            assert "draining in-flight calls" in log and "stopped" in log
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_a_call_outliving_the_grace_period_is_cut_off(tmp_path: Path) -> None:
    grace = 1.0
    up = await start_upstream(FakeUpstream(gate=asyncio.Event(), only="slow"))
    up.reply("slow", predict_response("slow", {"y": VALUES}))
    cfg = _clamping_config(tmp_path, up, "slow", shutdown_grace_s=grace)
    try:
        async with guard_process(cfg, tmp_path) as guard:
            async with grpc.aio.insecure_channel(guard.address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                stuck = asyncio.ensure_future(
                    _status(stub.Predict(predict_request("slow"), timeout=60))
                )
                await up.wait_for("started", 1)
                guard.signal(signal.SIGTERM)
                t_term = time.monotonic()
                # The upstream never answers: the guard waits out its grace period,
                # then ends the call, says why, and exits 0.
                code, details = await asyncio.wait_for(stuck, grace + 10)
                assert code == "UNAVAILABLE", (code, details)
                assert "shutdown_grace_s (1 s) ran out" in details, details
                assert await guard.wait(10) == 0
                assert time.monotonic() - t_term >= grace
    finally:
        assert up.gate is not None
        up.gate.set()
        assert up.server is not None
        await up.server.stop(0)


async def test_shed_calls_are_counted(make_guard: GuardFactory) -> None:
    cap = 2
    up = await start_upstream(FakeUpstream(gate=asyncio.Event()))
    up.reply("m", predict_response("m", {"y": VALUES}))
    try:
        guard = await make_guard(RULES, upstream=up.address, max_concurrent_rpcs=cap)
        held = [guard.stub.Predict(predict_request("m"), timeout=30) for _ in range(cap)]
        await up.wait_for("started", cap)
        assert await _code(guard.stub.Predict(predict_request("m"), timeout=30)) == (
            "RESOURCE_EXHAUSTED"
        )
        assert up.gate is not None
        up.gate.set()
        assert [await _code(c) for c in held] == ["OK"] * cap
        labels = {
            "protocol": "grpc",
            "model": "m",
            "method": "Predict",
            "code": "RESOURCE_EXHAUSTED",
        }
        assert guard.sample("guard_requests_total", labels) == 1
    finally:
        assert up.server is not None
        await up.server.stop(0)
