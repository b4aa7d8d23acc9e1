"""Row 2: streams that open and never deliver their request message must not
lock legitimate clients out. 1,100 of them on one connection (more than the
default max_concurrent_rpcs of 1024 plus grpc's margin): a legitimate call on
another connection still succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.attacks import _harness as H
from tests.attacks import attacks


@pytest.mark.parametrize("mode", ["headers", "prefix"])
def test_stuck_streams_leave_room_for_legit_calls(tmp_path: Path, mode: str) -> None:
    with H.guarded(tmp_path) as (_up, guard):
        client = attacks.stuck_streams(guard.port, 1100, mode)
        try:
            client.drain(1.0)  # let the server take in all 1,100
            results = [H.legit_ok(guard.address, timeout=3) for _ in range(5)]
        finally:
            client.close()
        bad = [(r.code, r.details) for r in results if r.code != "OK"]
        assert not bad, f"legit calls failed while 1,100 {mode} streams were open: {bad}"
