"""Row 24: grpc.health.v1 requests of up to max_request_mb (a red-team pass).

A health request names a service, in a few bytes, but gRPC takes one of up
to ``max_request_mb``; health calls were read outside the arrivals watch,
and Check's NOT_FOUND echoed the name (a 31 MiB name of control bytes became
a 124 MB repr, then a percent-encoded trailer). One such Check took the
guard from 58 to 727 MB (799 MB, past a ``max_memory_mb`` of 480: every
client connection shut), 16 at once to 2,070 MB, and eight Watch streams on
one connection held 588 MB for as long as they stayed open. Health
requests now take at most 4 KiB, are read under the arrivals watch like a
Predict's, and the name in an error is cut.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from tests.attacks import _harness as H

CHECK = "/grpc.health.v1.Health/Check"
BIG = health_pb2.HealthCheckRequest(service="\x01" * (31 << 20)).SerializeToString()


def _health(ch: grpc.Channel, request: bytes, method: str = CHECK) -> H.CallResult:
    start = time.perf_counter()
    try:
        answer = ch.unary_unary(method)(request, timeout=30)
        return H.CallResult("OK", time.perf_counter() - start, body=answer)
    except grpc.RpcError as exc:
        return H.CallResult(exc.code().name, time.perf_counter() - start, exc.details() or "")


def test_health_requests_are_bounded_alone_and_together(tmp_path: Path) -> None:
    with H.guarded(tmp_path, "max_inflight_mb: 64\n" + H.BASE_RULES) as (_up, guard):
        before_kb = guard.hwm_kb()
        with H.channel(guard.address) as ch:
            alone = _health(ch, BIG)
            unknown = _health(
                ch, health_pb2.HealthCheckRequest(service="x" * 4000).SerializeToString()
            )
            watched = _health(ch, BIG, "/grpc.health.v1.Health/Watch")
        together = H.calls_at_once(guard.address, BIG, 16, _health)
        peak_mb = (guard.hwm_kb() - before_kb) / 1024
        metrics = guard.metrics()
        with H.channel(guard.address) as ch:
            serving = _health(ch, health_pb2.HealthCheckRequest(service="").SerializeToString())
    assert alone.code == "RESOURCE_EXHAUSTED", alone
    assert alone.details.startswith(f"guard: a health request of {len(BIG)} bytes"), alone
    assert unknown.code == "NOT_FOUND" and len(unknown.details) < 300, unknown
    assert watched.code == "RESOURCE_EXHAUSTED", watched
    assert Counter(r.code for r in together) == {"RESOURCE_EXHAUSTED": 16}
    refused = H.sample(metrics, "guard_refused_requests_total", reason="request_too_large")
    assert (
        refused + H.sample(metrics, "guard_refused_requests_total", reason="inflight_bytes") >= 18
    )
    assert health_pb2.HealthCheckResponse.FromString(serving.body).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    # Before: 727 MB for one, 2,070 MB for 16 at once; measured since: 265 MB.
    assert peak_mb < 600, f"the guard's peak grew {peak_mb:.0f} MB"
