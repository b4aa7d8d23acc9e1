"""``guard serve`` around its drain and its reloads, as a process: found by a
red-team pass of the control plane."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support.guard import guard_process
from tests.support.protos import predict_request, predict_response
from tests.support.upstream import FakeUpstream

RULES = """\
shutdown_grace_s: 20
max_message_mb: {mb}
models:
  - name: m
    outputs:
      - {{name: p, threshold: 0.5}}
"""


async def _predict(address: str, timeout: float = 30) -> object:
    async with grpc.aio.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 64 << 20)]) as channel:  # fmt: skip
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return await stub.Predict(predict_request("m"), timeout=timeout)


async def test_a_drain_keeps_the_heartbeat_and_sighups_do_not_end_it(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A draining worker stopped touching its port file, so --workers' supervisor
    killed it 10 s into a 30 s drain; and a SIGHUP during the drain, once
    asyncio's handlers were gone, ended the process by signal (6 runs of 6)."""
    upstream.reply("m", predict_response("m", {"p": np.array([[0.7]], np.float32)}))
    upstream.delay_s = 3.0
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(RULES.format(mb=64))
    async with guard_process(cfg, tmp_path, "--upstream", upstream.address) as guard:
        call = asyncio.create_task(_predict(guard.address))
        while upstream.started == 0:  # bounded by the call's own timeout
            await asyncio.sleep(0.02)
        guard.process.send_signal(signal.SIGTERM)
        first = guard.port_file.stat().st_mtime_ns
        for _ in range(20):  # a storm through the drain
            guard.process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert guard.port_file.stat().st_mtime_ns > first  # beating while draining
        await call  # the call in flight is answered
        assert await asyncio.to_thread(guard.process.wait, 30) == 0


async def test_a_reload_keeps_the_running_max_message_mb(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Only the rules reload; the rule book was built with the new file's
    max_message_mb while the servers kept theirs: lowered, a response that
    passed got RESOURCE_EXHAUSTED, and the log named the new value."""
    wide = np.linspace(0, 1, 300_000, dtype=np.float32).reshape(1, -1)
    upstream.reply("m", predict_response("m", {"p": wide}))  # derived: 2.4 MB of classes
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(RULES.format(mb=64))
    async with guard_process(cfg, tmp_path, "--upstream", upstream.address) as guard:
        await _predict(guard.address)
        cfg.write_text(RULES.format(mb=2))
        guard.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "config reloaded" not in guard.log_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log = guard.log_text()
        assert "max_message_mb changed; these take effect only after a restart" in log
        assert "config reloaded" in log and "max_message_mb=64" in log.split("config reloaded")[1]
        answer = await _predict(guard.address)
        assert len(answer.outputs["p_class"].int64_val) == 300_000  # type: ignore[attr-defined]


# The REST port is taken between preflight's check and the REST bind: the
# check is told to pass once, as it would have a moment before the race.
_RACE = """
import socket, sys
from guard import cli
from guard.control import preflight

busy = socket.socket()
busy.bind(("127.0.0.1", 0))
busy.listen()
checked = preflight.Listener.problem
passed = set()

def problem(self):
    if self.setting not in passed:
        passed.add(self.setting)
        return None
    return checked(self)

preflight.Listener.problem = problem
sys.exit(cli.main(["serve", "--config", sys.argv[1], "--listen", "127.0.0.1:0",
    "--metrics-listen", "127.0.0.1:0", f"--rest-listen=127.0.0.1:{busy.getsockname()[1]}"]))
"""


def test_a_rest_port_lost_after_grpc_started_is_one_line(tmp_path: Path) -> None:
    """Found: the one line came, then gRPC's servers, never stopped, printed
    'Event loop is closed' tracebacks, and the REST session was left unclosed."""
    config = tmp_path / "guard.yaml"
    config.write_text("upstream: 127.0.0.1:1\nrest_upstream: 127.0.0.1:2\nmodels: []\n")
    out = subprocess.run(
        [sys.executable, "-c", _RACE, str(config)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "rest_listen 127.0.0.1:" in out.stderr and "address already in use" in out.stderr
    for noise in ("Traceback", "Event loop is closed", "Unclosed"):
        assert noise not in out.stderr, out.stderr[-3000:]
