"""Row 5: rapid reset (HEADERS + RST_STREAM pairs on one connection) must not
hurt other clients, must cost the guard little CPU, and the server must push
back on that connection.

grpcio 1.85's HTTP/2 server has no rule that answers an RST flood with GOAWAY
(docs/reliability.md, "Rapid reset"); what it can do is refuse streams past
``max_concurrent_streams`` with RST_STREAM(REFUSED_STREAM). So "pushed back"
here is: a GOAWAY, the connection closed, or at least half of the attack's
streams refused by the server."""

from __future__ import annotations

import time
from pathlib import Path

from tests.attacks import _harness as H
from tests.attacks import attacks

PAIRS, SECONDS = 60_000, 3.0
MAX_GUARD_CPU_S = 1.5  # over the attack and the 2 s after it; the guard as it is used ~4 s


def test_rapid_reset(tmp_path: Path) -> None:
    with H.guarded(tmp_path) as (_up, guard):
        with H.Prober(guard.address, interval_s=0.05, timeout_s=5, max_s=30) as prober:
            time.sleep(0.2)
            cpu0 = guard.cpu_s()
            outcome = attacks.rapid_reset(guard.port, PAIRS, SECONDS)
            time.sleep(2.0)
            cpu = guard.cpu_s() - cpu0
        assert guard.alive()
        assert not prober.failures, f"legit calls failed during rapid reset: {prober.summary()}"
        pushed_back = (
            outcome.goaway is not None or outcome.closed or outcome.refused >= outcome.pairs // 2
        )
        assert pushed_back, (
            f"{outcome.pairs} HEADERS+RST pairs in {outcome.seconds:.1f} s: no GOAWAY, "
            f"connection open, server resets {dict(outcome.server_resets)}"
        )
        assert cpu < MAX_GUARD_CPU_S, f"guard used {cpu:.2f} s CPU on {outcome.pairs} pairs"
