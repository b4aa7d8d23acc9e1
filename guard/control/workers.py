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
import logging
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from guard.control.config import Config, settings
from guard.control.net import join_address, split_address
from guard.control.process import Child, ChildStartError, guard_argv, start, write_port_file
from guard.metrics.aggregate import AggregatingCollector
from guard.metrics.endpoint import start_metrics_server
from guard.metrics.supervisor import SupervisorMetrics

__all__ = ["run_workers", "worker_argv"]

logger = logging.getLogger("guard.workers")

_PR_SET_PDEATHSIG = 1
_STARTUP_S = 60.0
_POLL_S = 0.2
# A gap this long between two of the supervisor's own polls means the
# supervisor itself was not running: it cannot tell how long workers stalled.
_BLIND_S = 2.0
# Each worker's own addresses, set by the supervisor.
_SUPERVISED = ("listen", "metrics_listen", "rest_listen")


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


def worker_argv(
    config_path: str | None,
    overrides: Mapping[str, Any],
    listen: str,
    rest_listen: str | None = None,
) -> list[str]:
    """The ``guard serve`` arguments of one worker: the same file and overrides
    (as their own flags), on the shared ports, with private metrics."""
    argv = guard_argv("serve")
    if config_path:
        argv += ["--config", config_path]
    for name, setting in settings():
        value = overrides.get(name)
        if value is not None and setting.flag and name not in _SUPERVISED:
            argv += [setting.flag, str(value)]
    if rest_listen is not None:
        argv += ["--rest-listen", rest_listen]
    # --workers 1 explicitly: a worker must never supervise workers of its
    # own, whatever GUARD_WORKERS its environment holds. --as-worker: it
    # shares the ports with its siblings, not with a stranger (checked here).
    return [
        *argv, "--listen", listen, "--metrics-listen", "127.0.0.1:0", "--workers", "1",
        "--as-worker",
    ]  # fmt: skip


def _start_worker(argv: list[str], cancelled: Callable[[], bool]) -> Child:
    return start(
        argv, timeout_s=_STARTUP_S, capture=False, preexec_fn=_die_with_parent, cancelled=cancelled
    )


_RESTARTS_MAX = 5
_RESTART_WINDOW_S = 60.0
# A replacement that fails to start is tried again after this, doubling up
# to the most.
_RETRY_S = 1.0
_RETRY_MAX_S = 30.0


def run_workers(
    config: Config,
    config_path: str | None,
    overrides: Mapping[str, Any],
    workers: int,
    port_file: Path | None,
) -> int:
    """Supervise ``workers`` copies of ``guard serve`` until SIGTERM/SIGINT."""
    host, port = split_address(config.listen)
    reserved = _reserve_port(host, port)
    rest = _reserve_rest(config)
    rest_host = split_address(config.rest_listen)[0]
    rest_listen = None if rest is None else join_address(rest_host, rest.getsockname()[1])
    listen = join_address(host, reserved.getsockname()[1])
    registry = CollectorRegistry()
    argv = worker_argv(config_path, overrides, listen, rest_listen)
    pool = _Pool(argv, config.worker_stall_timeout_s, registry)

    def forward(signum: int, _frame: object) -> None:
        if signum != signal.SIGHUP:
            pool.stopping = True
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing to reload from here on
        pool.signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    started = pool.start_all(workers)
    if not started or pool.stopping:
        pool.signal(signal.SIGTERM)
        return _wait(pool.children) or int(not started)
    try:
        return _supervise(config, pool, registry, reserved, port_file, rest)
    finally:
        reserved.close()
        if rest is not None:
            rest.close()


def _reserve_rest(config: Config) -> socket.socket | None:
    """The REST port the workers share, when REST is served."""
    if config.rest_upstream is None:
        return None
    return _reserve_port(*split_address(config.rest_listen))


