"""Row 19: a client that sends ahead of what the guard reads. gRPC takes in
whatever fits in a stream's HTTP/2 window, and sizes that window from its
bandwidth estimate: on loopback it reached 85 MB per stream. Two ways to
fill it:

- unary calls to a slow model whose client goes on sending after its
  request (the guard read one message and forwarded it): 100 such calls on
  one connection took the guard 4.8 GB in 15 s;
- relayed bidirectional streams whose upstream echoes and whose client
  reads nothing, so the guard stops reading: 45 of them took 5 GB in 20 s.

With ``stream_window_kb`` (1 MiB by default) a stream holds at most its
window; a unary call is forwarded only once its client has ended the stream;
a relayed stream counts its window, and the message it waits to pass on, in
``max_inflight_mb``, and a connection whose streams wait on a client that
takes nothing for ``stream_idle_timeout_s`` is closed."""

from __future__ import annotations

import struct
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.attacks import _harness as H
from tests.attacks import h2raw, protos

WINDOW = 1024 * 1024  # stream_window_kb's default
MB = 1024 * 1024


def _send_for(client: h2raw.H2Client, streams: list[int], message: bytes, seconds: float) -> int:
    """Send ``message`` on each stream, round and round, as far as the guard's
    windows let, for ``seconds``; the bytes sent."""
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        moved = 0
        for sid in streams:
            if client.send_data(sid, message, bound_s=0.02):
                moved += 1
                sent += len(message)
        if not moved:
            client.drain(0.2)
    return sent


@pytest.mark.parametrize("after", ["messages", "one_large_message"])
def test_unary_calls_that_go_on_sending_after_their_request_are_refused(
    tmp_path: Path, after: str
) -> None:
    """Whatever follows a unary request before its client ends the stream is
    read before the call is forwarded: a second message gets INVALID_ARGUMENT,
    one large second message is an arrival like any request (the watch
    refuses the last to begin), and nothing waits unread while the upstream
    works (with only the window, 100 such calls on one connection held
    +106 MB; with gRPC's sizing, +4.8 GB in 15 s)."""
    with H.guarded(tmp_path) as (up, guard):
        rss_before, hwm_before = guard.rss_kb(), guard.hwm_kb()
        client = h2raw.H2Client("127.0.0.1", guard.port)
        try:
            streams = []
            for _ in range(100):
                sid = client.new_stream_id()
                client.send_headers(sid, h2raw.grpc_request_headers(H.PREDICT))
                client.send_data(sid, h2raw.grpc_message(protos.predict_request("slow:30")))
                if after == "one_large_message":  # its 5-byte prefix: 16 MB to come
                    client.send_data(sid, struct.pack(">BI", 0, 16_000_000))
                streams.append(sid)
            _send_for(client, streams, bytes(256 * 1024), seconds=4)
            client.wait(lambda: all(client.streams[s].grpc_status for s in streams), timeout=10)
            grown_mb = (guard.rss_kb() - rss_before) / 1024
            peak_mb = (guard.hwm_kb() - hwm_before) / 1024
            statuses = Counter(client.streams[s].grpc_status for s in streams)
            details = {client.streams[s].grpc_message or "" for s in streams}
            legit = H.legit_ok(guard.address)
        finally:
            client.close()
        assert H.upstream_stats(up)["calls"].get("Predict", 0) == 1  # the legitimate one
        assert set(statuses) <= {3, 8} and statuses[3] >= 1, statuses
        assert any("takes one request message" in d for d in details), details
        if after == "one_large_message":
            assert statuses[8] >= 90, statuses  # refused as they arrived
            assert any("max_inflight_mb" in d for d in details), details
        else:
            assert statuses[3] == 100, statuses
        # one_large_message peaked at 161-262 MB in six runs here, 398 MB once
        # in CI; unread, the same calls took +4.8 GB in 15 s.
        assert peak_mb < 512 and grown_mb < 100, (peak_mb, grown_mb)
        assert legit.code == "OK", legit


def test_relayed_streams_whose_client_reads_nothing_are_bounded_by_the_budget(
    tmp_path: Path,
) -> None:
    budget_mb, idle_s = 100, 8.0
    rules = f"max_inflight_mb: {budget_mb}\nstream_idle_timeout_s: {idle_s}\n" + H.BASE_RULES
    with H.guarded(tmp_path, rules) as (_up, guard):
        rss_before = guard.rss_kb()
        client = h2raw.H2Client(
            "127.0.0.1", guard.port, settings={h2raw.S_INITIAL_WINDOW_SIZE: 0},
            auto_window=False, ack_pings=True,
        )  # fmt: skip
        try:
            streams = []
            for _ in range(45):
                sid = client.new_stream_id()
                client.send_headers(sid, h2raw.grpc_request_headers(H.INTEROP + "Echo"))
                streams.append(sid)
            sent = _send_for(client, streams, h2raw.grpc_message(bytes(1_000_000)), seconds=5)
            grown_mb = (guard.rss_kb() - rss_before) / 1024
            held = H.sample(guard.metrics(), "guard_inflight_bytes")
            ended = [client.streams[s] for s in streams if client.streams[s].grpc_status]
            # The streams still held wait on a client that takes nothing: past
            # stream_idle_timeout_s their connection is closed.
            client.wait(lambda: False, timeout=idle_s + 5)
            closed = client.closed
        finally:
            client.close()
        assert sent > 100 * MB, f"only {sent / MB:.0f} MiB sent: the attack did not run"
        assert ended and all(s.grpc_status == 8 for s in ended), [s.grpc_status for s in ended]
        assert any("max_inflight_mb (100 MiB)" in (s.grpc_message or "") for s in ended)
        # A call's own bytes are not held against it: the budget may be passed
        # by what one call holds, both ways, and streams that pass their own
        # check together may each do so (94-102 MiB measured under load).
        assert held <= budget_mb * MB + 4 * (2 * 1_000_000 + WINDOW), held
        assert grown_mb < 2 * budget_mb, f"RSS grew {grown_mb:.0f} MB"
        assert closed, "the guard kept the connection"
        deadline = time.monotonic() + 10
        while H.sample(guard.metrics(), "guard_inflight_bytes") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert H.sample(guard.metrics(), "guard_inflight_bytes") == 0
        assert H.legit_ok(guard.address).code == "OK"
