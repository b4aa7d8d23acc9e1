"""The README's config reference and metrics table, held to the definitions:
every setting with its default (guard/control/config.py), every metric the
guard exports (guard/metrics/guard_metrics.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from guard.control.config import Config, settings
from guard.metrics.guard_metrics import GuardMetrics

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
_EXAMPLES = {"tls", "upstream_tls", "models"}  # shown by example, not by default


def _config_block() -> dict[str, object]:
    section = README[README.index("## Config reference") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None, "the config reference lost its yaml block"
    data: dict[str, object] = yaml.safe_load(block.group(1))
    return data


@pytest.mark.parametrize("name", [name for name, _ in settings()])
def test_the_config_reference_shows_each_setting_with_its_default(name: str) -> None:
    shown = _config_block()
    assert name in shown, f"add {name} to the README's config reference"
    if name not in _EXAMPLES:
        default = getattr(Config(), name)
        assert shown[name] == default, f"README shows {name}: {shown[name]!r}, default {default!r}"


def test_the_config_reference_shows_no_setting_that_does_not_exist() -> None:
    assert set(_config_block()) <= {name for name, _ in settings()}


def test_the_metrics_table_names_every_metric() -> None:
    registry = CollectorRegistry()
    GuardMetrics(registry)
    names = {m.name for m in registry.collect()}
    table = README[README.index("## Metrics") : README.index("## Commands")]
    missing = [n for n in names if not re.search(rf"`{n}(_total)?`", table)]
    assert not missing, f"add these to the README's metrics table: {missing}"
