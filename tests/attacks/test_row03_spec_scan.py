"""Row 3: finding the model_spec of a request must cost bounded time, however
much a (gzip'd, so cheap to send) request hides in front of it, and field
number 0 is not a field."""

from __future__ import annotations

import time
from pathlib import Path

from tests.attacks import _harness as H
from tests.attacks import attacks, h2raw, protos

MAX_STALL_S = 0.5


def test_late_model_spec_does_not_stall_other_calls(tmp_path: Path) -> None:
    """4 MiB of unknown varint fields (about 4 KiB gzip'd) before the spec.
    The current guard scans them in Python on the event loop (~2 s here); a
    legitimate call probing every 20 ms from another connection must never wait
    more than half a second."""
    body = attacks.hidden_spec_request(4, "varint")
    assert len(body) < 16 * 1024
    with H.guarded(tmp_path) as (_up, guard):
        with H.Prober(guard.address, interval_s=0.02, timeout_s=30, max_s=40) as prober:
            time.sleep(0.2)
            state = attacks.send_compressed(guard.port, body, timeout=30)
            time.sleep(0.2)
        assert state.done, "the hidden-spec call never ended"
        assert not prober.failures, prober.summary()
        assert prober.max_latency_s < MAX_STALL_S, (
            f"a legit call waited {prober.max_latency_s:.2f} s behind one 4 MiB "
            f"hidden-spec request ({prober.summary()})"
        )


def test_field_number_zero_is_not_skipped(tmp_path: Path) -> None:
    """``00 00`` is "field 0, varint 0", which protobuf forbids; a request that
    starts with it is malformed, so its model_spec behind it must not be
    trusted: the call is not counted under model ``m``."""
    request = b"\x00\x00" * 8 + protos.predict_request("m")
    with H.guarded(tmp_path) as (_up, guard):
        with h2raw.H2Client("127.0.0.1", guard.port, timeout=5) as client:
            client.unary(H.PREDICT, request)
        metrics = guard.metrics()
        counted_as_m = H.sample(metrics, "guard_requests_total", model="m")
        assert counted_as_m == 0, "a malformed request was attributed to model 'm'"
