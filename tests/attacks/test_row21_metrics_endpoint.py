"""Row 21: the /metrics endpoint held open by clients that send nothing.

Found: prometheus_client's ``start_http_server`` gives each connection a thread
with no timeout; 50 connections that sent nothing held 50 threads for good,
and a slow one-byte-at-a-time client held one forever. Now at most
``MAX_CONNECTIONS`` are served at once, a new one ending the connection open
longest, and none lives past ``CONNECTION_TIMEOUT_S``: scrapes get through the
flood, the thread count stays bounded, and the idle connections are closed.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

from guard.metrics.endpoint import CONNECTION_TIMEOUT_S, MAX_CONNECTIONS, start_metrics_server
from tests.attacks import _harness as H


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])


def _scrape(port: int) -> tuple[bytes, float]:
    start = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return answer.read(), time.monotonic() - start


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _flood(port: int, count: int) -> list[socket.socket]:
    """``count`` connections: half send nothing, half half a request line."""
    flood = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:  # half a request line, as a slow client would send it
            sock.sendall(b"GET /metr")
        flood.append(sock)
    return flood


def test_idle_and_slow_connections_neither_pile_up_nor_block_scrapes(tmp_path: Path) -> None:
    with H.guarded(tmp_path) as (_up, guard):
        port = guard.ports["metrics"]
        threads_before = _threads(guard.pid)
        flood = _flood(port, 300)
        time.sleep(0.5)
        threads = _threads(guard.pid)
        body, took = _scrape(port)
        assert b"guard_requests_total" in body and took < 2.0, f"scrape took {took:.2f} s"
        assert threads <= threads_before + MAX_CONNECTIONS + 2, (threads_before, threads)
        assert H.legit_ok(guard.address).code == "OK"
        for sock in flood:
            sock.close()
        assert "Traceback" not in guard.log()


def test_no_connection_lives_past_the_connection_timeout() -> None:
    """The same server as the guard's, with a 1 s timeout instead of
    CONNECTION_TIMEOUT_S (15 s, which this test waited out in a process)."""
    timeout_s = 1.0
    assert timeout_s < CONNECTION_TIMEOUT_S
    threads_before = threading.active_count()
    httpd, thread = start_metrics_server("127.0.0.1", 0, CollectorRegistry(), timeout_s)
    port = httpd.server_address[1]
    try:
        flood = _flood(port, 100)
        time.sleep(0.3)
        assert threading.active_count() <= threads_before + 2 + MAX_CONNECTIONS
        time.sleep(timeout_s + 2.0)  # the reaper looks once a second
        still_open = [s for s in flood if not _closed(s)]
        for sock in flood:
            sock.close()
        assert not still_open, f"{len(still_open)} connections open past the timeout"
        assert threading.active_count() <= threads_before + 2  # serve_forever and the reaper
        assert _scrape(port)[0] is not None
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_only_the_metrics_path_answers_with_the_metrics() -> None:
    """Found (a red-team pass): every path, '/' and '/metric' included, got
    the whole exposition."""
    registry = CollectorRegistry()
    Gauge("probe_gauge", "A sample to find.", registry=registry).set(1)
    httpd, thread = start_metrics_server("127.0.0.1", 0, registry)
    port = httpd.server_address[1]
    try:
        for path in ("/", "/metric", "/metrics/", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            body = caught.value.read()
            assert caught.value.code == 404 and b"/metrics" in body, path
            assert b"probe_gauge" not in body, path
        assert b"probe_gauge 1.0" in _scrape(port)[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics?x=1", timeout=5) as ok:
            assert b"probe_gauge 1.0" in ok.read()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