class _Pool:
    """The workers, and the restarts of those that died."""

    def __init__(
        self, argv: list[str], stall_s: float, registry: CollectorRegistry | None = None
    ) -> None:
        self.argv = argv
        self.children: list[Child] = []
        self.stopping = False
        self.metrics = SupervisorMetrics(registry or CollectorRegistry())
        self._restarts: list[float] = []
        self._stopped: set[int] = set()
        self._killed: set[int] = set()  # stalled, killed by us
        # A worker whose loop stops touching its port file (stopped, stuck) is
        # killed: the kernel keeps handing it its share of new connections.
        self._heartbeats = _Heartbeats(stall_s)
        self._missing = 0  # workers to start again
        self._retry_at = 0.0
        self._backoff_s = _RETRY_S

    def start_all(self, workers: int) -> bool:
        """Start the first ``workers``; False if one could not start (not if SIGTERM ended it)."""
        try:
            while len(self.children) < workers and not self.stopping:
                self.start_one()
        except ChildStartError as exc:
            if self.stopping:
                return True
            logger.error("a worker failed to start; stopping: %s", exc)
            return False
        return True

    def start_one(self) -> Child:
        """Start a worker; SIGTERM while it starts ends it (ChildStartCancelled)."""
        child = _start_worker(self.argv, lambda: self.stopping)
        self.children.append(child)
        logger.info("worker started (pid %d)", child.process.pid)
        return child

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every worker running; SIGTERM and SIGINT only
        once to each: a second one, arriving after a worker's drain has
        ended, would kill it mid-exit (-15)."""
        stop = signum != signal.SIGHUP
        for child in self.children:
            if child.process.poll() is not None or (stop and child.process.pid in self._stopped):
                continue
            child.process.send_signal(signum)
            if stop:
                self._stopped.add(child.process.pid)

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{c.ports['metrics']}/metrics" for c in self.children]

    def kill_stalled(self) -> None:
        """SIGKILL each worker whose event loop stopped beating (``worker_stall_timeout_s``);
        :meth:`replace_dead` starts another."""
        for child, silent_s in self._heartbeats.stalled(self.children):
            logger.error(
                "worker pid %d has not run its event loop for %.1f s (stopped or stuck); "
                "killing it", child.process.pid, silent_s,
            )  # fmt: skip
            child.process.kill()
            self._killed.add(child.process.pid)

    def replace_dead(self) -> bool:
        """Start a new worker for each that exited; False once they die too often."""
        for child in [c for c in self.children if c.process.poll() is not None]:
            stalled = child.process.pid in self._killed
            self._killed.discard(child.process.pid)
            self.metrics.worker_restarts.labels("stalled" if stalled else "exited").inc()
            if not stalled:
                logger.error(
                    "worker pid %d exited with code %d; starting another",
                    child.process.pid, child.process.returncode,
                )  # fmt: skip
            self.children.remove(child)
            _forget(child)
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW_S] + [now]
            if len(self._restarts) > _RESTARTS_MAX:
                logger.error(
                    "workers died %d times within %.0f s; stopping", len(self._restarts),
                    _RESTART_WINDOW_S,
                )  # fmt: skip
                return False
            self._missing += 1
        return self._start_missing()

    def _start_missing(self) -> bool:
        """Start the workers missing; one that cannot start (the config on
        disk was broken since, say) is tried again with backoff while the
        others serve. False once none is left to serve."""
        while (
            self._missing
            and not self.stopping
            and (not self.children or time.monotonic() >= self._retry_at)
        ):
            try:
                self.start_one()
            except ChildStartError as exc:
                if self.stopping:
                    return True  # SIGTERM ended its start: a drain, not a failure
                self._retry_at = time.monotonic() + self._backoff_s
                logger.error(
                    "a replacement worker failed to start; %d of %d serving, trying again "
                    "in %.0f s: %s", len(self.children), len(self.children) + self._missing,
                    self._backoff_s, exc,
                )  # fmt: skip
                self._backoff_s = min(2 * self._backoff_s, _RETRY_MAX_S)
                return bool(self.children)
            self._missing -= 1
            self._backoff_s = _RETRY_S
        return True


class _Heartbeats:
    """When the supervisor last saw each worker's port file touched (see
    :func:`~guard.control.process.keep_fresh`), on its own monotonic clock."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._seen: dict[int, tuple[int, float]] = {}  # pid: (mtime_ns, when it changed)
        self._polled = time.monotonic()

    def stalled(self, children: Sequence[Child]) -> list[tuple[Child, float]]:
        """The running workers silent for ``stall_s``, with how long."""
        now = time.monotonic()
        blind = now - self._polled > _BLIND_S
        self._polled = now
        seen, self._seen = self._seen, {}
        found = []
        for child in children:
            pid = child.process.pid
            try:
                mtime = child.port_file.stat().st_mtime_ns
            except OSError:
                mtime = -1  # removed: it cannot beat any more
            before = seen.get(pid)
            if before is None or before[0] != mtime or blind:
                self._seen[pid] = (mtime, now)
                continue
            self._seen[pid] = before
            if now - before[1] > self.stall_s and child.process.poll() is None:
                found.append((child, now - before[1]))
        return found


def _supervise(
    config: Config,
    pool: _Pool,
    registry: CollectorRegistry,
    reserved: socket.socket,
    port_file: Path | None,
    rest: socket.socket | None = None,
) -> int:
    registry.register(AggregatingCollector(pool.urls))
    m_host, m_port = split_address(config.metrics_listen)
    httpd, _ = start_metrics_server(m_host, m_port, registry)
    port = reserved.getsockname()[1]
    logger.info(
        "%d workers serving gRPC on port %d; aggregated metrics on port %d",
        len(pool.children), port, httpd.server_port,
    )  # fmt: skip
    ports: dict[str, Any] = {"grpc": port, "metrics": httpd.server_port}
    if rest is not None:
        ports["rest"] = rest.getsockname()[1]
    _announce(port_file, ports, pool)
    healthy = True
    try:
        while not pool.stopping and healthy:
            time.sleep(_POLL_S)
            if not pool.stopping:
                pool.kill_stalled()
                healthy = pool.replace_dead()
                _announce(port_file, ports, pool)
        pool.signal(signal.SIGTERM)
        code = _wait(pool.children)
    finally:
        httpd.shutdown()
        httpd.server_close()
        for child in pool.children:
            _forget(child)
    return code or (0 if healthy else 1)


def _announce(port_file: Path | None, ports: dict[str, Any], pool: _Pool) -> None:
    """The port file, with the workers running now (written again when they change)."""
    pids = [c.process.pid for c in pool.children]
    if port_file is not None and ports.get("workers") != pids:
        ports["workers"] = pids
        write_port_file(port_file, ports)


def _forget(child: Child) -> None:
    """Remove a worker's directory (its port file): every replacement left one in /tmp."""
    shutil.rmtree(child.workdir, ignore_errors=True)


def _wait(children: Sequence[Child], timeout_s: float = 120.0) -> int:
    """Wait for children already told to stop; kill one that outlives ``timeout_s``."""
    worst = 0
    for child in children:
        try:
            code = child.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.process.kill()
            code = child.process.wait()
        worst = worst or code
    return worst
