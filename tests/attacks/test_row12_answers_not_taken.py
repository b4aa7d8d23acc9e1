"""Row 12: a client that asks for large answers and never opens its HTTP/2
flow-control window (it answers PINGs, so the connection looks alive). gRPC
holds each answer until the window opens; uncounted, 20 answers of 16 MB held
about 700 MB. The answers held are counted in ``max_inflight_mb`` until their
call ends: past it, the upstream's answer (a unary call's, or a relayed
stream's next message) is refused with RESOURCE_EXHAUSTED naming the
setting, a legitimate client is still served, and closing the connection
gives the budget back.

A relayed stream costs more than its message: while the guard waits on the
client it reads nothing from the upstream, whose next messages fill the
stream's HTTP/2 window in gRPC's buffers. With gRPC's estimated windows, 45
streams of 1 MB messages held 817 MB against this 100 MiB budget; streams
now have a fixed window (``stream_window_kb``), counted with each message
held."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.attacks import _harness as H
from tests.attacks import h2raw, protos

BUDGET = 100 * 1024 * 1024
RULES = f"max_inflight_mb: {BUDGET >> 20}\n" + H.BASE_RULES
VALUES = 4_000_000  # big:N answers N float32 values in tensor_content: 16 MB
WINDOW = 1024 * 1024  # stream_window_kb's default: how far the upstream sends ahead on a stream


def _fanout(n: int, size: int) -> bytes:
    return json.dumps({"n": n, "size": size}).encode()


# What each stream asks for, how many streams, and what one answer held
# counts (gRPC's copy twice; a relayed stream's window with it): a unary
# Predict answered by 16 MB, a relayed server stream of 16 MB messages (the
# upstream has more to send when the guard refuses to take on the first), or
# many relayed streams of 1 MB messages, where the windows weigh the most.
CALLS = {
    "unary": (H.PREDICT, protos.predict_request(f"big:{VALUES}"), 20, 2 * VALUES * 4),
    "stream": (
        H.INTEROP + "Fanout", _fanout(3, VALUES * 4), 20, 2 * VALUES * 4 + WINDOW,
    ),
    "small_stream": (
        H.INTEROP + "Fanout", _fanout(40, 1_000_000), 45, 2 * 1_000_000 + WINDOW,
    ),
}  # fmt: skip


def _open_without_window(
    port: int, path: str, request: bytes, count: int
) -> tuple[h2raw.H2Client, list[int]]:
    client = h2raw.H2Client(
        "127.0.0.1", port, settings={h2raw.S_INITIAL_WINDOW_SIZE: 0},
        auto_window=False, ack_pings=True,
    )  # fmt: skip
    streams = []
    for _ in range(count):
        sid = client.new_stream_id()
        client.send_headers(sid, h2raw.grpc_request_headers(path))
        client.send_data(sid, h2raw.grpc_message(request), end_stream=True)
        streams.append(sid)
    return client, streams


@pytest.mark.parametrize("kind", sorted(CALLS))
def test_answers_a_client_never_takes_are_bounded_by_the_budget(tmp_path: Path, kind: str) -> None:
    path, request, count, each = CALLS[kind]
    fit = BUDGET // each  # the answers the budget takes; the others are refused
    with H.guarded(tmp_path, RULES) as (_up, guard):
        rss_before = guard.rss_kb()
        client, streams = _open_without_window(guard.port, path, request, count)
        try:

            def refused() -> int:
                return sum(
                    1 for s in streams if s in client.streams and client.streams[s].grpc_status
                )

            def grown_mb() -> float:
                return (guard.rss_kb() - rss_before) / 1024

            client.wait(lambda: refused() >= count - fit, timeout=30)
            deadline = time.monotonic() + 10  # the refused answers' memory is trimmed meanwhile
            while grown_mb() >= 2 * BUDGET / 2**20 and time.monotonic() < deadline:
                client.drain(0.5)
            held_rss_mb = grown_mb()
            metrics = guard.metrics()
            legit = H.legit_ok(guard.address, timeout=5)
            statuses = [client.streams[s].grpc_status for s in streams if s in client.streams]
            details = {client.streams[s].grpc_message for s in streams if s in client.streams}
        finally:
            client.close()
        held = H.sample(metrics, "guard_inflight_bytes")
        # 2048: a unary's framing; 32 KiB: its call's state, held with its answer.
        assert fit * each <= held <= fit * (each + 2048 + 32 * 1024), (fit, held)
        assert statuses.count(8) == count - fit, statuses
        assert any(d and "max_inflight_mb (100 MiB)" in d for d in details), details
        refusals = H.sample(metrics, "guard_refused_requests_total", reason="inflight_bytes")
        assert refusals == count - fit
        assert legit.code == "OK", legit
        # What the answers held cost: within deploy.md's 2 x max_inflight_mb.
        assert held_rss_mb < 2 * BUDGET / 2**20, f"RSS grew {held_rss_mb:.0f} MB"
        deadline = time.monotonic() + 10
        while H.sample(guard.metrics(), "guard_inflight_bytes") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert H.sample(guard.metrics(), "guard_inflight_bytes") == 0


def test_small_answers_never_taken_are_bounded_by_what_their_calls_hold(tmp_path: Path) -> None:
    """Found (red team): gRPC holds about 26 KB for each call whose answer is
    not taken, and the budget counted only the answer: 2,000 small answers
    held 52 MB against 0.45 MB counted. Each now counts 32 KiB as well: with
    1 MiB of budget, some 30 of 100 are held, the rest refused."""
    with H.guarded(tmp_path, "max_inflight_mb: 1\n" + H.BASE_RULES) as (_up, guard):
        client, streams = _open_without_window(guard.port, H.PREDICT, H.LEGIT_REQUEST, 100)
        try:

            def ended() -> int:
                return sum(1 for s in streams if client.streams.get(s, h2raw.StreamState()).done)

            client.wait(lambda: ended() >= 60, timeout=20)
            client.drain(1.0)  # the last refusals as they come
            metrics = guard.metrics()
            statuses = [client.streams[s].grpc_status for s in streams if s in client.streams]
        finally:
            client.close()
    held = H.sample(metrics, "guard_inflight_bytes")
    refusals = H.sample(metrics, "guard_refused_requests_total", reason="inflight_bytes")
    assert statuses.count(8) == refusals >= 60, (statuses, refusals)
    assert 100 - refusals <= (1 << 20) // (32 * 1024), refusals
    assert held <= (1 << 20) + 33 * 1024, held  # the last one admitted may pass the budget


@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_answers_not_taken_within_the_idle_limit_have_their_connection_closed(
    tmp_path: Path, kind: str
) -> None:
    """gRPC cannot end a call whose answer waits on the client (its status
    would queue behind the answer), so such a client held the budget until
    max_connection_age_s (an hour). Past stream_idle_timeout_s its connection
    is closed: the budget comes back, and a legitimate client is served."""
    idle_s = 2.0
    path, request, _count, _each = CALLS[kind]
    with H.guarded(tmp_path, f"stream_idle_timeout_s: {idle_s}\n" + RULES) as (_up, guard):
        client, streams = _open_without_window(guard.port, path, request, 3)
        # And a call still waiting on the upstream when the connection goes.
        waiting = client.new_stream_id()
        client.send_headers(waiting, h2raw.grpc_request_headers(H.PREDICT))
        client.send_data(
            waiting, h2raw.grpc_message(protos.predict_request("slow:30")), end_stream=True
        )
        began = time.monotonic()
        try:
            everything = 3 * 2 * VALUES * 4

            def held() -> float:
                return H.sample(guard.metrics(), "guard_inflight_bytes")

            client.wait(lambda: held() >= everything, timeout=10)
            held_at_most = held()
            client.wait(lambda: False, timeout=idle_s + 5)  # until the guard closes it
            closed_after = time.monotonic() - began
            closed = client.closed
        finally:
            client.close()
        assert held_at_most >= everything, held_at_most
        assert closed, "the guard kept the connection"
        assert idle_s <= closed_after < idle_s + 4, closed_after
        # gRPC ends the connection's calls as it sees it go: a relayed call's
        # bytes are given back by its done callback, ahead of its handler
        # counting it (and giving its slot back).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            H.sample(guard.metrics(), name)
            for name in ("guard_inflight_bytes", "guard_inflight_requests")
        ):
            time.sleep(0.05)
        metrics = guard.metrics()
        assert H.sample(metrics, "guard_inflight_bytes") == 0
        assert H.sample(metrics, "guard_refused_requests_total", reason="stream_idle") >= 1
        assert H.legit_ok(guard.address).code == "OK"
        assert "closed the connection of ipv" in guard.log()
        # An answer the closed connection could not take is a warning line,
        # not gRPC's traceback (of the guard's write, or its own send).
        assert "Traceback" not in guard.log(), guard.log()[-3000:]
        # Every call on the closed connection is counted as its client saw it
        # (the stream removed): the call waiting on the upstream, and the
        # relayed streams (they were CANCELLED, and UNKNOWN). Unary answers
        # handed to gRPC were counted OK as they went.
        unavailable = 1 + (3 if kind == "stream" else 0)
        assert H.sample(metrics, "guard_requests_total", code="UNAVAILABLE") == unavailable
        assert H.sample(metrics, "guard_requests_total", code="CANCELLED") == 0
