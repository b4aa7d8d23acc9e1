"""Wrap guard-rules.yaml into a PrometheusRule for prometheus-operator.

guard-rules.yaml is the single source; this writes deploy/k8s/base/prometheusrule.yaml::

    .venv/bin/python deploy/prometheus/make_prometheusrule.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "guard-rules.yaml"
OUTPUT = HERE.parent / "k8s" / "base" / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/prometheus/guard-rules.yaml by make_prometheusrule.py: edit that.\n"
)


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL, descriptions) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def build() -> dict[str, Any]:
    """Return the PrometheusRule object holding guard-rules.yaml's groups."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "tf-serving-guard",
            "labels": {"app.kubernetes.io/name": "tf-serving"},
        },
        "spec": {"groups": groups},
    }


def render() -> str:
    """The exact text of prometheusrule.yaml."""
    body = yaml.dump(build(), Dumper=_BlockDumper, sort_keys=False, width=100)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, verify) prometheusrule.yaml."""
    parser = argparse.ArgumentParser(description="Wrap guard-rules.yaml in a PrometheusRule.")
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
