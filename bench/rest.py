"""The REST section of ``make bench``: TF Serving's REST API through each hop, interleaved.

    python -m bench.rest [--rounds 3] [--paths direct,nginx,passthrough,guard] [--quick]

Paths, each its own process in front of one canned REST upstream
(:mod:`bench.rest_upstream`, 1 x 1 and 1024 x 201 row-format responses):

- ``direct``: no hop;
- ``nginx``: ``proxy_pass`` over HTTP/1.1 with upstream keepalive (the anchor);
- ``passthrough``: :mod:`bench.rest_passthrough`, raw aiohttp, no rules (the floor);
- ``guard``: ``guard serve`` with REST on and the demo rules (threshold + labels for the
  1 x 1 output; check_sum, argmax, top_k 5, labels for the softmax).

Per round, every path is started fresh, in an order that rotates per round, and each
response size is timed at concurrency 1 (a keep-alive ``http.client`` connection, one call
at a time) and 16 (``h2load --h1``, 16 connections, per-request times from its log):
p50/p99, the hop's CPU per request (``/proc``), requests/s. The paths of a round are up
together and take their load in slices, one path after another, so that a slow spell of
this shared machine falls on all of them rather than on one path's whole measurement.
Added latency is paired per round against ``direct``. The idle RSS of the guard with
REST on is set against the same guard without REST (``guard-grpc-only``, started and
measured idle only).

Writes bench/results/<date>-rest.json and prints the markdown section that
``python -m bench.run`` puts in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import load, machine, nginx
from bench._common import read_port_file
from bench.paths import free_port
from bench.rest_upstream import MODELS, SOFTMAX, TINY, RestModel, request_body

logger = logging.getLogger("bench.rest")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
PATH_NAMES = ("direct", "nginx", "passthrough", "guard")
CONCURRENCY = 16


@dataclass(frozen=True)
class RestSettings:
    """How much load each path gets per round; the 1024 x 201 size gets a tenth."""

    rounds: int = 3
    latency_calls: int = 1000
    warmup_calls: int = 50
    h2load_requests: int = 4000
    big_divisor: int = 20
    slices: int = 5
    """Turns each path takes per size and round (see the module doc)."""

    @classmethod
    def quick(cls) -> RestSettings:
        """Tiny settings: a smoke test of the harness, no figures."""
        return cls(
            rounds=1, latency_calls=10, warmup_calls=3, h2load_requests=32, big_divisor=4,
            slices=2,
        )  # fmt: skip

    def calls(self, model: RestModel, count: int) -> int:
        """``count`` for the 1 x 1 size, a ``big_divisor``-th of it for larger ones."""
        return count if model.rows * model.classes == 1 else max(4, count // self.big_divisor)


@dataclass
class RestHop:
    """A running hop (no process for ``direct``)."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float | None = None

    @property
    def pid(self) -> int | None:
        """The hop's process id."""
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- starting the hops --------------------------------------------------------------------


