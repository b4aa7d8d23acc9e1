"""Row 10: an empty config file is not a valid config (``guard check`` exits 2),
and reloading into one keeps the rules that are running."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.attacks import _harness as H
from tests.attacks import protos


def test_check_rejects_an_empty_file(tmp_path: Path) -> None:
    cfg = tmp_path / "guard.yaml"
    cfg.write_text("", encoding="utf-8")
    result = H.guard_cli("check", "--config", str(cfg), timeout_s=30)
    output = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}: {output[-400:]}"
    assert "Traceback" not in output


def test_reload_into_an_empty_file_keeps_the_rules(tmp_path: Path) -> None:
    with H.guarded(tmp_path) as (_up, guard):
        assert "p_class" in protos.output_names(H.legit_ok(guard.address).body)
        assert guard.config_path is not None
        guard.config_path.write_text("", encoding="utf-8")
        guard.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        failures = 0.0
        while time.monotonic() < deadline:
            metrics = guard.metrics()
            failures = H.sample(metrics, "guard_config_reloads_total", result="failure")
            if failures or H.sample(metrics, "guard_config_reloads_total", result="success"):
                break
            time.sleep(0.1)
        names = protos.output_names(H.legit_ok(guard.address).body)
        assert "p_class" in names, f"rules dropped by a reload into an empty file: {names}"
        assert failures >= 1, "the reload of an empty file was not counted as a failure"
