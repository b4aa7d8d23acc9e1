"""A relayed stream on which nothing moves for ``stream_idle_timeout_s``
ends with DEADLINE_EXCEEDED naming the setting, counted as ``stream_idle``,
and its upstream call is cancelled; a stream that keeps moving is not."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.attacks import _harness as H

IDLE_S = 1.0
RULES = f"stream_idle_timeout_s: {IDLE_S}\n" + H.BASE_RULES


def _echo(channel: grpc.Channel, messages: queue.Queue[bytes | None], method: str = "Echo") -> Any:
    def requests() -> Iterator[bytes]:
        while (m := messages.get()) is not None:
            yield m

    return channel.stream_stream(H.INTEROP + method)(requests(), timeout=30)


def test_a_stream_on_which_nothing_moves_is_ended_naming_the_setting(tmp_path: Path) -> None:
    with H.guarded(tmp_path, RULES) as (_up, guard), H.channel(guard.address) as ch:
        messages: queue.Queue[bytes | None] = queue.Queue()
        call = _echo(ch, messages)
        messages.put(b"hello")
        assert next(call) == b"echo:hello"
        began = time.monotonic()
        try:
            next(call)  # nothing more is sent: the guard ends the stream
            raise AssertionError("the stream went on")
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        waited = time.monotonic() - began
        messages.put(None)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
        assert "stream_idle_timeout_s (1 s)" in details, details
        assert IDLE_S * 0.9 <= waited < IDLE_S + 2, waited
        metrics = guard.metrics()
        assert H.sample(metrics, "guard_refused_requests_total", reason="stream_idle") == 1
        assert H.sample(metrics, "guard_inflight_requests") == 0


def test_a_stream_that_keeps_moving_outlives_the_idle_limit(tmp_path: Path) -> None:
    with H.guarded(tmp_path, RULES) as (_up, guard), H.channel(guard.address) as ch:
        messages: queue.Queue[bytes | None] = queue.Queue()
        call = _echo(ch, messages)
        got = []
        for i in range(6):  # 3 s in all, a message every 0.5 s
            messages.put(b"m%d" % i)
            got.append(next(call))
            time.sleep(IDLE_S / 2)
        messages.put(None)
        assert got == [b"echo:m%d" % i for i in range(6)]
        assert list(call) == [] and call.code() == grpc.StatusCode.OK
        assert H.sample(guard.metrics(), "guard_refused_requests_total", reason="stream_idle") == 0


def _inflight(guard: H.Proc, n: int) -> None:
    for _ in range(100):  # bounded: 5 s
        if H.sample(guard.metrics(), "guard_inflight_requests") == n:
            return
        time.sleep(0.05)
    raise AssertionError(f"in flight: {H.sample(guard.metrics(), 'guard_inflight_requests')}")


@pytest.mark.parametrize(
    "limits", ["max_concurrent_rpcs: 4\nmax_relayed_streams: 3\n", "max_concurrent_rpcs: 4\n"]
)
def test_streams_that_send_nothing_leave_the_unary_calls_their_share(
    tmp_path: Path, limits: str
) -> None:
    """Found (a red-team pass): a stream holds an in-flight slot from its
    headers on, and 1,100 streams that sent only headers held every one of
    max_concurrent_rpcs, every Predict refused, until stream_idle_timeout_s.
    Streams hold at most max_relayed_streams, and never more than three
    quarters of max_concurrent_rpcs (a lowered one, with max_relayed_streams
    left at 256)."""
    with H.guarded(tmp_path, limits + H.BASE_RULES) as (_up, guard), H.channel(guard.address) as ch:
        feeds = [queue.Queue[bytes | None]() for _ in range(5)]
        calls = []
        for i, feed in enumerate(feeds):
            calls.append(_echo(ch, feed))
            if i < 3:
                _inflight(guard, i + 1)
        refused = []
        for call in calls[3:]:
            try:
                next(call)
                raise AssertionError("a stream past max_relayed_streams was relayed")
            except grpc.RpcError as exc:
                refused.append((exc.code(), exc.details()))
        assert H.legit_ok(guard.address).code == "OK"
        assert H.sample(guard.metrics(), "guard_relayed_streams") == 3
        for code, details in refused:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert "max_relayed_streams" in details, details
        for feed in feeds[:3]:
            feed.put(b"late")
            feed.put(None)
        for call in calls[:3]:
            assert list(call) == [b"echo:late"] and call.code() == grpc.StatusCode.OK
        metrics = guard.metrics()
        assert H.sample(metrics, "guard_refused_requests_total", reason="relayed_streams") == 2
        assert H.sample(metrics, "guard_refused_requests_total", reason="inflight_calls") == 0
        assert H.sample(metrics, "guard_inflight_requests") == 0
        assert H.sample(metrics, "guard_relayed_streams") == 0
    clamped = "streaming calls may hold 3 of max_concurrent_rpcs (4), not max_relayed_streams (256)"
    assert (clamped in guard.log()) == ("max_relayed_streams" not in limits)


def test_silent_streams_to_a_method_the_upstream_does_not_serve_end_at_once(
    tmp_path: Path,
) -> None:
    """TF Serving serves no streaming method: a stream that sends nothing
    ends with the upstream's UNIMPLEMENTED, and its slot is free at once."""
    limits = "max_concurrent_rpcs: 4\nmax_relayed_streams: 3\n"
    with H.guarded(tmp_path, limits + H.BASE_RULES) as (_up, guard), H.channel(guard.address) as ch:
        feeds = [queue.Queue[bytes | None]() for _ in range(10)]
        try:
            for feed in feeds:  # one after another, each silent to the end
                call = _echo(ch, feed, "NoSuchStream")
                with pytest.raises(grpc.RpcError) as caught:
                    next(call)
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            for feed in feeds:
                feed.put(None)
        metrics = guard.metrics()
        assert H.sample(metrics, "guard_relayed_streams") == 0
        assert H.sample(metrics, "guard_refused_requests_total", reason="relayed_streams") == 0
        assert H.legit_ok(guard.address).code == "OK"