def http_ok(port: int, path: str = f"/v1/models/{TINY.name}", timeout_s: float = 1.0) -> bool:
    """Whether ``GET path`` on ``port`` answers 200 (the hop is up and forwards)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_http(port_fn: Callable[[], int | None], proc: subprocess.Popen[bytes]) -> float:
    """Seconds from now until the hop answers; raise if it exits or takes over 30 s."""
    start = time.perf_counter()
    while time.perf_counter() - start < 30.0:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before serving")
        port = port_fn()
        if port is not None and http_ok(port):
            return time.perf_counter() - start
        time.sleep(0.02)
    raise TimeoutError("not serving within 30 s")


def _spawn(argv: list[str], workdir: Path, tag: str, port_key: str) -> tuple[Any, int, float]:
    """Start ``python -m ARGV --port-file F``; wait until it forwards."""
    port_file = workdir / f"{tag}.ports.json"
    port_file.unlink(missing_ok=True)
    log = (workdir / f"{tag}.log").open("wb")
    spawned = time.perf_counter()
    cmd = [sys.executable, "-m", *argv, "--port-file", str(port_file)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    log.close()

    def port() -> int | None:
        return (read_port_file(port_file) or {}).get(port_key)

    try:
        wait_http(port, proc)
    except (RuntimeError, TimeoutError) as err:
        proc.kill()
        proc.wait()
        tail = (workdir / f"{tag}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{tag} did not start: {err}\n{tail}") from err
    found = port()
    assert found is not None
    return proc, found, time.perf_counter() - spawned


def guard_config(workdir: Path) -> Path:
    """The demo rules for both canned models (examples/guard.yaml's, by size)."""
    labels = workdir / "labels.txt"
    labels.write_text("".join(f"class_{i}\n" for i in range(SOFTMAX.classes)))
    config = workdir / "guard-rest.yaml"
    config.write_text(f"""\
# Generated by bench.rest: the demo rules for the canned REST models.
health_check_interval_s: 60   # no gRPC upstream here: keep its probe out of the figures
models:
  - name: {TINY.name}
    outputs:
      - name: {TINY.output}
        valid_range: [0.0, 1.0]
        on_violation: observe
        threshold: 0.5
        labels: [negative, positive]
  - name: {SOFTMAX.name}
    outputs:
      - name: {SOFTMAX.output}
        valid_range: [0.0, 1.0]
        check_sum: true
        on_violation: observe
        argmax: true
        top_k: 5
        labels_file: {labels.name}
""")
    return config


def start_path(name: str, upstream: int, workdir: Path, tag: str) -> RestHop:
    """Start one path in front of the upstream on port ``upstream``."""
    address = f"127.0.0.1:{upstream}"
    if name == "direct":
        return RestHop(name, upstream)
    if name == "nginx":
        return _start_nginx(address, workdir / f"nginx-{tag}")
    if name == "passthrough":
        argv = ["bench.rest_passthrough", "--upstream", address, "--listen", "127.0.0.1:0"]
        proc, port, startup = _spawn(argv, workdir, f"passthrough-{tag}", "http")
        return RestHop(name, port, proc, startup)
    if name == "guard":
        proc, port, startup = _spawn(_guard_argv(workdir, address), workdir, f"guard-{tag}", "rest")
        return RestHop(name, port, proc, startup)
    raise ValueError(f"unknown REST path {name!r}; choose from {PATH_NAMES}")


def _guard_argv(workdir: Path, rest_upstream: str | None) -> list[str]:
    argv = [
        "guard", "serve", "--config", str(guard_config(workdir)),
        "--upstream", "127.0.0.1:9",  # REST only: no gRPC upstream in this section
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
    ]  # fmt: skip
    if rest_upstream is not None:
        argv += ["--rest-upstream", rest_upstream, "--rest-listen", "127.0.0.1:0"]
    return argv


def _start_nginx(upstream: str, workdir: Path) -> RestHop:
    port = free_port()
    conf = nginx.write_config(workdir, upstream, port, protocol="http")
    nginx.check_config(conf)
    with (workdir / "stdout.log").open("wb") as out:
        proc = subprocess.Popen(nginx.command(conf), stdout=out, stderr=subprocess.STDOUT)
    try:
        startup = wait_http(lambda: port, proc)
    except (RuntimeError, TimeoutError) as err:
        proc.kill()
        proc.wait()
        errors = (workdir / "error.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"nginx did not start: {err}\n{errors}") from err
    return RestHop("nginx", port, proc, startup)


# --- load -----------------------------------------------------------------------------------


def _post(conn: http.client.HTTPConnection, model: RestModel, body: bytes) -> bytes:
    conn.request(
        "POST", f"/v1/models/{model.name}:predict", body, {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    return data


def samples_c1(port: int, model: RestModel, calls: int, warmup: int) -> list[float]:
    """The times, in ms, of ``calls`` sequential predicts on one keep-alive
    connection, after ``warmup``."""
    body = request_body(model)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(warmup):
            _post(conn, model, body)
        samples = []
        for _ in range(calls):
            start = time.perf_counter_ns()
            _post(conn, model, body)
            samples.append((time.perf_counter_ns() - start) / 1e6)
    finally:
        conn.close()
    return samples


def h2load_run(
    port: int, model: RestModel, requests: int, workdir: Path
) -> tuple[load.Throughput, list[float]]:
    """One ``h2load --h1`` run: its summary and the per-request times (ms)."""
    data = workdir / f"{model.name}.request.json"
    data.write_bytes(request_body(model))
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)
    cmd = [
        load.find_h2load(), "--h1",
        "-n", str(requests), "-c", str(CONCURRENCY), "-m", "1", "-t", "1",
        "-H", "content-type: application/json", "-d", str(data), "--log-file", str(log),
        f"http://127.0.0.1:{port}/v1/models/{model.name}:predict",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    try:
        summary = load.parse_h2load(proc.stdout, CONCURRENCY)
    except ValueError:
        raise RuntimeError(f"h2load failed: {proc.stderr.strip()[-500:]}") from None
    return summary, load.h2load_log_ms(log)


def guarded_check(port: int) -> dict[str, str]:
    """The guard's action on each size (the guard must really be guarding)."""
    out = {}
    for model in MODELS:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", f"/v1/models/{model.name}:predict", request_body(model))
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            action = resp.getheader("x-guard-action") or "none"
            out[model.size] = action if "guard_outputs" in doc else f"{action} (no guard_outputs)"
        finally:
            conn.close()
    return out


@dataclass
class _Tally:
    """One path's figures for one response size, summed over its slices."""

    c1_ms: list[float] = field(default_factory=list)
    c1_calls: int = 0
    c1_cpu_s: float = 0.0
    c16_ms: list[float] = field(default_factory=list)
    c16_succeeded: int = 0
    c16_errors: int = 0
    c16_seconds: float = 0.0
    c16_cpu_s: float = 0.0

    def figures(self, has_process: bool) -> dict[str, Any]:
        c1: dict[str, Any] = load.percentiles(self.c1_ms)
        c16: dict[str, Any] = {
            "rps": self.c16_succeeded / self.c16_seconds if self.c16_seconds else 0.0,
            "errors": self.c16_errors,
            "succeeded": self.c16_succeeded,
            **(load.percentiles(self.c16_ms) if self.c16_ms else {}),
        }
        if has_process:
            c1["cpu_ms_per_req"] = 1000.0 * self.c1_cpu_s / self.c1_calls
            if self.c16_succeeded:
                c16["cpu_ms_per_req"] = 1000.0 * self.c16_cpu_s / self.c16_succeeded
        return {"c1": c1, "c16": c16}


def _cpu(hop: RestHop) -> float:
    return load.cpu_seconds(hop.pid) if hop.pid else 0.0


def measure_slice(
    hop: RestHop, model: RestModel, settings: RestSettings, workdir: Path, tally: _Tally
) -> None:
    """One slice of one size's load through one hop: c=1 calls, then c=16 requests."""
    calls = max(1, settings.calls(model, settings.latency_calls) // settings.slices)
    warmup = max(1, settings.calls(model, settings.warmup_calls) // settings.slices)
    cpu0 = _cpu(hop)
    tally.c1_ms += samples_c1(hop.port, model, calls, warmup)
    tally.c1_cpu_s += _cpu(hop) - cpu0
    tally.c1_calls += calls + warmup
    # h2load wants at least one request per connection.
    requests = max(CONCURRENCY, settings.calls(model, settings.h2load_requests) // settings.slices)
    cpu0 = _cpu(hop)
    summary, times = h2load_run(hop.port, model, requests, workdir)
    tally.c16_cpu_s += _cpu(hop) - cpu0
    tally.c16_ms += times
    tally.c16_succeeded += summary.succeeded
    tally.c16_errors += summary.errors
    tally.c16_seconds += summary.seconds


def measure_sizes(
    hops: list[RestHop], settings: RestSettings, workdir: Path
) -> dict[str, dict[str, Any]]:
    """Every size through every hop, the hops taking turns slice by slice; a
    size that fails on a hop is reported for that hop."""
    out: dict[str, dict[str, Any]] = {hop.name: {} for hop in hops}
    if not hops:
        return out
    for model in MODELS:
        tallies = {hop.name: _Tally() for hop in hops}
        failed: dict[str, str] = {}
        for turn in range(settings.slices):
            for hop in hops[turn % len(hops) :] + hops[: turn % len(hops)]:
                if hop.name in failed:
                    continue
                try:
                    measure_slice(hop, model, settings, workdir, tallies[hop.name])
                except (OSError, RuntimeError, ValueError) as err:
                    logger.warning("REST path %s, %s failed: %s", hop.name, model.size, err)
                    failed[hop.name] = str(err).splitlines()[0]
        for hop in hops:
            found = failed.get(hop.name)
            out[hop.name][model.size] = (
                {"error": found} if found else tallies[hop.name].figures(hop.pid is not None)
            )
    return out


def idle_figures(hop: RestHop) -> dict[str, Any]:
    """What a hop shows before any load: its start-up time, idle RSS, and for
    the guard, that it guards."""
    out: dict[str, Any] = {"startup_s": hop.startup_s}
    if hop.pid:
        time.sleep(0.3)
        out["rss_idle_mb"] = load.rss_mb(hop.pid)
    if hop.name == "guard":
        out["guard_action"] = guarded_check(hop.port)
    return out


def idle_rss_without_rest(workdir: Path, tag: str) -> float:
    """Idle RSS of the same guard with REST off (gRPC only), for the REST on/off delta."""
    port_file = workdir / f"grpc-only-{tag}.ports.json"
    cmd = [sys.executable, "-m", *_guard_argv(workdir, None), "--port-file", str(port_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        start = time.perf_counter()
        while read_port_file(port_file) is None:
            if proc.poll() is not None or time.perf_counter() - start > 30:
                raise RuntimeError("the gRPC-only guard did not start")
            time.sleep(0.02)
        time.sleep(0.3)
        return load.rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


# --- rounds, summary, report ----------------------------------------------------------------


def run_rounds(
    names: list[str], upstream: int, workdir: Path, settings: RestSettings
) -> list[dict[str, Any]]:
    """Start the paths in an order that rotates per round, measure them
    together (:func:`measure_sizes`); a failing path is reported."""
    rounds: list[dict[str, Any]] = []
    for r in range(settings.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        logger.info("REST round %d/%d: %s", r + 1, settings.rounds, ", ".join(order))
        figures: dict[str, Any] = {}
        hops: list[RestHop] = []
        try:
            for name in order:
                hop = _start(name, upstream, workdir, f"r{r}", figures)
                if hop is not None:
                    hops.append(hop)
                    figures[name] = idle_figures(hop)
            for name, sizes in measure_sizes(hops, settings, workdir).items():
                figures[name].update(sizes)
        finally:
            for hop in hops:
                hop.stop()
        if "guard" in names:
            try:
                figures["guard-grpc-only"] = {
                    "rss_idle_mb": idle_rss_without_rest(workdir, f"r{r}")
                }
            except RuntimeError as err:
                figures["guard-grpc-only"] = {"error": str(err)}
        rounds.append(figures)
    return rounds


def _start(
    name: str, upstream: int, workdir: Path, tag: str, figures: dict[str, Any]
) -> RestHop | None:
    """The started path, or ``None`` with its error in ``figures``."""
    try:
        return start_path(name, upstream, workdir, tag)
    except Exception as err:  # noqa: BLE001 - a path that cannot start is reported
        logger.warning("REST path %s failed to start: %s", name, err)
        figures[name] = {"error": str(err).splitlines()[0]}
        return None


def _errors(rounds: list[dict[str, Any]], name: str) -> list[str]:
    """What failed on ``name``: the whole path, or one response size."""
    found = [r[name]["error"] for r in rounds if "error" in r[name]]
    for model in MODELS:
        found += [
            f"{model.size}: {r[name][model.size]['error']}"
            for r in rounds
            if "error" in r[name].get(model.size, {})
        ]
    return found


def _get(fig: Any, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if not isinstance(fig, dict) or key not in fig:
            return None
        fig = fig[key]
    return float(fig) if isinstance(fig, int | float) else None


def _median(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.median(found)) if found else None


FIGURES = {
    f"{level}_{q}": (level, f"{q}_ms") for level in ("c1", "c16") for q in ("p50", "p99")
} | {
    "cpu_ms_per_req_c1": ("c1", "cpu_ms_per_req"),
    "cpu_ms_per_req_c16": ("c16", "cpu_ms_per_req"),
    "rps_c16": ("c16", "rps"),
    "errors_c16": ("c16", "errors"),
}


def summarise(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per path and size: medians across rounds; added latency paired with ``direct``."""
    summary: dict[str, Any] = {}
    for name in names:
        per: dict[str, Any] = {"errors": _errors(rounds, name)}
        for model in MODELS:
            figs = {
                key: _median([_get(r[name], (model.size, *keys)) for r in rounds])
                for key, keys in FIGURES.items()
            }
            for key in ("c1_p50", "c1_p99", "c16_p50", "c16_p99"):
                keys = (model.size, *FIGURES[key])
                pairs = [(_get(r[name], keys), _get(r.get("direct"), keys)) for r in rounds]
                figs[f"added_{key}"] = _median(
                    [a - b for a, b in pairs if a is not None and b is not None]
                )
            per[model.size] = figs
        per["rss_idle_mb"] = _median([_get(r[name], ("rss_idle_mb",)) for r in rounds])
        summary[name] = per
    return summary


def ratios(rounds: list[dict[str, Any]]) -> dict[str, float | None]:
    """The targets' figures: guard CPU over the passthrough's, idle RSS REST on - off."""
    out: dict[str, float | None] = {}
    for model in MODELS:
        for level in ("c1", "c16"):
            keys = (model.size, level, "cpu_ms_per_req")
            for other in ("passthrough", "nginx"):
                vals = [(_get(r.get("guard"), keys), _get(r.get(other), keys)) for r in rounds]
                out[f"guard_vs_{other}_cpu_{level}_{model.size}"] = _median(
                    [a / b for a, b in vals if a is not None and b]
                )
    deltas = [
        (_get(r.get("guard"), ("rss_idle_mb",)), _get(r.get("guard-grpc-only"), ("rss_idle_mb",)))
        for r in rounds
    ]
    out["guard_rest_idle_rss_delta_mb"] = _median(
        [a - b for a, b in deltas if a is not None and b is not None]
    )
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(rest: dict[str, Any]) -> str:
    """The markdown section for docs/benchmarks.md."""
    out = ["## REST\n", rest["description"], ""]
    command = rest.get("command", "python -m bench.rest")
    out += [f"Command: `{command}`; settings: `{json.dumps(rest['settings'])}`.", ""]
    header = (
        "| path | size | c1 p50 ms | c1 p99 ms | added c1 p50/p99 ms | c16 p50 ms | c16 p99 ms "
        "| added c16 p50/p99 ms | CPU ms/req c1 | CPU ms/req c16 | req/s c16 | errors c16 |"
    )
    out += [header, "|" + "---|" * 12]
    for name, per in rest["summary"].items():
        for model in MODELS:
            f = per[model.size]
            out.append(
                f"| {name} | {model.size} | {_fmt(f['c1_p50'])} | {_fmt(f['c1_p99'])} "
                f"| {_fmt(f['added_c1_p50'])} / {_fmt(f['added_c1_p99'])} "
                f"| {_fmt(f['c16_p50'])} | {_fmt(f['c16_p99'])} "
                f"| {_fmt(f['added_c16_p50'])} / {_fmt(f['added_c16_p99'])} "
                f"| {_fmt(f['cpu_ms_per_req_c1'], 3)} | {_fmt(f['cpu_ms_per_req_c16'], 3)} "
                f"| {_fmt(f['rps_c16'], 0)} | {_fmt(f['errors_c16'], 0)} |"
            )
    out += ["", "| ratio | median of rounds |", "|---|---|"]
    out += [f"| {key} | {_fmt(value)} |" for key, value in rest["ratios"].items()]
    errors = {n: p["errors"] for n, p in rest["summary"].items() if p["errors"]}
    if errors:
        out += ["", f"Errors: `{json.dumps(errors)}`"]
    return "\n".join(out) + "\n"


DESCRIPTION = (
    "TF Serving's REST API through each hop, in front of a canned aiohttp REST upstream "
    "(`bench/rest_upstream.py`) answering row-format predicts of 1 x 1 and 1024 x 201 "
    "float32 values (about 3 MB of JSON), with the demo rules on the guard. Paths start "
    "fresh per round in a rotating order, are up together and take their load in turns, "
    "five slices per size. c1: one keep-alive connection, one call at a "
    "time (Python `http.client`); c16: `h2load --h1`, 16 connections. Added latency is "
    "paired per round against `direct`; CPU is the hop process's, from /proc. Targets: "
    "guard CPU per request <= 1.3x the passthrough's; idle RSS with REST on <= 10 MB "
    "over REST off (`guard_rest_idle_rss_delta_mb`). The guard step against one "
    "`json.loads` of the same body is `python -m bench.restjson`."
)


def run(settings: RestSettings, names: list[str] | None = None) -> dict[str, Any]:
    """Start the canned upstream, run the rounds, return the figures."""
    chosen = list(names or PATH_NAMES)
    with tempfile.TemporaryDirectory(prefix="guard-bench-rest-") as tmp:
        workdir = Path(tmp)
        argv = ["bench.rest_upstream", "--listen", "127.0.0.1:0"]
        upstream, port, _ = _spawn(argv, workdir, "rest-upstream", "http")
        try:
            rounds = run_rounds(chosen, port, workdir, settings)
        finally:
            upstream.terminate()
            upstream.wait(10)
    return {
        "description": DESCRIPTION,
        "settings": asdict(settings),
        "paths": chosen,
        "rounds": rounds,
        "summary": summarise(rounds, chosen),
        "ratios": ratios(rounds),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__)
    d = RestSettings()
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--latency-calls", type=int, default=d.latency_calls)
    p.add_argument("--h2load-requests", type=int, default=d.h2load_requests)
    p.add_argument("--paths", default=",".join(PATH_NAMES), help=f"from {', '.join(PATH_NAMES)}")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test")
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/<date>-rest.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the REST section alone."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    settings = (
        RestSettings.quick()
        if args.quick
        else RestSettings(
            rounds=args.rounds,
            latency_calls=args.latency_calls,
            h2load_requests=args.h2load_requests,
        )
    )
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PATH_NAMES))
    if unknown:
        print(f"unknown path(s) {unknown}; choose from {PATH_NAMES}", file=sys.stderr)
        return 2
    now = dt.datetime.now(dt.UTC)
    results = run(settings, names)
    results["command"] = " ".join(
        ["python -m bench.rest", *(argv if argv is not None else sys.argv[1:])]
    )
    results["date"] = now.isoformat(timespec="seconds")
    results["machine"] = machine.describe()
    out = args.out or RESULTS_DIR / f"{now.strftime('%Y-%m-%dT%H%M%SZ')}-rest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    logger.info("wrote %s", out)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
