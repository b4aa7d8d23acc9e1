"""An idle guard stays idle: a sidecar in every pod must not wake up or spend
CPU while no call comes. Its server watch once polled every 50 ms: 23 loop
wakeups and about 12 ms of CPU a second, doing nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.attacks._harness import cpu_s
from tests.support.guard import guard_process
from tests.support.protos import predict_request, predict_response
from tests.support.upstream import FakeUpstream, start_upstream

_IDLE_S = 8.0
# What the guard does while idle: probe the upstream (every second by
# default), watch its servers (every second), trim the allocator (every 2 s
# at most). Measured over 8 s: 25-27 wakeups and 20-30 ms of CPU, against
# 184 wakeups and 90-110 ms with the watch polling every 50 ms.
_WAKEUPS_PER_S = 8.0
_CPU_PER_S = 0.010


def _wakeups(pid: int) -> int:
    """How often the main thread (the event loop) blocked and woke again."""
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


async def test_an_idle_guard_sleeps(tmp_path: Path) -> None:
    up = await start_upstream(FakeUpstream())
    up.reply("m", predict_response("m", {"y": np.array([[0.25]], dtype=np.float32)}))
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(
        f"upstream: {up.address}\n"
        "models:\n  - {name: m, outputs: [{name: '*', valid_range: [0, 1], argmax: true}]}\n"
    )
    try:
        async with guard_process(cfg, tmp_path) as guard:
            pid = guard.process.pid
            async with grpc.aio.insecure_channel(guard.address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                reply = await stub.Predict(predict_request("m"), timeout=10)
                assert "y_class" in reply.outputs  # it serves, and guards
            await asyncio.sleep(1.0)  # the call's own work is done
            woke, used = _wakeups(pid), cpu_s(pid)
            await asyncio.sleep(_IDLE_S)
            woke, used = _wakeups(pid) - woke, cpu_s(pid) - used
        assert woke <= _WAKEUPS_PER_S * _IDLE_S, f"an idle guard woke {woke} times in {_IDLE_S:g} s"
        assert used <= _CPU_PER_S * _IDLE_S, (
            f"an idle guard used {used * 1000:.0f} ms of CPU in {_IDLE_S:g} s"
        )
    finally:
        assert up.server is not None
        await up.server.stop(0)
