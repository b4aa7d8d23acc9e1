"""Row 17: a CONTINUATION flood (the HTTP/2 attacks of 2024, CVE-2024-27316
and its kin). A HEADERS frame without END_HEADERS, then CONTINUATION frames
that never end the block: empty ones (CPU), or ones full of new header
names (memory). Servers that kept reading such a block were held or
OOM-killed. gRPC's core (grpcio 1.85) closes the connection within a few
hundred such frames (300 empty ones, 500 of new headers, in 100-frame
batches): the flood costs the guard little, and a client on another
connection is served. This holds gRPC to it across upgrades."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.attacks import _harness as H
from tests.attacks import h2raw

MAX_FRAMES = 200_000
BATCH = 100


def _continuations(kind: str, stream_id: int) -> bytes:
    if kind == "empty":
        payload = b""
    else:  # a hundred new 100-byte headers per frame
        payload = h2raw.literal_header_block(
            [(f"x-flood-{i}".encode(), b"v" * 100) for i in range(100)]
        )
    return h2raw.frame(h2raw.T_CONT, 0, stream_id, payload) * BATCH


@pytest.mark.parametrize("kind", ["empty", "new-headers"])
def test_a_header_block_without_end_has_its_connection_closed(tmp_path: Path, kind: str) -> None:
    with H.guarded(tmp_path) as (_up, guard):
        rss_before, cpu_before = guard.rss_kb(), guard.cpu_s()
        client = h2raw.H2Client("127.0.0.1", guard.port, timeout=5)
        sid = client.new_stream_id()
        block = h2raw.literal_header_block(h2raw.grpc_request_headers(H.PREDICT))
        client.send_raw(h2raw.frame(h2raw.T_HEADERS, 0, sid, block))  # no END_HEADERS
        flood = _continuations(kind, sid)
        sent, start = 0, time.monotonic()
        while sent < MAX_FRAMES and time.monotonic() - start < 10 and client.send_raw(flood):
            sent += BATCH
            client.drain(0)
        # On a busy box the kernel's buffers can take every frame before gRPC
        # reads them (200,000 empty ones are 1.8 MB): what counts is that it
        # closes the connection once it reads them.
        while not client.closed and client.goaway is None and time.monotonic() - start < 10:
            client.pump(0.1)
        closed = client.closed or client.goaway is not None
        closed_after_s = time.monotonic() - start
        client.close()
        legit = H.legit_ok(guard.address)
        cpu_s = guard.cpu_s() - cpu_before
        grown_mb = (guard.rss_kb() - rss_before) / 1024
    assert closed, f"the guard took {sent} CONTINUATION frames and kept the connection open"
    assert closed_after_s < 5, closed_after_s
    assert legit.code == "OK", legit
    assert cpu_s < 1.0, f"the flood cost the guard {cpu_s:.2f} s of CPU"
    # 16-17 MB measured (gRPC core's own cost of the flood, not the guard's).
    assert grown_mb < 32, f"the flood grew the guard by {grown_mb:.0f} MB"
