"""Row 23: grpc.health.v1 Watch streams held by a hostile client.

Found (a red-team pass): with grpcio-health-checking's servicer, one Watch
whose client advertised a zero HTTP/2 window held the service's lock for
good. The status froze (a dead upstream stayed SERVING to every Check: the
readiness probe's call), and SIGTERM never drained (the guard was alive 30 s
later, past a 10 s grace). 13,000 watchers took 300 MB that no limit or
metric saw. Now the status never waits on a watcher, a watcher that takes
nothing for stream_idle_timeout_s has its connection closed, and watches are
bounded by max_connections.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.attacks import _harness as H
from tests.attacks import h2raw

WATCH = "/grpc.health.v1.Health/Watch"


def _check(address: str, service: str = "") -> str:
    with H.channel(address) as ch:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            answer = health_pb2_grpc.HealthStub(ch).Check(request, timeout=3)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def _serving_within(address: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _check(address) == "SERVING":
            return True
        time.sleep(0.1)
    return False


def _checked_on(stub: health_pb2_grpc.HealthStub, seconds: float) -> bool:
    """A Check answered SERVING on ``stub``'s channel within ``seconds``."""
    deadline = time.monotonic() + seconds
    request = health_pb2.HealthCheckRequest(service="")
    while time.monotonic() < deadline:
        try:
            if stub.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    return False


def _stuck_watch(port: int) -> h2raw.H2Client:
    """A Watch on "" from a client whose stream windows are 0: it takes nothing."""
    client = h2raw.H2Client(
        "127.0.0.1", port, settings={h2raw.S_INITIAL_WINDOW_SIZE: 0}, auto_window=False
    )
    sid = client.new_stream_id()
    client.send_headers(sid, h2raw.grpc_request_headers(WATCH))
    request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    client.send_data(sid, h2raw.grpc_message(request), end_stream=True)
    client.drain(0.5)
    return client


def test_a_watch_that_takes_nothing_freezes_neither_health_nor_shutdown(tmp_path: Path) -> None:
    config = "stream_idle_timeout_s: 2\nshutdown_grace_s: 5\n" + H.BASE_RULES
    with H.guarded(tmp_path, config) as (upstream, guard):
        assert _serving_within(guard.address, 10)
        stuck = _stuck_watch(guard.port)
        upstream.stop()
        start = time.monotonic()
        while time.monotonic() - start < 8 and _check(guard.address) == "SERVING":
            stuck.drain(0.1)
        followed_s = time.monotonic() - start
        states = {s: _check(guard.address, s) for s in ("", "tensorflow.serving.ModelService")}
        stuck.wait(lambda: stuck.closed, 5)  # the status it never took: its connection closed
        cut = H.sample(guard.metrics(), "guard_refused_requests_total", reason="stream_idle")
        stuck.close()
        stuck2 = _stuck_watch(guard.port)
        guard.popen.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = guard.popen.wait(timeout=30)
        drained_s = time.monotonic() - start
        stuck2.close()
    assert followed_s < 4, f"health still SERVING {followed_s:.1f} s after the upstream died"
    assert states == {"": "NOT_SERVING", "tensorflow.serving.ModelService": "NOT_SERVING"}
    assert stuck.closed and cut >= 1
    assert code == 0 and drained_s < 7, f"exit {code} after {drained_s:.1f} s"


def test_watches_past_max_connections_are_refused(tmp_path: Path) -> None:
    with H.guarded(tmp_path, "max_connections: 4\n" + H.BASE_RULES) as (_up, guard):
        assert _serving_within(guard.address, 10)
        with H.channel(guard.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            request = health_pb2.HealthCheckRequest(service="")
            # The probe's connections may still hold max_connections until
            # the guard sees them close (CI: this channel's connection was
            # refused, and all five watches read "Socket closed"): the
            # watches go once this channel's connection is in.
            assert _checked_on(stub, 5), "the channel's connection was never let in"
            watches = [stub.Watch(request, timeout=10) for _ in range(5)]
            firsts = []
            for watch in watches:
                try:
                    firsts.append(health_pb2.HealthCheckResponse.ServingStatus.Name(
                        next(watch).status))  # fmt: skip
                except grpc.RpcError as exc:
                    firsts.append(f"{exc.code().name}: {exc.details()}")
            for watch in watches:
                watch.cancel()
        # A new connection: with max_connections 4, each of the port's four
        # listeners takes one, and the one the watches used may not have
        # seen its close yet (CI read UNAVAILABLE once), so allow it a moment.
        answered = _serving_within(guard.address, 5)
    # Five watches sent at once reach the guard in any order: four are
    # served, whichever came last is refused.
    refused = [f for f in firsts if f != "SERVING"]
    assert firsts.count("SERVING") == 4 and len(refused) == 1, firsts
    assert refused[0].startswith("RESOURCE_EXHAUSTED") and "max_connections" in refused[0]
    assert answered
