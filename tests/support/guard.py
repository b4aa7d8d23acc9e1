"""The guard under test: in-process (:func:`start_in_process`) or as a real
``guard serve`` process (:func:`start_guard`, :func:`guard_process`), both on
ephemeral loopback ports. No TensorFlow here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from guard.control.config import Config
from guard.control.process import Child, guard_argv, start
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.proxy import GuardServer
from guard.server.rest import RestFrontEnd

__all__ = [
    "CHANNEL_OPTIONS",
    "GuardProcess",
    "RunningGuard",
    "guard_process",
    "rss_kb",
    "scrape",
    "start_guard",
    "start_in_process",
    "write_atomic",
]

REPO = Path(__file__).resolve().parents[2]
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 512 * 1024 * 1024),
    ("grpc.max_receive_message_length", 512 * 1024 * 1024),
]


def scrape(url: str) -> list[Any]:
    """Parse Prometheus text from ``url``."""
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
        return list(text_string_to_metric_families(r.read().decode()))


def samples_by(url: str, name: str, key: str, **labels: str) -> dict[str, float]:
    """The samples called ``name`` whose labels include ``labels``, by their ``key`` label."""
    return {
        s.labels[key]: float(s.value)
        for family in scrape(url)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    }


def sample_sum(url: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for family in scrape(url):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += float(s.value)
    return total


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s content in one step, as editors and kubectl do."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------- in process


@dataclass
class RunningGuard:
    """The guard running in-process, with its own registry and /metrics endpoint."""

    server: GuardServer
    address: str
    registry: CollectorRegistry
    metrics_url: str
    channel: grpc.aio.Channel
    httpd: Any
    rest: RestFrontEnd | None = None

    @property
    def rest_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the REST front-end."""
        assert self.rest is not None, "give the config a rest_upstream"
        return f"http://127.0.0.1:{self.rest.port}"

    @property
    def stub(self) -> Any:
        """The official PredictionService stub, pointed at the guard."""
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        return prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    @property
    def model_stub(self) -> Any:
        """The official ModelService stub, pointed at the guard."""
        from tensorflow_serving.apis import model_service_pb2_grpc

        return model_service_pb2_grpc.ModelServiceStub(self.channel)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value, read from the HTTP /metrics endpoint (not the registry)."""
        for family in scrape(self.metrics_url):
            for s in family.samples:
                if s.name == name and (labels is None or s.labels == labels):
                    return float(s.value)
        return None

    async def stop(self) -> None:
        await self.channel.close()
        if self.rest is not None:
            await self.rest.stop(0)
        await self.server.stop(0)
        self.httpd.shutdown()
        self.httpd.server_close()


async def start_in_process(config: Config) -> RunningGuard:
    """A :class:`GuardServer` for ``config`` in this event loop, with /metrics."""
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, config.model_names(), config.max_class_label_values)
    httpd, _ = start_http_server(0, "127.0.0.1", registry=registry)
    server = GuardServer(config, metrics)
    port = await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    metrics_url = f"http://127.0.0.1:{httpd.server_port}/metrics"
    rest = RestFrontEnd(server) if config.rest_upstream is not None else None
    if rest is not None:
        await rest.start()
    return RunningGuard(server, address, registry, metrics_url, channel, httpd, rest)


# ------------------------------------------------------------------- as a process


class GuardProcess(Child):
    """One ``guard serve`` child process and how to reach it."""

    _sync_channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the guard's gRPC listener."""
        return self.endpoint("grpc")

    @property
    def grpc_port(self) -> int:
        return int(self.ports["grpc"])

    @property
    def metrics_port(self) -> int:
        return int(self.ports["metrics"])

    @property
    def rest_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the guard's REST listener."""
        return f"http://{self.endpoint('rest')}"

    @property
    def metrics_url(self) -> str:
        """The guard's Prometheus endpoint."""
        return f"http://{self.endpoint('metrics')}/metrics"

    @property
    def channel(self) -> grpc.Channel:
        """A (synchronous) channel to the guard, opened on first use."""
        if self._sync_channel is None:
            self._sync_channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        return self._sync_channel

    def sample(self, name: str, **labels: str) -> float:
        """The sum of the samples on /metrics whose labels include ``labels`` (0 if none)."""
        return sample_sum(self.metrics_url, name, **labels)

    def log(self) -> str:
        """Everything the process logged so far."""
        return self.log_text()

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def rss_kb(self) -> int:
        return rss_kb(self.process.pid)

    async def wait(self, timeout_s: float) -> int:
        """The exit code, waiting at most ``timeout_s`` without blocking the loop."""
        return await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout_s)

    def stop(self, timeout_s: float = 15.0) -> int:
        if self._sync_channel is not None:
            self._sync_channel.close()
        return super().stop(timeout_s)


def start_guard(
    config: Path,
    *extra: str,
    upstream: str | None = None,
    log_level: str = "info",
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> GuardProcess:
    """Start ``guard serve --config CONFIG`` on ephemeral loopback ports and wait for it."""
    argv = guard_argv(
        "serve", "--config", str(config), "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--log-level", log_level,
    )  # fmt: skip
    if upstream is not None:
        argv += ["--upstream", upstream]
    child = start([*argv, *extra], log_path=log_path, env=env, cwd=REPO)
    return GuardProcess(child.process, child.ports, child.log_path, child.workdir)


@contextlib.asynccontextmanager
async def guard_process(
    config: Path, tmp: Path, *extra: str, log_level: str = "info"
) -> AsyncIterator[GuardProcess]:
    """``async with`` a :func:`start_guard` process; killed (if still running) at the end."""
    log_path = tmp / f"guard-{os.urandom(4).hex()}.log"
    guard = await asyncio.to_thread(
        start_guard, config, *extra, log_level=log_level, log_path=log_path
    )
    try:
        yield guard
    finally:
        if guard.process.poll() is None:
            guard.process.kill()
        await asyncio.to_thread(guard.process.wait)


def stop_all(guards: Sequence[Child]) -> None:
    """Signal every process first, so they shut down in parallel, then reap each."""
    for guard in guards:
        if guard.process.poll() is None:
            guard.process.terminate()
    for guard in guards:
        guard.stop()
