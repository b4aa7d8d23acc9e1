"""``guard serve --workers N``: N guard processes on one port, one /metrics.

Python runs one event loop per core at best, so the guard scales across cores
with processes. Each worker binds the same gRPC port with ``SO_REUSEPORT``
(the kernel spreads connections across them) and serves its own metrics on a
private loopback port. The supervisor serves ``metrics_listen`` itself,
summing the workers' samples on each scrape. Counters and histograms add up
exactly, so dashboards and alerts see one guard.
"""

from __future__ import annotations

import ctypes
import json
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from guard.control.app import split_address
from guard.control.config import Config

__all__ = ["AggregatingCollector", "run_workers"]

logger = logging.getLogger("guard.control.workers")

# Gauges are summed (in-flight calls add up) except these, where the most
# pessimistic worker speaks for the pod.
_GAUGE_MIN = frozenset({"guard_upstream_up"})
_PR_SET_PDEATHSIG = 1


class AggregatingCollector(Collector):
    """Scrapes each worker's /metrics and yields the sums."""

    def __init__(self, urls: Sequence[str], timeout_s: float = 2.0) -> None:
        self._urls = list(urls)
        self._timeout = timeout_s

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for url in self._urls:
            try:
                with urllib.request.urlopen(url, timeout=self._timeout) as resp:  # noqa: S310
                    text = resp.read().decode("utf-8")
            except OSError as exc:
                logger.warning("worker metrics at %s unreachable: %s", url, exc)
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type)
                    families[family.name] = merged
                    values[family.name] = {}
                bucket = values[family.name]
                for s in family.samples:
                    if s.name.endswith("_created"):
                        continue  # a timestamp per worker; a sum means nothing
                    key = (s.name, tuple(sorted(s.labels.items())))
                    if key not in bucket:
                        bucket[key] = s.value
                    elif family.type == "gauge" and family.name in _GAUGE_MIN:
                        bucket[key] = min(bucket[key], s.value)
                    else:
                        bucket[key] += s.value
        for name, metric in families.items():
            for (sample_name, labels), value in values[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the supervisor dies, even by
    SIGKILL, so workers never outlive it holding the port (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's own signal forwarding still applies


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket, to learn a free port for port 0
    and keep it ours while the workers bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def run_workers(
    config: Config,
    argv: Sequence[str],
    workers: int,
    port_file: Path | None,
) -> int:
    """Supervise ``workers`` copies of ``guard serve`` (``argv`` holds the serve
    arguments without ``--workers``/``--listen``/``--metrics-listen``/``--port-file``)."""
    host, port = split_address(config.listen)
    reserved = _reserve_port(host, port)
    port = reserved.getsockname()[1]
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if signum != signal.SIGHUP else signal.SIGHUP)

    children: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="guard-workers-") as tmp:
        files = [Path(tmp) / f"worker-{i}.json" for i in range(workers)]
        for i, pf in enumerate(files):
            cmd = [sys.executable, "-m", "guard", "serve", *argv, "--listen", listen,
                   "--metrics-listen", "127.0.0.1:0", "--port-file", str(pf)]  # fmt: skip
            children.append(subprocess.Popen(cmd, preexec_fn=_die_with_parent))
            logger.info("worker %d started (pid %d)", i, children[-1].pid)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        signal.signal(signal.SIGHUP, lambda s, f: on_signal(signal.SIGHUP, f))
        deadline = time.monotonic() + 60
        while not all(pf.exists() for pf in files):
            if any(c.poll() is not None for c in children) or time.monotonic() > deadline:
                logger.error("a worker failed to start; stopping")
                on_signal(signal.SIGTERM, None)
                return _wait(children) or 1
            time.sleep(0.05)
        urls = [f"http://127.0.0.1:{json.loads(pf.read_text())['metrics']}/metrics" for pf in files]
        registry = CollectorRegistry()
        registry.register(AggregatingCollector(urls))
        m_host, m_port = split_address(config.metrics_listen)
        httpd, _ = start_http_server(m_port, m_host, registry=registry)
        logger.info(
            "%d workers serving gRPC on port %d; aggregated metrics on port %d",
            workers, port, httpd.server_port,
        )  # fmt: skip
        if port_file is not None:
            tmp_pf = port_file.with_name(port_file.name + ".tmp")
            tmp_pf.write_text(
                json.dumps(
                    {
                        "grpc": port,
                        "metrics": httpd.server_port,
                        "workers": [c.pid for c in children],
                    }  # fmt: skip
                )
            )
            tmp_pf.replace(port_file)
        unexpected = False
        try:
            while not stop:
                if any(c.poll() is not None for c in children):
                    logger.error("a worker exited unexpectedly; stopping the others")
                    unexpected = True
                    on_signal(signal.SIGTERM, None)
                    break
                time.sleep(0.2)
            code = _wait(children)
        finally:
            httpd.shutdown()
            httpd.server_close()
            reserved.close()
    return code or (1 if unexpected else 0)


def _wait(children: Sequence[subprocess.Popen[bytes]]) -> int:
    worst = 0
    for child in children:
        try:
            rc = child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
            rc = child.wait()
        worst = worst or rc
    return worst
