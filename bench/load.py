"""Load generation and process accounting for the benchmark paths.

- latency at concurrency 1: a Python gRPC client timing each call;
- throughput at concurrency 16/64: h2load speaking gRPC framing (it only sees
  HTTP statuses, so :func:`grpc_status_check` checks grpc-status separately);
- CPU and RSS of one process from /proc, and startup time to SERVING.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench._common import MESSAGE_OPTIONS
from bench.payloads import HEALTH_CHECK_METHOD, PREDICT_METHOD

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_HEALTH_SERVING = b"\x08\x01"


# --- /proc accounting -------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (``guard serve --workers N`` is one
    supervisor and N worker processes; every other path is a single process)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def _own_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants (all threads), in seconds."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += _own_cpu_seconds(p)
        except OSError:
            continue  # exited between listing and reading
    return total


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` value (VmRSS, VmHWM, ...) from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` and its live descendants, in MiB."""
    total = 0
    for p in process_tree(pid):
        try:
            total += status_kb(p, "VmRSS")
        except (OSError, KeyError):
            continue
    return total / 1024


class RssSampler:
    """Samples VmRSS of a process in a background thread; keeps the maximum."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self._pid = pid
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.max_mb = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_mb = max(self.max_mb, rss_mb(self._pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.max_mb = max(self.max_mb, rss_mb(self._pid))
        except (FileNotFoundError, ProcessLookupError):
            pass


# --- startup ---------------------------------------------------------------------------


def health_serving(target: str, timeout_s: float = 0.5) -> bool:
    """Whether grpc.health.v1 Check on ``target`` answers SERVING right now.

    UNIMPLEMENTED also counts: a pure hop (nginx, the passthrough) forwards the
    Check to an upstream without a health service, so the answer proves the hop
    is up and forwarding.
    """
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary(HEALTH_CHECK_METHOD)
        try:
            return bool(check(b"", timeout=timeout_s) == _HEALTH_SERVING)
        except grpc.RpcError as err:
            return bool(err.code() == grpc.StatusCode.UNIMPLEMENTED)  # type: ignore[attr-defined]


def wait_serving(
    target_fn: Any, proc: subprocess.Popen[bytes], spawned_at: float, timeout_s: float = 30.0
) -> float:
    """Poll until ``target_fn()`` names an address whose health Check is SERVING.

    ``target_fn`` returns None while the address is not known yet (port file not
    written). Returns seconds since ``spawned_at`` (a ``time.perf_counter()``).
    """
    deadline = spawned_at + timeout_s
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before SERVING")
        target = target_fn()
        if target is not None and health_serving(target):
            return time.perf_counter() - spawned_at
        time.sleep(0.01)
    raise TimeoutError(f"not SERVING within {timeout_s}s")


# --- latency at concurrency 1 -------------------------------------------------------------


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99 and the count of ``samples_ms``."""
    p50, p90, p99 = np.percentile(np.asarray(samples_ms, np.float64), [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "n": len(samples_ms)}


def h2load_log_ms(log: Path) -> list[float]:
    """Per-request times, in ms, of the answers with HTTP status 200 in an
    ``h2load --log-file`` log (start in µs since the epoch, status, µs to the
    response's end)."""
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    return [int(r[2]) / 1000.0 for r in rows if r[1] == "200"]


@dataclass
class Latency:
    """Per-call latency figures in milliseconds."""

    calls: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    errors: int

    @classmethod
    def from_samples(cls, samples_ns: list[int], errors: int) -> Latency:
        """Summarise raw per-call durations."""
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(len(ms), float(p50), float(p90), float(p99), float(ms.mean()), errors)


def latency_c1(target: str, request: bytes, calls: int, warmup: int) -> Latency:
    """Time ``calls`` sequential Predict calls (after ``warmup`` untimed ones)."""
    with grpc.insecure_channel(target, options=MESSAGE_OPTIONS) as channel:
        predict = channel.unary_unary(PREDICT_METHOD)
        for _ in range(warmup):
            predict(request, timeout=10)
        samples: list[int] = []
        errors = 0
        clock = time.perf_counter_ns
        for _ in range(calls):
            start = clock()
            try:
                predict(request, timeout=10)
            except grpc.RpcError:
                errors += 1
                continue
            samples.append(clock() - start)
    return Latency.from_samples(samples, errors)


# --- grpc-status check ---------------------------------------------------------------------


def grpc_status_check(
    target: str, request: bytes, calls: int = 64, concurrency: int = 16
) -> dict[str, int]:
    """Issue ``calls`` concurrent Predicts; count the gRPC status codes that come back."""

    async def run() -> Counter[str]:
        codes: Counter[str] = Counter()
        async with grpc.aio.insecure_channel(target, options=MESSAGE_OPTIONS) as channel:
            predict = channel.unary_unary(PREDICT_METHOD)
            sem = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with sem:
                    try:
                        reply = await predict(request, timeout=10)
                        codes["OK" if reply else "EMPTY"] += 1
                    except grpc.aio.AioRpcError as err:
                        codes[err.code().name] += 1

            await asyncio.gather(*(one() for _ in range(calls)))
        return codes

    return dict(asyncio.run(run()))


# --- throughput with h2load ----------------------------------------------------------------


@dataclass
class Throughput:
    """What h2load reports for one run, plus CPU/RSS of the proxy process."""

    concurrency: int
    requests: int
    rps: float
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    seconds: float
    proxy_cpu_s: float | None = None
    proxy_rss_max_mb: float | None = None
    raw: str = field(default="", repr=False)

    @property
    def errors(self) -> int:
        """Failed, errored, timed-out or non-2xx requests."""
        return self.failed + self.errored + self.timeout + (self.requests - self.status_2xx)

    @property
    def cpu_ms_per_request(self) -> float | None:
        """Proxy CPU milliseconds per completed request."""
        if self.proxy_cpu_s is None or self.succeeded == 0:
            return None
        return 1000.0 * self.proxy_cpu_s / self.succeeded


def find_h2load() -> str:
    """Path of h2load, or raise with a hint how to install it."""
    found = shutil.which("h2load")
    if not found:
        raise FileNotFoundError(
            "h2load not found; install it (Debian: apt-get install nghttp2-client)"
        )
    return found


def h2load_command(
    port: int, data_file: Path, requests: int, clients: int, streams: int
) -> list[str]:
    """h2load command line for gRPC Predict calls with a framed request body."""
    return [
        find_h2load(),
        "-n", str(requests),
        "-c", str(clients),
        "-m", str(streams),
        "-t", "1",
        "--header", "content-type: application/grpc",
        "--header", "te: trailers",
        "-d", str(data_file),
        f"http://127.0.0.1:{port}{PREDICT_METHOD}",
    ]  # fmt: skip


_RE_FINISHED = re.compile(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s")
_RE_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_RE_CODES = re.compile(r"status codes: (\d+) 2xx")


def parse_h2load(text: str, concurrency: int) -> Throughput:
    """Parse h2load's summary."""
    finished = _RE_FINISHED.search(text)
    reqs = _RE_REQUESTS.search(text)
    codes = _RE_CODES.search(text)
    if not (finished and reqs and codes):
        raise ValueError(f"cannot parse h2load output:\n{text}")
    seconds = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    total, ok, failed, errored, timeout = (int(g) for g in reqs.groups())
    return Throughput(
        concurrency=concurrency,
        requests=total,
        rps=float(finished.group(3)),
        succeeded=ok,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status_2xx=int(codes.group(1)),
        seconds=seconds,
        raw=text,
    )


def throughput(
    port: int,
    data_file: Path,
    requests: int,
    concurrency: int,
    streams_per_connection: int = 16,
    proxy_pid: int | None = None,
) -> Throughput:
    """Run h2load at ``concurrency`` streams; account the proxy's CPU and peak RSS."""
    clients = max(1, concurrency // streams_per_connection)
    streams = concurrency // clients
    cmd = h2load_command(port, data_file, requests, clients, streams)
    cpu_before = cpu_seconds(proxy_pid) if proxy_pid else None
    sampler = RssSampler(proxy_pid) if proxy_pid else None
    if sampler:
        sampler.__enter__()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    finally:
        if sampler:
            sampler.__exit__()
    result = parse_h2load(proc.stdout, concurrency)
    if proxy_pid and cpu_before is not None:
        result.proxy_cpu_s = cpu_seconds(proxy_pid) - cpu_before
        result.proxy_rss_max_mb = sampler.max_mb if sampler else None
    return result
