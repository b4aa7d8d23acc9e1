"""Prometheus rules: promtool check/test, and the PrometheusRule holds the same groups."""

from __future__ import annotations

import subprocess
from types import ModuleType

import yaml

from tests.deploy.paths import DEPLOY

RULES = DEPLOY / "prometheus" / "guard-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "guard-rules.test.yaml"
PROMETHEUS_RULE = DEPLOY / "k8s" / "base" / "prometheusrule.yaml"

ALERTS = {
    "GuardOutputOutOfRange",
    "GuardOutputNaN",
    "GuardRejectingResponses",
    "GuardSoftmaxBroken",
    "GuardUpstreamDown",
    "GuardHighOverhead",
    "GuardProtocolUnavailable",
    "GuardRefusingCalls",
    "GuardServerRestarted",
    "GuardWorkerRestarted",
    "GuardMemoryCeiling",
    "GuardModelNearUniform",
    "GuardModelStuck",
    "GuardOutputDrift",
}


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """Parse the promtool test file: each alert has a case with alerts and one without."""
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fired == ALERTS
    assert silent == ALERTS


def test_alerts_have_summary_description_runbook() -> None:
    rules = _alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    runbook_doc = (DEPLOY.parent / "docs" / "deploy.md").read_text().lower()
    for rule in rules:
        annotations = rule["annotations"]
        assert annotations["summary"] and len(annotations["description"]) > 80
        assert rule["labels"]["severity"] in {"warning", "critical"}
        anchor = annotations["runbook"].split("#", 1)[1]
        assert annotations["runbook"].startswith("docs/deploy.md#")
        # The runbook heading exists in docs/deploy.md (GitHub anchors are lowercase).
        assert f"### {anchor}" in runbook_doc, anchor


def test_prometheusrule_matches_plain_rules(prometheusrule_generator: ModuleType) -> None:
    plain = yaml.safe_load(RULES.read_text())
    wrapped = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert wrapped["apiVersion"] == "monitoring.coreos.com/v1"
    assert wrapped["kind"] == "PrometheusRule"
    assert wrapped["spec"]["groups"] == plain["groups"]
    assert PROMETHEUS_RULE.read_text() == prometheusrule_generator.render()


def test_request_rules_keep_the_protocol() -> None:
    """Every rule over a request metric keeps the protocol label: REST and gRPC apart."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    request_metrics = (
        "guard_requests_total",
        "guard_overhead_seconds",
        "guard_upstream_duration_seconds",
    )
    records = [r for g in groups for r in g["rules"] if "record" in r]
    over_requests = [r for r in records if any(m in r["expr"] for m in request_metrics)]
    assert len(over_requests) == 3
    for rule in over_requests:
        assert "protocol" in rule["expr"].split("by (", 1)[1].split(")", 1)[0], rule["record"]
