"""Row 7: an upstream response of ~40 bytes that declares shape [8,000,000]
with one float_val (TF's fill convention repeats the last value) under a
threshold + labels rule. The guard may answer it or refuse it, but with
bounded memory and without stalling other calls."""

from __future__ import annotations

import time
from pathlib import Path

from tests.attacks import _harness as H
from tests.attacks import protos

RULES = (
    "models:\n"
    "  - name: m\n    outputs: [{name: p, argmax: true, labels: [a, b]}]\n"
    "  - name: '*'\n    outputs: [{name: p, threshold: 0.5, labels: [n, y]}]\n"
)
MAX_PEAK_GROWTH_MB = 512  # the guard as it is peaks at ~1 GB
MAX_STALL_S = 0.5  # the guard as it is blocks its loop ~2 s


def test_fill_convention_expansion_is_bounded(tmp_path: Path) -> None:
    with H.guarded(tmp_path, RULES) as (_up, guard):
        with H.Prober(guard.address, interval_s=0.02, timeout_s=30, max_s=60) as prober:
            time.sleep(0.3)
            start_kb = guard.rss_kb()
            with H.channel(guard.address) as ch:
                result = H.legit_call(ch, protos.predict_request("fill:8000000"), timeout=30)
            time.sleep(0.3)
        peak_mb = (guard.hwm_kb() - start_kb) / 1024
        assert result.code == "OK" or result.details.startswith("guard: "), (
            f"{result.code} {result.details[:200]!r}"
        )
        assert not prober.failures, prober.summary()
        assert peak_mb < MAX_PEAK_GROWTH_MB, f"peak RSS grew {peak_mb:.0f} MB on a 40-byte response"
        assert prober.max_latency_s < MAX_STALL_S, (
            f"a legit call waited {prober.max_latency_s:.2f} s ({prober.summary()})"
        )
