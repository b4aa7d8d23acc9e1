"""Row 8: derived outputs that push a response past max_message_mb. The client
cannot get the response; what it gets must come from the guard, explain the
limit, and the guard's metrics must count what the client saw (not OK)."""

from __future__ import annotations

from pathlib import Path

from tests.attacks import _harness as H
from tests.attacks import protos

RULES = (
    "max_message_mb: 1\n"
    "models:\n"
    "  - name: m\n    outputs: [{name: p, argmax: true, labels: [a, b]}]\n"
    "  - name: '*'\n    outputs: [{name: p, threshold: 0.5, labels: [n, y]}]\n"
)


def test_derived_outputs_past_the_limit(tmp_path: Path) -> None:
    # 200,000 floats: an 800 KB response (fits 1 MiB); with p_class (int64) and
    # p_label (strings) added it is ~3 MB.
    with H.guarded(tmp_path, RULES) as (_up, guard):
        with H.channel(guard.address) as ch:
            result = H.legit_call(ch, protos.predict_request("big:200000"), timeout=10)
        metrics = guard.metrics()
    assert result.code != "OK"
    assert result.details.startswith("guard: ") and "max_message_mb" in result.details, (
        f"{result.code} {result.details!r}"
    )
    ok = H.sample(metrics, "guard_requests_total", code="OK")
    seen = H.sample(metrics, "guard_requests_total", code=result.code)
    assert ok == 0 and seen == 1, (
        f"client got {result.code}; guard_requests_total OK={ok}, {result.code}={seen}"
    )
