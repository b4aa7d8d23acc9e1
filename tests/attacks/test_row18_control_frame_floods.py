"""Row 18: the HTTP/2 floods of 2019 (CVE-2019-9512, -9513, -9515, -9518 and
kin), from a client that never reads what comes back: PING and SETTINGS
frames (each owes an acknowledgement, which queues up in a server that
keeps answering), empty DATA frames, PRIORITY frames and one-byte
WINDOW_UPDATEs. gRPC's core (grpcio 1.85) closes the connection on the
first three. PRIORITY and WINDOW_UPDATE frames it reads at line rate, at
about the CPU it takes to receive as many bytes of requests, and in some
runs grows by 150 MB a second or more while they come, until the
connection closes (a plain grpc.aio server does too: 4 runs of 10 with
WINDOW_UPDATEs, up to +316 MB in 6 s); the guard cannot see that
connection, so ``max_memory_mb`` closes them all (clients reconnect)
before a memory limit would kill the process. In every case the peak
stays bounded and a client on another connection is served."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.attacks import _harness as H
from tests.attacks import attacks, h2raw

T_PRIORITY = 2
# kind: (the frame, whether the connection gets closed (None: when the guard
# grows past the ceiling, which PRIORITY and WINDOW_UPDATE floods do in some
# runs and not in others), for how long to send)
FLOODS: dict[str, tuple[bytes, bool | None, float]] = {
    "ping": (h2raw.frame(h2raw.T_PING, 0, 0, b"floodin!"), False, 3.0),  # closed, mostly
    "settings": (h2raw.frame(h2raw.T_SETTINGS, 0, 0, struct.pack(">HI", 4, 65535)), True, 3.0),
    "empty-data": (h2raw.frame(h2raw.T_DATA, 0, 1, b""), True, 3.0),
    "priority": (h2raw.frame(T_PRIORITY, 0, 1, struct.pack(">IB", 0, 16)), None, 8.0),
    "window-update": (h2raw.frame(h2raw.T_WINDOW, 0, 0, struct.pack(">I", 1)), None, 3.0),
}
CEILING_MB = 128  # MiB; a fresh guard takes about 60


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_a_control_frame_flood_leaves_the_guard_serving(tmp_path: Path, kind: str) -> None:
    frame, closes, flood_s = FLOODS[kind]
    config = f"max_memory_mb: {CEILING_MB}\n" + H.BASE_RULES
    with H.guarded(tmp_path, config) as (_up, guard):
        with H.Prober(guard.address) as prober:
            flood = attacks.frame_flood(
                guard.port, frame, flood_s, open_stream=kind == "empty-data"
            )
        peak_mb = guard.hwm_kb() / 1024
        after = H.legit_ok(guard.address)
        resets = H.sample(guard.metrics(), "guard_memory_resets_total")
    if closes is None:  # closed by the ceiling only (which may also act just after)
        assert resets > 0 or not flood.closed, (flood, resets)
    elif closes:
        assert flood.closed and flood.seconds < flood_s, f"{kind}: open after {flood.seconds:.1f} s"
    # The prober's connection is closed with the others when the ceiling acts
    # (a call on it then ends UNAVAILABLE, and the next reconnects); no call
    # may hang, and none fails otherwise.
    assert not prober.failures or resets > 0, prober.summary()
    assert prober.max_latency_s < 1.0, prober.summary()
    assert after.code == "OK", after
    assert peak_mb < CEILING_MB + 128, f"{kind}: the guard peaked at {peak_mb:.0f} MB"
    assert resets == 0 or closes is None, resets
