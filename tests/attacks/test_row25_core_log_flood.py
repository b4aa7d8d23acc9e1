"""Row 25: gRPC core's own error lines, one per malformed stream (a red-team pass).

A HEADERS frame with a malformed ``grpc-timeout`` (or an unknown
``grpc-encoding``) makes gRPC core write an error line to stderr, outside
Python logging and so outside the guard's once-a-minute log quota: one
client grew the log by 2.7 MiB a second. ``guard serve`` now starts gRPC
core with ``GRPC_VERBOSITY=NONE`` unless the environment sets it; the
client still gets its error, and ERROR shows the lines again.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.attacks import _harness as H
from tests.attacks import h2raw

STREAMS = 2000


def _flood(port: int) -> None:
    extra = [(b"grpc-timeout", b"abc")]
    block = h2raw.literal_header_block(h2raw.grpc_request_headers(H.PREDICT, extra=extra))
    flags = h2raw.F_END_HEADERS | h2raw.F_END_STREAM
    with h2raw.H2Client("127.0.0.1", port, timeout=5) as client:
        for i in range(STREAMS):
            client.send_raw(h2raw.frame(h2raw.T_HEADERS, flags, client.new_stream_id(), block))
            if i % 50 == 0:
                client.pump(0.001)
        client.drain(0.5)


def _log_growth(tmp: Path) -> tuple[int, str]:
    with H.guarded(tmp) as (_up, guard):
        time.sleep(0.3)
        before = guard.log_path.stat().st_size
        _flood(guard.port)
        time.sleep(0.5)
        grown = guard.log_path.stat().st_size - before
        assert H.legit_ok(guard.address).code == "OK"
    return grown, guard.log()


def test_malformed_streams_do_not_flood_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    quiet, _ = _log_growth(tmp_path)
    monkeypatch.setenv("GRPC_VERBOSITY", "ERROR")
    loud, log = _log_growth(tmp_path)
    assert "Error parsing 'grpc-timeout' metadata" in log  # what the flood writes, when asked
    assert loud > 100 * 1024, loud  # about 100 bytes a stream
    assert quiet < 4 * 1024, f"the log grew {quiet} bytes"
