"""The supervisor's sum of its workers' /metrics: counters never go back.

Each worker here is a real HTTP server on an ephemeral port serving the text
of its own prometheus_client registry, whose counters the test drives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from guard.metrics.aggregate import AggregatingCollector

_Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
OK = (("code", "OK"),)


class Worker:
    """A /metrics endpoint with one counter, one histogram and two gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("guard_requests", "r", ["code"], registry=self.registry)
        self.latency = Histogram("guard_latency_seconds", "l", buckets=(0.1, 1.0),
                                 registry=self.registry)  # fmt: skip
        self.in_flight = Gauge("guard_in_flight", "i", registry=self.registry)
        self.up = Gauge("guard_upstream_up", "u", registry=self.registry)
        self.answering = threading.Event()
        self.answering.set()
        self.garbage = False
        self.scrapes = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/metrics"

    def serve(self, requests: int, latency: float = 0.05, in_flight: int = 1) -> None:
        """Count ``requests`` more OK requests, each taking ``latency``."""
        for _ in range(requests):
            self.requests.labels("OK").inc()
            self.latency.observe(latency)
        self.in_flight.set(in_flight)
        self.up.set(1)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                worker.scrapes += 1
                worker.answering.wait(10)  # bounded: a stopped worker's hang
                body = b"garbage{{{\n" if worker.garbage else generate_latest(worker.registry)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the scraper gave up on a stopped worker

            def log_message(self, *_: object) -> None:
                pass

        return Handler

    def stop(self) -> None:
        """Die: the port refuses connections from now on."""
        self.answering.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker._thread.is_alive():
            worker.stop()


def spawn(started: list[Worker]) -> Worker:
    worker = Worker()
    started.append(worker)
    return worker


def collect(collector: AggregatingCollector) -> _Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }


def monotonic(samples: _Samples) -> _Samples:
    return {
        key: value
        for key, value in samples.items()
        if key[0].endswith(("_total", "_bucket", "_count", "_sum"))
    }


def assert_grew(before: _Samples, after: _Samples) -> None:
    """No counter or histogram sample of ``before`` is lower (or gone) in ``after``."""
    for key, value in monotonic(before).items():
        assert after.get(key, -1.0) >= value, (key, value, after.get(key))


def test_the_sum_of_answering_workers(workers: list[Worker]) -> None:
    a, b = spawn(workers), spawn(workers)
    a.serve(5, in_flight=2)
    b.serve(7, latency=0.5, in_flight=3)
    b.up.set(0)
    got = collect(AggregatingCollector(lambda: [a.url, b.url], timeout_s=1.0))
    assert got[("guard_requests_total", OK)] == 12
    assert got[("guard_latency_seconds_bucket", (("le", "0.1"),))] == 5
    assert got[("guard_latency_seconds_bucket", (("le", "1.0"),))] == 12
    assert got[("guard_latency_seconds_count", ())] == 12
    assert got[("guard_latency_seconds_sum", ())] == pytest.approx(5 * 0.05 + 7 * 0.5)
    assert got[("guard_in_flight", ())] == 5
    assert got[("guard_upstream_up", ())] == 0  # the most pessimistic worker
    assert not any(name.endswith("_created") for name, _ in got)


def test_a_worker_that_stops_answering_keeps_its_counts(workers: list[Worker]) -> None:
    a, b = spawn(workers), spawn(workers)
    a.serve(5, in_flight=2)
    b.serve(7, in_flight=3)
    collector = AggregatingCollector(lambda: [a.url, b.url], timeout_s=0.3, fresh_s=0.0)
    before = collect(collector)
    b.answering.clear()  # as if SIGSTOPped: connects, never answers
    a.serve(1, in_flight=2)
    stalled = collect(collector)
    assert_grew(before, stalled)
    assert stalled[("guard_requests_total", OK)] == 13  # b's last 7 plus a's 6
    assert stalled[("guard_in_flight", ())] == 2  # b's gauges are not known now
    b.serve(4, in_flight=3)
    b.answering.set()  # SIGCONT
    after = collect(collector)
    assert_grew(stalled, after)
    assert after[("guard_requests_total", OK)] == 17
    assert after[("guard_in_flight", ())] == 5


def test_a_worker_that_answers_garbage_keeps_its_counts(workers: list[Worker]) -> None:
    a = spawn(workers)
    a.serve(5)
    collector = AggregatingCollector(lambda: [a.url], timeout_s=1.0, fresh_s=0.0)
    before = collect(collector)
    a.garbage = True
    assert collect(collector) == monotonic(before)


