"""Summing the samples of several guard processes into one /metrics.

Counters and histograms must never go down in the sum, or Prometheus reads
a counter reset and rate()/increase() invent requests. So the collector
remembers each worker's last good scrape: a worker that does not answer
(dead, stopped, slower than the timeout) adds its last counters and
histograms, and a worker that is gone (its URL no longer listed, as when a
dead one is replaced by a fresh one whose counters start at 0) has them
moved into a retired total that stays in the sum for good. A series a
live worker stops reporting (a model a reload retired) joins the retired
total too, and leaves the sum once no worker reports it: workers reload one
after another, and the sum must not go down in between.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.client import HTTPException

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["AggregatingCollector"]

logger = logging.getLogger("guard.workers")

# Gauges are summed (in-flight calls add up) except these, where the most
# pessimistic worker speaks for the pod.
_GAUGE_MIN = frozenset({"guard_upstream_up"})
# Each worker keeps its own drift window: the largest PSI speaks for the pod.
# Classes per row are a property of the output, the same in every worker, as
# is a model's being configured.
_GAUGE_MAX = frozenset({"guard_output_drift_psi", "guard_output_classes", "guard_model_info"})
_MODELS = "guard_model_info"

_Key = tuple[str, tuple[tuple[str, str], ...]]


class AggregatingCollector(Collector):
    """Scrapes each worker's /metrics and yields the sums.

    A worker that fails to answer contributes its last counters and
    histograms but no gauges: a gauge says how things are now, which nobody
    knows for a worker that does not answer (a stopped worker's last
    ``guard_upstream_up`` of 1 would hide it), and a gauge may go down.
    """

    def __init__(
        self, urls: Callable[[], Sequence[str]], timeout_s: float = 2.0, fresh_s: float = 1.0
    ) -> None:
        self._urls = urls
        self._timeout = timeout_s
        # Scrapes arriving within ``fresh_s`` of the last gathering share it:
        # each gathering scrapes every worker, and 32 scrapers of the
        # supervisor took 3.3 s of the workers' CPU in 8 s (now 0.06 s).
        self._fresh_s = fresh_s
        self._gathered: tuple[float, _Sums] | None = None  # (when it began, sums)
        # Held across a whole collect: two concurrent scrapes applied out of
        # order would look like a worker's counters going back.
        self._lock = threading.Lock()
        self._last: dict[str, list[Metric]] = {}  # per current worker URL
        self._retired = _Sums()  # counters and histograms of workers gone
        self._fading: set[_Key] = set()  # retired samples a live worker forgot

    def collect(self) -> Iterator[Metric]:
        asked = time.monotonic()
        with self._lock:
            if self._gathered is None or self._gathered[0] < asked - self._fresh_s:
                self._gathered = (time.monotonic(), self._gather())
            sums = self._gathered[1]
        yield from sums.metrics()

    def _gather(self) -> _Sums:
        urls = list(self._urls())
        for url in self._last.keys() - set(urls):
            self._retire(self._last.pop(url))
        scraped = [list(self._families(url)) for url in urls]  # may retire some counts
        if self._fading:
            done = self._fading - {key for families in scraped for key in _keys(families)}
            self._retired.drop(done)
            self._fading -= done
        configured = _configured(scraped)
        if configured is not None:
            self._retired.drop_models(configured)
        sums = _Sums()
        for families in [list(self._retired.metrics()), *scraped]:
            for family in families:
                sums.add(family)
        return sums

    def _families(self, url: str) -> Iterable[Metric]:
        """What ``url`` adds to the sum now; remembered for the next time."""
        last = self._last.get(url, [])
        families = self._scrape(url)
        if families is None:
            return _monotonic(last)  # stale, but never less than before
        if _restarted(last, families):
            # Another process behind the same URL (a reused port): the old
            # one's counts are gone from it, so they go to the retired total.
            logger.warning("worker metrics at %s restarted from lower counts", url)
            self._retire(last)
        elif last:
            # The same process: a series it forgot (a model a reload retired),
            # or forgot and made again from 0, leaves its last counts here.
            forgotten = _keys(last) - _keys(families)
            moved = forgotten | _remade(last, families)
            if moved:
                self._retire(_only(last, moved))
                self._fading |= forgotten
        self._last[url] = families
        return families

    def _retire(self, families: Iterable[Metric]) -> None:
        for family in _monotonic(families):
            self._retired.add(family)

    def _scrape(self, url: str) -> list[Metric] | None:
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as resp:  # noqa: S310
                text: str = resp.read().decode("utf-8")
            return list(text_string_to_metric_families(text))
        except (OSError, HTTPException, ValueError) as exc:
            logger.warning("worker metrics at %s unreachable: %s", url, exc)
            return None


class _Sums:
    """Samples of several workers combined family by family (see ``_add``)."""

    def __init__(self) -> None:
        self._heads: dict[str, tuple[str, str]] = {}  # name: (documentation, type)
        self._values: dict[str, dict[_Key, float]] = {}

    def add(self, family: Metric) -> None:
        if family.name not in self._heads:
            self._heads[family.name] = (family.documentation, family.type)
            self._values[family.name] = {}
        _add(self._values[family.name], family)

    def drop(self, keys: Iterable[_Key]) -> None:
        """Forget the samples ``keys``, in whichever family holds them."""
        for key in keys:
            for values in self._values.values():
                values.pop(key, None)

    def drop_models(self, keep: set[str]) -> None:
        """Forget the samples of models neither in ``keep`` nor ``__other__``."""
        for values in self._values.values():
            for key in [k for k in values if _model_gone(k, keep)]:
                del values[key]

    def metrics(self) -> Iterator[Metric]:
        for name, (documentation, kind) in self._heads.items():
            metric = Metric(name, documentation, kind)
            for (sample_name, labels), value in self._values[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric


def _configured(scraped: list[list[Metric]]) -> set[str] | None:
    """The models the answering workers' configs name, or ``None`` where none says."""
    found = [family for families in scraped for family in families if family.name == _MODELS]
    if not found:
        return None
    return {s.labels.get("model", "") for family in found for s in family.samples}


