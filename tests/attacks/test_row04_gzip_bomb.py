"""Row 4: gzip bombs are refused (RESOURCE_EXHAUSTED), the memory they made
grpc allocate is returned, and 8 at once stay within a memory bound."""

from __future__ import annotations

import time
from pathlib import Path

from tests.attacks import _harness as H
from tests.attacks import attacks

RESOURCE_EXHAUSTED = 8
MB = 1024  # kB per MB, /proc units
PEAK_GROWTH_MB = 1024  # 8 bombs of 300 MiB against max_message_mb 256 (1.7 GB reported)
SETTLED_GROWTH_MB = 64  # within 10 s


def test_eight_concurrent_bombs(tmp_path: Path) -> None:
    with H.guarded(tmp_path) as (_up, guard):
        assert H.legit_ok(guard.address).code == "OK"
        time.sleep(0.5)
        start_kb = guard.rss_kb()
        codes = attacks.concurrent_bombs(guard.port, 8, mib=300, timeout=60)
        peak_kb = guard.hwm_kb()
        assert codes == [RESOURCE_EXHAUSTED] * 8, codes
        assert H.legit_ok(guard.address).code == "OK"
        deadline = time.monotonic() + 10  # settled within 10 s; polled, not waited out
        settled_kb = guard.rss_kb()
        while (settled_kb - start_kb) / MB >= SETTLED_GROWTH_MB and time.monotonic() < deadline:
            time.sleep(0.5)
            settled_kb = guard.rss_kb()
        assert (peak_kb - start_kb) / MB < PEAK_GROWTH_MB, (
            f"peak RSS {start_kb // MB} -> {peak_kb // MB} MB for 8 bombs"
        )
        assert (settled_kb - start_kb) / MB < SETTLED_GROWTH_MB, (
            f"RSS {start_kb // MB} MB before 8 gzip bombs, still {settled_kb // MB} MB 10 s after "
            f"(peak {peak_kb // MB} MB): the memory is never returned"
        )
