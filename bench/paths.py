"""The benchmarked paths: how to start each hop in front of an upstream.

Every path is started as its own process (nginx, the passthrough, the guard) so
/proc/<pid> accounts exactly the proxy; ``direct`` starts nothing.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import nginx
from bench._common import read_port_file
from bench.load import wait_serving


@dataclass
class Hop:
    """A running proxy process (or none, for ``direct``)."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float | None = None
    log: Path | None = None
    metrics_port: int | None = None

    @property
    def pid(self) -> int | None:
        """The proxy's process id."""
        return self.proc.pid if self.proc else None

    @property
    def target(self) -> str:
        """Address clients dial."""
        return f"127.0.0.1:{self.port}"

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process, then SIGKILL it if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class Setup:
    """What every path needs to know to start."""

    upstream: str
    workdir: Path
    guard_config: Path | None = None


Starter = Callable[[Setup, str], Hop]


def free_port() -> int:
    """A currently unused loopback port (for nginx, which cannot report port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_python(
    name: str,
    setup: Setup,
    tag: str,
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Hop:
    """Start ``python -m ...`` writing a port file; wait until SERVING.

    ``cwd`` runs it from another checkout (``python -m`` imports from there)."""
    port_file = setup.workdir / f"{tag}.ports.json"
    port_file.unlink(missing_ok=True)
    log = setup.workdir / f"{tag}.log"
    cmd = [sys.executable, "-m", *argv, "--port-file", str(port_file)]
    with log.open("wb") as out:
        spawned = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd
        )

    def target() -> str | None:
        ports = read_port_file(port_file)
        return f"127.0.0.1:{ports['grpc']}" if ports else None

    try:
        startup = wait_serving(target, proc, spawned)
    except (RuntimeError, TimeoutError) as err:
        proc.kill()
        proc.wait()
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name} did not start: {err}\n{tail}") from err
    ports = read_port_file(port_file) or {}
    return Hop(name, ports["grpc"], proc, startup, log, ports.get("metrics"))


def start_direct(setup: Setup, tag: str) -> Hop:
    """No hop: clients dial the upstream."""
    host, _, port = setup.upstream.rpartition(":")
    return Hop("direct", int(port))


def start_nginx(setup: Setup, tag: str) -> Hop:
    """nginx grpc_pass, single process."""
    workdir = setup.workdir / f"nginx-{tag}"
    port = free_port()
    conf = nginx.write_config(workdir, setup.upstream, port)
    nginx.check_config(conf)
    log = workdir / "stdout.log"
    with log.open("wb") as out:
        spawned = time.perf_counter()
        proc = subprocess.Popen(nginx.command(conf), stdout=out, stderr=subprocess.STDOUT)
    try:
        startup = wait_serving(lambda: f"127.0.0.1:{port}", proc, spawned)
    except (RuntimeError, TimeoutError) as err:
        proc.kill()
        proc.wait()
        errors = (workdir / "error.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"nginx did not start: {err}\n{errors}") from err
    return Hop("nginx", port, proc, startup, workdir / "error.log")


def _passthrough(*extra: str, name: str = "passthrough") -> Starter:
    def start(setup: Setup, tag: str) -> Hop:
        argv = ["bench.passthrough", "--upstream", setup.upstream, "--listen", "127.0.0.1:0"]
        return spawn_python(name, setup, f"{name}-{tag}", [*argv, *extra])

    return start


def guard_available() -> bool:
    """Whether the guard's CLI module exists in this checkout."""
    return importlib.util.find_spec("guard.cli") is not None


def _guard(*extra: str, name: str = "guard") -> Starter:
    def start(setup: Setup, tag: str) -> Hop:
        """``python -m guard serve`` with the harness's rule set."""
        if setup.guard_config is None:
            raise RuntimeError("no guard config was generated")
        if not guard_available():
            raise RuntimeError("guard.cli does not exist yet in this checkout")
        argv = [
            "guard",
            "serve",
            "--config", str(setup.guard_config),
            "--upstream", setup.upstream,
            "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0",
            *extra,
        ]  # fmt: skip
        return spawn_python(name, setup, f"{name}-{tag}", argv)

    return start


start_guard = _guard()


PATHS: dict[str, Starter] = {
    "direct": start_direct,
    "nginx": start_nginx,
    "passthrough": _passthrough(),
    "guard": start_guard,
    # N processes on one port; h2load's c=64 opens 4 connections, which
    # SO_REUSEPORT spreads over the workers (c=16 is one connection: one worker).
    "guard-w2": _guard("--workers", "2", name="guard-w2"),
    # Variants of the raw hop, for finding what lowers its cost (--paths).
    "passthrough-uvloop": _passthrough("--uvloop", name="passthrough-uvloop"),
    "passthrough-sync": _passthrough("--sync", name="passthrough-sync"),
    "passthrough-notrailers": _passthrough("--no-trailers", name="passthrough-notrailers"),
    # The guard's stream-unary handler and its own read of the request.
    "passthrough-stream": _passthrough("--stream-unary", name="passthrough-stream"),
    "passthrough-nobdp": _passthrough(
        "--server-option=grpc.http2.bdp_probe=0",
        "--channel-option=grpc.http2.bdp_probe=0",
        name="passthrough-nobdp",
    ),
    "passthrough-throughput": _passthrough(
        "--server-option=grpc.optimization_target=throughput",
        "--channel-option=grpc.optimization_target=throughput",
        name="passthrough-throughput",
    ),
}

DEFAULT_PATHS = ("direct", "nginx", "passthrough", "guard", "guard-w2")
