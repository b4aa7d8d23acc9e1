"""The Grafana dashboard: generated from code, complete, and using only guard metrics."""

from __future__ import annotations

import json
import re
from types import ModuleType

from tests.deploy.paths import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "guard-dashboard.json"

GUARD_METRICS = {
    "guard_requests_total",
    "guard_output_values_total",
    "guard_output_violations_total",
    "guard_output_sum_violations_total",
    "guard_responses_total",
    "guard_output_value_bucket",
    "guard_predicted_class_total",
    "guard_upstream_duration_seconds_bucket",
    "guard_overhead_seconds_bucket",
    "guard_upstream_up",
    "guard_decode_errors_total",
    "guard_inflight_requests",
    "guard_refused_requests_total",
    "guard_pending_requests",
    "guard_inflight_bytes",
    "guard_relayed_streams",
    "guard_server_restarts_total",
    "guard_worker_restarts_total",
    "guard_memory_resets_total",
    "guard_near_uniform_rows_total",
    "guard_output_entropy_count",
    "guard_output_entropy_bucket",
    "guard_output_classes",
    "guard_abstentions_total",
    "guard_output_drift_psi",
}


def _panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_committed_json_equals_generator_output(dashboard_generator: ModuleType) -> None:
    assert DASHBOARD.read_text() == dashboard_generator.render(), (
        "guard-dashboard.json is stale: run .venv/bin/python deploy/grafana/generate.py"
    )
    assert dashboard_generator.main(["--check"]) == 0


def test_variables() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == ["datasource", "model", "signature", "output", "protocol"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "signature", "output", "protocol"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert f", {name})" in variables[name]["query"]


def test_required_panels_exist_with_descriptions() -> None:
    panels = _panels()
    titles = [p["title"] for p in panels]
    for needle in (
        "Violation rate",
        "Share of checked values",
        "Responses by action",
        "Share of responses by action",
        "NaN / Inf",
        "Bad softmax rows",
        "Output value distribution",
        "Top predicted classes",
        "Requests by protocol",
        "Error ratio by protocol",
        "Request rate",
        "Error rate",
        "Upstream latency p50 / p99",
        "Guard overhead p50 / p99",
        "Upstream up",
        "Near-uniform rows",
        "Output entropy distribution",
        "Top class share",
        "Abstentions",
        "Confidence drift (PSI)",
    ):
        assert any(needle in t for t in titles), needle
    for panel in panels:
        # Descriptions say what a bad value means and what to do: a few sentences.
        assert len(panel["description"]) > 120, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
    heatmap = next(p for p in panels if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "guard_output_value_bucket" in heatmap["targets"][0]["expr"]


def test_queries_use_only_guard_metrics_and_known_variables() -> None:
    used: set[str] = set()
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            used |= set(re.findall(r"\bguard_[a-z_]+\b", expr))
            assert set(re.findall(r"\$\w+", expr)) <= {
                "$model",
                "$signature",
                "$output",
                "$protocol",
                "$__rate_interval",
                "$__range",
            }, expr
    assert used <= GUARD_METRICS, used - GUARD_METRICS
    assert used == GUARD_METRICS, GUARD_METRICS - used


def test_request_panels_break_down_by_protocol() -> None:
    """Every query over a request metric filters on $protocol and keeps the label."""
    request_metrics = re.compile(r"guard_(requests_total|overhead_seconds|upstream_duration)")
    checked = 0
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            if not request_metrics.search(expr):
                continue
            checked += 1
            assert 'protocol=~"$protocol"' in expr, panel["title"]
            assert re.search(r"sum by \([^)]*\bprotocol\b", expr), panel["title"]
            assert "{{protocol}}" in target["legendFormat"], panel["title"]
    assert checked >= 8