def test_a_dead_and_replaced_worker_s_counts_stay_in_the_sum(workers: list[Worker]) -> None:
    a, b = spawn(workers), spawn(workers)
    a.serve(10, in_flight=4)
    b.serve(3, latency=0.5, in_flight=1)
    urls = [a.url, b.url]
    collector = AggregatingCollector(lambda: list(urls), timeout_s=1.0, fresh_s=0.0)
    before = collect(collector)
    a.stop()  # SIGKILL: refused until the supervisor notices
    dead = collect(collector)
    assert_grew(before, dead)
    assert dead[("guard_requests_total", OK)] == 13
    assert dead[("guard_in_flight", ())] == 1  # the dead worker's gauges are gone
    c = spawn(workers)  # its replacement, counting from 0 on a new port
    urls[0] = c.url
    replaced = collect(collector)
    assert_grew(dead, replaced)
    assert replaced[("guard_requests_total", OK)] == 13
    c.serve(2)
    after = collect(collector)
    assert_grew(replaced, after)
    assert after[("guard_requests_total", OK)] == 15
    assert after[("guard_latency_seconds_count", ())] == 15
    assert after[("guard_latency_seconds_bucket", (("le", "0.1"),))] == 12
    assert after[("guard_latency_seconds_sum", ())] == pytest.approx(12 * 0.05 + 3 * 0.5)
    assert after[("guard_in_flight", ())] == 2


def test_a_new_process_behind_the_same_url(workers: list[Worker]) -> None:
    # A replacement that happens to bind the dead worker's port: its counts
    # restart lower under the same URL.
    a = spawn(workers)
    a.serve(10)
    collector = AggregatingCollector(lambda: [a.url], timeout_s=1.0, fresh_s=0.0)
    before = collect(collector)
    a.registry.unregister(a.requests)
    a.requests = Counter("guard_requests", "r", ["code"], registry=a.registry)
    a.serve(3)  # the histogram carries on: 13, the counter restarts: 3
    after = collect(collector)
    assert_grew(before, after)
    assert after[("guard_requests_total", OK)] == 13  # the old 10 retired, plus 3


def test_a_new_process_with_higher_counts_behind_the_same_url(workers: list[Worker]) -> None:
    # No count of the new process is lower: its later start says it is another.
    a = spawn(workers)
    a.serve(3)
    collector = AggregatingCollector(lambda: [a.url], timeout_s=1.0, fresh_s=0.0)
    before = collect(collector)
    time.sleep(0.01)  # prometheus_client's _created: the time each metric was made
    fresh = Worker()  # another process's metrics, served from a's port
    fresh.stop()
    a.registry, a.requests, a.latency = fresh.registry, fresh.requests, fresh.latency
    a.serve(5)
    after = collect(collector)
    assert_grew(before, after)
    assert after[("guard_requests_total", OK)] == 8


def test_a_series_the_workers_forget_leaves_the_sum(workers: list[Worker]) -> None:
    """A reload that retires a model drops its series in every worker, one
    after another: the sum holds them until the last worker has dropped
    them, then drops them too, the retired total's part included, and
    counts nothing twice."""
    a, b, gone = spawn(workers), spawn(workers), spawn(workers)
    retired = (("code", "RETIRED"),)
    for worker, n in ((a, 3), (b, 2), (gone, 4)):
        worker.serve(n)
        worker.requests.labels("RETIRED").inc(n)
    urls = [a.url, b.url, gone.url]
    collector = AggregatingCollector(lambda: list(urls), timeout_s=1.0, fresh_s=0.0)
    assert collect(collector)[("guard_requests_total", retired)] == 9
    gone.stop()
    urls.pop()  # its counts go to the retired total
    assert collect(collector)[("guard_requests_total", retired)] == 9
    a.requests.remove("RETIRED")
    a.serve(1)
    between = collect(collector)  # b has not reloaded yet
    assert between[("guard_requests_total", retired)] == 9
    assert_grew(between, collect(collector))
    b.requests.remove("RETIRED")
    after = collect(collector)
    assert_grew({k: v for k, v in between.items() if k[1] != retired}, after)
    assert ("guard_requests_total", retired) not in after
    assert after[("guard_requests_total", OK)] == 10
    assert after[("guard_latency_seconds_count", ())] == 10


