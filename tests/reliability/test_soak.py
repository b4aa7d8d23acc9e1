"""CI's soak: 30 seconds of ``python -m bench.soak`` (issue 6, section 6)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.guard import REPO


def test_30_second_soak_accounts_for_every_request(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", "30", "--warmup", "10",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    verdict = json.loads(out.read_text())
    assert verdict["ok"] and verdict["guard_alive"]
    assert verdict["unexpected_error_count"] == 0 and verdict["counter_mismatches"] == []
    assert verdict["rss_growth_after_warmup_pct"] < 10
    # Every model and outcome was exercised, the expected rejections included.
    assert set(verdict["by_model_code"]) == {"wide_deep/OK", "softmax/OK", "reject_me/INTERNAL"}
    assert verdict["calls"] > 1000
