"""The harness itself, against the guard as it is: a legitimate Predict through
the guard works with grpc and with the raw HTTP/2 client, and the upstream's
numbers are readable. These pass today; if they fail, the attack tests' failures
mean nothing."""

from __future__ import annotations

from pathlib import Path

from tests.attacks import _harness as H
from tests.attacks import h2raw, protos


def test_legit_predict_through_the_guard(tmp_path: Path) -> None:
    with H.guarded(tmp_path) as (upstream, guard):
        result = H.legit_ok(guard.address)
        assert result.code == "OK"
        assert protos.output_names(result.body) == ["p", "p_class", "p_score", "p_label"]
        with h2raw.H2Client("127.0.0.1", guard.port, timeout=5) as client:
            client.drain(0.1)
            state = client.unary(H.PREDICT, protos.predict_request("m"))
            assert state.grpc_status == 0, state
            assert dict(state.trailers or []).get("x-guard-action") == "clean"
            [body] = state.messages()
            assert protos.output_names(body) == ["p", "p_class", "p_score", "p_label"]
            assert client.goaway is None
        stats = H.upstream_stats(upstream)
        assert stats["calls"]["Predict"] == 2
        assert H.sample(guard.metrics(), "guard_requests_total", code="OK", model="m") == 2
        assert guard.rss_kb() > 0 and guard.hwm_kb() >= guard.rss_kb() and guard.cpu_s() > 0
