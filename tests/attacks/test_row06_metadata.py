"""Row 6: request metadata beyond the advertised 16 KiB header-list limit gets
RESOURCE_EXHAUSTED and never reaches the upstream, also from a client that
sends before it has ACKed the server's SETTINGS (grpc enforces its limit only
once they are ACKed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.attacks import _harness as H
from tests.attacks import attacks, h2raw

RESOURCE_EXHAUSTED = 8
CASES = {
    "one-1MiB-header": attacks.one_big_header,
    "10000-headers": attacks.many_headers,
}


@pytest.mark.parametrize("ack", [False, True], ids=["before-settings-ack", "after-settings-ack"])
@pytest.mark.parametrize("case", list(CASES))
def test_oversized_metadata_is_refused(tmp_path: Path, case: str, ack: bool) -> None:
    extra: list[h2raw.Header] = CASES[case]()
    with H.guarded(tmp_path) as (upstream, guard):
        state = attacks.big_metadata_call(guard.port, extra, ack_settings=ack)
        seen = H.upstream_stats(upstream)
        assert state.grpc_status == RESOURCE_EXHAUSTED, (
            f"{case}: grpc-status {state.grpc_status} {state.grpc_message!r}, reset {state.reset}"
        )
        assert seen["max_metadata_bytes"] <= 16 * 1024 and seen["max_metadata_keys"] < 1000, (
            f"{case} reached the upstream: {seen}"
        )
        assert H.legit_ok(guard.address).code == "OK"
