"""Summing the samples of several guard processes into one /metrics."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["AggregatingCollector"]

logger = logging.getLogger("guard.workers")

# Gauges are summed (in-flight calls add up) except these, where the most
# pessimistic worker speaks for the pod.
_GAUGE_MIN = frozenset({"guard_upstream_up"})
# Each worker keeps its own drift window: the largest PSI speaks for the pod.
# Classes per row are a property of the output, the same in every worker.
_GAUGE_MAX = frozenset({"guard_output_drift_psi", "guard_output_classes"})


class AggregatingCollector(Collector):
    """Scrapes each worker's /metrics and yields the sums."""

    def __init__(self, urls: Callable[[], Sequence[str]], timeout_s: float = 2.0) -> None:
        self._urls = urls
        self._timeout = timeout_s

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[_Key, float]] = {}
        for url in self._urls():
            text = self._scrape(url)
            for family in text_string_to_metric_families(text) if text else ():
                if family.name not in families:
                    families[family.name] = Metric(family.name, family.documentation, family.type)
                    values[family.name] = {}
                _add(values[family.name], family)
        for name, metric in families.items():
            for (sample_name, labels), value in values[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric

    def _scrape(self, url: str) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as resp:  # noqa: S310
                text: str = resp.read().decode("utf-8")
                return text
        except OSError as exc:
            logger.warning("worker metrics at %s unreachable: %s", url, exc)
            return None


_Key = tuple[str, tuple[tuple[str, str], ...]]


def _add(bucket: dict[_Key, float], family: Metric) -> None:
    """Add one worker's samples of ``family`` into ``bucket``."""
    gauge = family.type == "gauge"
    pessimistic = gauge and family.name in _GAUGE_MIN
    largest = gauge and family.name in _GAUGE_MAX
    for s in family.samples:
        if s.name.endswith("_created"):
            continue  # a timestamp per worker; a sum means nothing
        key = (s.name, tuple(sorted(s.labels.items())))
        if key not in bucket:
            bucket[key] = s.value
        elif pessimistic:
            bucket[key] = min(bucket[key], s.value)
        elif largest:
            bucket[key] = max(bucket[key], s.value)
        else:
            bucket[key] += s.value
