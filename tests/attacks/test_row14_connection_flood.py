"""Row 14: a flood of idle connections. Each HTTP/2 connection gRPC holds
costs the guard about 17 KB (3,000 took 51 MB) and is kept until
max_connection_idle_s; without a cap, a client could take the process to its
memory limit or its file descriptors. With ``max_connections``, gRPC closes
what comes past the cap before the handshake: the connections already open,
a legitimate client's among them, keep working, and a new connection is
taken once the flood's close."""

from __future__ import annotations

import time
from pathlib import Path

from tests.attacks import _harness as H
from tests.attacks import h2raw

CAP = 8  # two for each of the port's four gRPC servers
RULES = f"max_connections: {CAP}\n" + H.BASE_RULES
FLOOD = 60


def test_connections_past_max_connections_are_closed_and_the_open_ones_served(
    tmp_path: Path,
) -> None:
    with H.guarded(tmp_path, RULES) as (_up, guard), H.channel(guard.address) as legit:
        assert H.legit_call(legit).code == "OK"  # its connection is held from here on
        rss_before = guard.rss_kb()
        flood = [h2raw.H2Client("127.0.0.1", guard.port, timeout=5) for _ in range(FLOOD)]
        try:
            time.sleep(0.5)
            for client in flood:
                client.drain(0.02)
            still_open = [c for c in flood if not c.closed]
            answered = sum("SettingsFrame" in c.frames_in for c in still_open)
            during = H.legit_call(legit)
            grown_mb = (guard.rss_kb() - rss_before) / 1024
        finally:
            for client in flood:
                client.close()
        assert 1 <= len(still_open) <= CAP - 1, len(still_open)
        assert answered == len(still_open)  # the ones kept have their HTTP/2 handshake
        assert during.code == "OK", during
        assert grown_mb < 10, f"RSS grew {grown_mb:.1f} MB"
        fresh = H.answering_within(guard, 5.0)
        assert fresh is not None and fresh.code == "OK", fresh