def test_the_sum_never_goes_back_through_many_restarts(workers: list[Worker]) -> None:
    urls = [spawn(workers).url, spawn(workers).url]
    by_url = {w.url: w for w in workers}
    collector = AggregatingCollector(lambda: list(urls), timeout_s=0.2, fresh_s=0.0)
    served = 0
    previous = collect(collector)
    for step in range(12):
        worker = by_url[urls[step % 2]]
        worker.serve(step + 1)
        served += step + 1
        if step % 3 == 0:
            worker.answering.clear()
        elif step % 3 == 1:
            scraped = collect(collector)  # what it served is in the sum: then it dies
            assert_grew(previous, scraped)
            worker.stop()
            previous = scraped
            fresh = spawn(workers)
            by_url[fresh.url] = fresh
            urls[step % 2] = fresh.url
        else:
            for w in by_url.values():
                w.answering.set()
        now = collect(collector)
        assert_grew(previous, now)
        previous = now
    for w in by_url.values():
        w.answering.set()
    assert collect(collector)[("guard_requests_total", OK)] == served
    assert set(collector._last) <= set(urls)  # no memory of workers gone


def test_a_flood_of_scrapes_shares_one_gathering(workers: list[Worker]) -> None:
    """32 scrapers at once, then again 1.2 s later: each wave costs the
    workers one scrape, and every scraper sees the same counts."""
    a, b = spawn(workers), spawn(workers)
    a.serve(3)
    b.serve(4)
    collector = AggregatingCollector(lambda: [a.url, b.url], timeout_s=1.0, fresh_s=1.0)
    seen: list[float] = []

    def scrape() -> None:
        seen.append(collect(collector)[("guard_requests_total", OK)])

    for wave in (1, 2):
        threads = [threading.Thread(target=scrape) for _ in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert (a.scrapes, b.scrapes) == (wave, wave)
        a.serve(1)
        time.sleep(1.2)
    assert seen == [7.0] * 32 + [8.0] * 32


def test_a_series_the_same_worker_makes_again_counts_nothing_twice(workers: list[Worker]) -> None:
    """Found (a red-team pass): a series a worker forgot and made again from
    0 (a call in flight across the reload that retired its model, or the
    model added back) read as a restart, and the worker's whole history
    joined the retired total: 2,000 calls read 3,000."""
    a, b = spawn(workers), spawn(workers)
    a.serve(1000)
    b.serve(1000)
    collector = AggregatingCollector(lambda: [a.url, b.url], timeout_s=1.0, fresh_s=0.0)
    before = collect(collector)
    a.requests.remove("OK")
    a.serve(3)  # the same process: its histogram goes on, its OK series starts again
    after = collect(collector)
    assert_grew(before, after)
    assert after[("guard_requests_total", OK)] == 2003
    assert after[("guard_latency_seconds_count", ())] == 2003


def test_counts_of_a_dead_worker_leave_the_sum_with_their_model(workers: list[Worker]) -> None:
    """Found (a red-team pass): the counts of a worker that died before the
    reload that retired their model stayed in the sum for good, as no live
    worker had them to forget. Workers say which models their config names
    (``guard_model_info``); the retired total keeps no other."""
    a, gone = spawn(workers), spawn(workers)
    calls, info = {}, {}
    for worker in (a, gone):
        calls[worker] = Counter("guard_model_calls", "c", ["model"], registry=worker.registry)
        info[worker] = Gauge("guard_model_info", "i", ["model"], registry=worker.registry)
        for model in ("m", "kept"):
            info[worker].labels(model).set(1)
    calls[gone].labels("m").inc(50)
    calls[gone].labels("kept").inc(5)
    calls[a].labels("kept").inc(7)
    urls = [a.url, gone.url]
    collector = AggregatingCollector(lambda: list(urls), timeout_s=1.0, fresh_s=0.0)
    m = ("guard_model_calls_total", (("model", "m"),))
    kept = ("guard_model_calls_total", (("model", "kept"),))
    assert collect(collector)[m] == 50
    gone.stop()
    urls.pop()  # its counts go to the retired total, m's too: m is still configured
    assert collect(collector)[m] == 50
    info[a].remove("m")  # the reload that retires m
    after = collect(collector)
    assert m not in after and after[kept] == 12
    assert after[("guard_model_info", (("model", "kept"),))] == 1