def _model_gone(key: _Key, keep: set[str]) -> bool:
    model = dict(key[1]).get("model")
    return model is not None and model != "__other__" and model not in keep


def _key(sample_name: str, labels: dict[str, str]) -> _Key:
    return sample_name, tuple(sorted(labels.items()))


def _is_monotonic(family: Metric, sample_name: str) -> bool:
    """Whether Prometheus reads a drop of this sample as a counter reset."""
    if sample_name.endswith("_created"):
        return False  # a timestamp per worker; a sum means nothing
    if family.type == "counter":
        return True
    return family.type in ("histogram", "summary") and sample_name.endswith(
        ("_bucket", "_count", "_sum")
    )


def _monotonic(families: Iterable[Metric]) -> Iterator[Metric]:
    """The counter and histogram samples of ``families``, gauges left out."""
    for family in families:
        samples = [s for s in family.samples if _is_monotonic(family, s.name)]
        if samples:
            kept = Metric(family.name, family.documentation, family.type)
            kept.samples = samples
            yield kept


def _keys(families: Iterable[Metric]) -> set[_Key]:
    """The keys of the counter and histogram samples of ``families``."""
    return {_key(s.name, s.labels) for family in _monotonic(families) for s in family.samples}


def _only(families: Iterable[Metric], keys: set[_Key]) -> Iterator[Metric]:
    """``families`` with only the samples ``keys``."""
    for family in families:
        kept = Metric(family.name, family.documentation, family.type)
        kept.samples = [s for s in family.samples if _key(s.name, s.labels) in keys]
        if kept.samples:
            yield kept


def _counts(families: Iterable[Metric]) -> dict[_Key, float]:
    """The samples that only ever grow in a live process: ``_sum`` aside,
    which goes down with negative observations."""
    return {
        _key(s.name, s.labels): s.value
        for family in _monotonic(families)
        for s in family.samples
        if not s.name.endswith("_sum")
    }


def _started(families: Iterable[Metric]) -> float | None:
    """When the process made its first unlabelled counter (prometheus_client's
    ``_created``), if it says."""
    created = [
        s.value
        for family in families
        for s in family.samples
        if s.name.endswith("_created") and not s.labels
    ]
    return min(created) if created else None


def _restarted(last: list[Metric], now: list[Metric]) -> bool:
    """Whether the process answering is not the one that answered before:
    it made its metrics at another time, or, where it does not say when, a
    count both report is lower. Within one process a count may be lower,
    or missing: a reload forgets the series of the models it retired, and
    a call in flight across it may make one again from 0."""
    if not last:
        return False
    before, since = _started(last), _started(now)
    if before is not None and since is not None:
        return since != before
    return bool(_remade(last, now))


def _series(key: _Key) -> _Key:
    """The series a sample belongs to: its histogram's name and labels, ``le`` aside."""
    name, labels = key
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)], tuple(kv for kv in labels if kv[0] != "le")
    return key


def _remade(last: list[Metric], now: list[Metric]) -> set[_Key]:
    """The samples of ``last`` whose series reads lower in ``now``: made again."""
    current = _counts(now)
    lower = {
        _series(key) for key, value in _counts(last).items() if current.get(key, value) < value
    }
    return {key for key in _keys(last) if _series(key) in lower} if lower else set()


def _add(bucket: dict[_Key, float], family: Metric) -> None:
    """Add one worker's samples of ``family`` into ``bucket``."""
    gauge = family.type == "gauge"
    pessimistic = gauge and family.name in _GAUGE_MIN
    largest = gauge and family.name in _GAUGE_MAX
    for s in family.samples:
        if s.name.endswith("_created"):
            continue  # a timestamp per worker; a sum means nothing
        key = _key(s.name, s.labels)
        if key not in bucket:
            bucket[key] = s.value
        elif pessimistic:
            bucket[key] = min(bucket[key], s.value)
        elif largest:
            bucket[key] = max(bucket[key], s.value)
        else:
            bucket[key] += s.value
