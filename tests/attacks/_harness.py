"""Real processes for the attack tests: the upstream (tests/attacks/upstream.py)
and ``guard serve`` in front of it, both on loopback port 0, plus /proc
readings (RSS, peak RSS, CPU) and a prober that makes legitimate calls on its
own connection while an attack runs."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tests.attacks import protos

REPO = Path(__file__).resolve().parents[2]
PREDICT = "/tensorflow.serving.PredictionService/Predict"
STATS = "/attack.Control/Stats"
INTEROP = "/attack.Interop/"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A separate subchannel pool: the prober's calls never share a TCP connection
# with anything else in this process.
CLIENT_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.enable_retries", 0),
]

LEGIT_REQUEST = protos.predict_request("m")
BASE_RULES = "models:\n  - name: m\n    outputs: [{name: p, argmax: true, labels: [a, b]}]\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


def rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS")


def hwm_kb(pid: int) -> int:
    """Peak RSS since the process started."""
    return _status_kb(pid, "VmHWM")


def cpu_s(pid: int) -> float:
    """User + system CPU time of ``pid`` (all threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    ports: dict[str, int]
    log_path: Path
    config_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def port(self) -> int:
        return self.ports["grpc"]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def hwm_kb(self) -> int:
        return hwm_kb(self.pid)

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as ``{'name{k="v",...}': value}``."""
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)


def _start(args: list[str], tmp: Path, tag: str, bound_s: float = 60.0) -> Proc:
    port_file = tmp / f"{tag}-{os.urandom(3).hex()}.json"
    log_path = tmp / f"{tag}-{os.urandom(3).hex()}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, *args, "--port-file", str(port_file)],
            stdout=log,
            stderr=log,
            cwd=REPO,
            env=_env(),
        )
    deadline = time.monotonic() + bound_s
    while not port_file.exists():
        if popen.poll() is not None:
            raise AssertionError(f"{tag} exited {popen.returncode}: {log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            popen.kill()
            raise AssertionError(f"{tag} wrote no port file within {bound_s} s")
        time.sleep(0.02)
    return Proc(popen, json.loads(port_file.read_text()), log_path)


def start_upstream(tmp: Path) -> Proc:
    return _start(["-m", "tests.attacks.upstream"], tmp, "upstream")


def start_guard(tmp: Path, upstream: str, config: str = BASE_RULES, *extra: str) -> Proc:
    cfg = tmp / f"guard-{os.urandom(3).hex()}.yaml"
    cfg.write_text(config, encoding="utf-8")
    args = [
        "-m", "guard", "serve", "--config", str(cfg), "--upstream", upstream,
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *extra,
    ]  # fmt: skip
    guard = _start(args, tmp, "guard")
    guard.config_path = cfg
    return guard


@contextlib.contextmanager
def guarded(tmp: Path, config: str = BASE_RULES, *extra: str) -> Iterator[tuple[Proc, Proc]]:
    """An upstream and a guard in front of it; both killed at the end."""
    upstream = start_upstream(tmp)
    try:
        guard = start_guard(tmp, upstream.address, config, *extra)
        try:
            yield upstream, guard
        finally:
            guard.stop()
    finally:
        upstream.stop()


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CLIENT_OPTIONS)


def upstream_stats(upstream: Proc) -> dict[str, Any]:
    with channel(upstream.address) as ch:
        stats: dict[str, Any] = json.loads(ch.unary_unary(STATS)(b"", timeout=5))
        return stats


@dataclass
class CallResult:
    code: str
    latency_s: float
    details: str = ""
    body: bytes = b""


def legit_call(
    ch: grpc.Channel, request: bytes = LEGIT_REQUEST, timeout: float = 5.0
) -> CallResult:
    """One legitimate Predict for model ``m`` (a guarded one)."""
    start = time.perf_counter()
    try:
        body = ch.unary_unary(PREDICT)(request, timeout=timeout)
        return CallResult("OK", time.perf_counter() - start, body=body)
    except grpc.RpcError as exc:
        return CallResult(exc.code().name, time.perf_counter() - start, exc.details() or "")


def calls_at_once(
    address: str,
    request: bytes,
    clients: int,
    call: Callable[[grpc.Channel, bytes], CallResult] | None = None,
) -> list[CallResult]:
    """``clients`` calls of ``request`` (Predict, unless ``call`` makes
    another), each on its own connection (connected first), sent together."""
    results: list[CallResult] = []
    start = threading.Barrier(clients, timeout=30)
    make = call or (lambda ch, body: legit_call(ch, body, timeout=30))

    def one() -> None:
        with channel(address) as ch:
            grpc.channel_ready_future(ch).result(timeout=10)
            start.wait()
            results.append(make(ch, request))

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == clients, f"{clients - len(results)} clients got no answer"
    return results


def legit_ok(address: str, timeout: float = 5.0) -> CallResult:
    with channel(address) as ch:
        return legit_call(ch, timeout=timeout)


@dataclass
class Prober:
    """Legitimate Predict calls, one after the other every ``interval_s``, on
    a connection of their own, from a background thread; bounded by
    ``max_s``."""

    address: str
    interval_s: float = 0.02
    timeout_s: float = 5.0
    max_s: float = 60.0
    results: list[CallResult] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Prober:
        ready = threading.Event()

        def run() -> None:
            end = time.monotonic() + self.max_s
            with channel(self.address) as ch:
                legit_call(ch, timeout=self.timeout_s)  # connect before the attack
                ready.set()
                while not self._stop.is_set() and time.monotonic() < end:
                    self.results.append(legit_call(ch, timeout=self.timeout_s))
                    self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=run, name="prober", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)

    @property
    def failures(self) -> list[CallResult]:
        return [r for r in self.results if r.code != "OK"]

    @property
    def max_latency_s(self) -> float:
        return max((r.latency_s for r in self.results), default=0.0)

    def summary(self) -> str:
        codes: dict[str, int] = {}
        for r in self.results:
            codes[r.code] = codes.get(r.code, 0) + 1
        return f"{len(self.results)} calls, codes {codes}, max latency {self.max_latency_s:.3f} s"


def sample(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def settle_rss(proc: Proc, seconds: float) -> int:
    """RSS after ``seconds`` (the guard idles meanwhile)."""
    time.sleep(seconds)
    return proc.rss_kb()


def answering_within(guard: Proc, within_s: float) -> CallResult | None:
    """Retry a legitimate call (new connection each time) until one is OK or
    ``within_s`` passes; the last result, or None if the process exited."""
    deadline = time.monotonic() + within_s
    last = CallResult("NONE", 0.0)
    while True:
        if not guard.alive():
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            return last
        last = legit_ok(guard.address, timeout=max(min(left, 1.0), 0.05))
        if last.code == "OK":
            return last
        time.sleep(0.02)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def guard_cli(*args: str, address_space_gib: float = 2.0, timeout_s: float = 30.0) -> CliResult:
    """Run ``python -m guard ARGS`` with an address-space limit, so a guard that
    reads a huge file fails fast with MemoryError instead of exhausting the box."""
    limit = int(address_space_gib * 2**30)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "guard", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=_env(),
            timeout=timeout_s,
            preexec_fn=limit_memory,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"guard {' '.join(args)} ran past {timeout_s} s") from exc
    return CliResult(done.returncode, done.stdout, done.stderr, time.monotonic() - start)
