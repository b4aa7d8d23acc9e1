"""Row 11: a 1 MiB model name must not be echoed whole in an error: the
guard's rejection stays a short INTERNAL with the guard's own message."""

from __future__ import annotations

from pathlib import Path

from tests.attacks import _harness as H
from tests.attacks import protos

RULES = "models:\n  - name: '*'\n    outputs: [{name: p, on_violation: reject}]\n"
MAX_DETAILS = 1024


def test_rejection_of_a_1mib_model_name_is_short(tmp_path: Path) -> None:
    with H.guarded(tmp_path, RULES) as (_up, guard):
        with H.channel(guard.address) as ch:
            short = H.legit_call(ch, protos.predict_request("hot:1"), timeout=10)
            long = H.legit_call(ch, protos.predict_request("hot:" + "x" * (1 << 20)), timeout=10)
    assert short.code == "INTERNAL" and short.details.startswith("guard: "), short
    assert long.code == "INTERNAL", f"{long.code} {long.details[:200]!r}"
    assert long.details.startswith("guard: "), long.details[:200]
    assert len(long.details) <= MAX_DETAILS, f"details of {len(long.details)} characters"
