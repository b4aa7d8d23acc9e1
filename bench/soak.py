"""Soak: steady traffic with violations through a real ``guard serve`` process.

An in-process canned upstream answers three models: ``wide_deep`` leaks
sigmoid "probabilities" above 1 (the guard clamps and thresholds them),
``softmax`` returns clean rows (argmax + labels), and ``reject_me`` returns a
NaN under a reject rule (an expected INTERNAL). The client runs at a steady
rate and counts every outcome; every 10 s the guard's lowest RSS of those
10 s is printed (sampled each second). At the end the guard's own counters
must equal the client's count, call by call.

    python -m bench.soak --duration 300          # make soak DURATION=300

Hostile traffic runs in the background the whole time (bench/hostile.py:
malformed HTTP/2, stuck streams, gzip bombs, rapid reset, oversized
metadata; ``--no-hostile`` turns it off): the legitimate calls must not
notice it.

Exit status 1 when RSS grew by 10 % (``--max-rss-growth``) or more after
warm-up, when any unexpected error happened, when a call was cancelled
unexplained, or when the counters disagree with the client. RSS settles
slowly under hostile traffic: glibc's heap fragments under rapid-reset
bursts, +10 MB over 300 of them, two thirds of it in the first 150
(docs/reliability.md). The default warm-up is therefore half the duration
(at most 150 s) with hostile traffic, a third (at most 60 s) without.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import payloads
from bench.hostile import ATTACKS, Hostile

PREDICT = "/tensorflow.serving.PredictionService/Predict"
STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
REPO = Path(__file__).resolve().parents[1]
_CANCEL_WINDOW_S = 1.0

# Per model: the output it returns; how many values exceed 1.0 in it.
WIDE_DEEP = np.array([[1.00285], [0.000463], [1.001444], [0.7], [0.2], [1.000986]], np.float32)
SOFTMAX = payloads.softmax_rows(4, 10, seed=7)
REJECT = np.array([[0.4], [np.nan]], np.float32)
LABELS = [f"class_{i}" for i in range(10)]
CONFIG = """\
upstream: "{upstream}"
models:
  - name: wide_deep
    outputs:
      - {{name: output_1, on_violation: clamp, threshold: 0.5, labels: [NO, YES]}}
  - name: softmax
    outputs:
      - {{name: probabilities, check_sum: true, argmax: true, labels: {labels}}}
  - name: reject_me
    outputs:
      - {{name: score, on_violation: reject}}
"""
# What a client may legitimately see, per model: status code -> guard action.
EXPECTED = {
    "wide_deep": {"OK": "clamped"},
    "softmax": {"OK": "clean"},
    "reject_me": {"INTERNAL": "rejected"},
}


def _response(name: str, output: str, values: np.ndarray[Any, Any]) -> bytes:
    pb = payloads.official_protos()
    resp = pb.predict_pb2.PredictResponse()
    resp.model_spec.name = name
    resp.model_spec.version.value = 1
    resp.model_spec.signature_name = "serving_default"
    resp.outputs[output].CopyFrom(payloads.float_tensor(pb, values, "float_val"))
    return bytes(resp.SerializeToString())


def _request(name: str) -> bytes:
    pb = payloads.official_protos()
    req = pb.predict_pb2.PredictRequest()
    req.model_spec.name = name
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    req.inputs["x"].CopyFrom(payloads.float_tensor(pb, x, "float_val"))
    return bytes(req.SerializeToString())


ANSWERS = {
    "wide_deep": ("output_1", WIDE_DEEP),
    "softmax": ("probabilities", SOFTMAX),
    "reject_me": ("score", REJECT),
}


async def start_upstream() -> tuple[grpc.aio.Server, str]:
    """The canned upstream, on a free loopback port."""
    answers = {name: _response(name, out, v) for name, (out, v) in ANSWERS.items()}
    by_request = {_request(name): body for name, body in answers.items()}

    async def predict(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return by_request[request]

    async def status(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    handlers = {
        PREDICT: grpc.unary_unary_rpc_method_handler(predict),
        STATUS: grpc.unary_unary_rpc_method_handler(status),
    }

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return handlers.get(details.method)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@contextlib.contextmanager
def guard_process(upstream: str, workdir: Path) -> Iterator[tuple[Any, dict[str, int], Path]]:
    """Run ``guard serve`` on ephemeral loopback ports; yields (Popen, ports, log)."""
    import subprocess

    cfg = workdir / "guard.yaml"
    cfg.write_text(CONFIG.format(upstream=upstream, labels=json.dumps(LABELS)))
    port_file, log_path = workdir / "ports.json", workdir / "guard.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "guard", "serve", "--config", str(cfg),
             "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             "--port-file", str(port_file)],
            stdout=log, stderr=log, cwd=REPO,
        )  # fmt: skip
    try:
        for _ in range(600):  # bounded: 60 s
            if port_file.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        if not port_file.exists():
            raise RuntimeError(f"guard serve did not start: {log_path.read_text()[-2000:]}")
        yield proc, json.loads(port_file.read_text()), log_path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (0 once it has exited)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Tally:
    """What the client saw."""

    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    cancelled: list[float] = field(default_factory=list)
    """When each call ended CANCELLED: lost before the guard saw it (not in ``calls``)."""

    def total(self) -> int:
        return sum(self.calls.values())

    def record(self, model: str, code: str, details: str) -> None:
        if code == "CANCELLED":  # a server stopping by itself (bench/hostile.py)
            self.cancelled.append(time.monotonic())
            return
        self.calls[(model, code)] += 1
        if code not in EXPECTED[model]:
            self.unexpected.append(f"{model}: {code} {details}")
        elif code == "INTERNAL" and not details.startswith("guard: model 'reject_me'"):
            self.unexpected.append(f"{model}: INTERNAL {details}")


async def traffic(address: str, duration_s: float, rate: float, tally: Tally,
                  on_tick: Any, concurrency: int = 8) -> None:  # fmt: skip
    """Send Predicts round-robin over the models at ``rate`` per second."""
    models = list(ANSWERS)
    requests = {m: _request(m) for m in models}
    interval = concurrency / rate
    stop_at = time.monotonic() + duration_s
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(PREDICT)

        async def worker(k: int) -> None:
            i = k
            next_at = time.monotonic()
            while time.monotonic() < stop_at:
                model = models[i % len(models)]
                i += 1
                try:
                    await call(requests[model], timeout=10)
                    code, details = "OK", ""
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code().name, exc.details() or ""
                tally.record(model, code, details)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        workers = [asyncio.create_task(worker(k)) for k in range(concurrency)]
        while not all(w.done() for w in workers):
            await asyncio.sleep(1.0)
            on_tick()
        await asyncio.gather(*workers)


def unexplained_cancels(cancelled: list[float], path_times: list[float]) -> list[float]:
    """The CANCELLED calls that did not end within a second of a non-UTF-8
    method name (the one attack known to cost calls: bench/hostile.py)."""
    return [t for t in cancelled if not any(0 <= t - p <= _CANCEL_WINDOW_S for p in path_times)]


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` for every sample at ``url``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback only
        text = r.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples]  # fmt: skip


def reconcile(samples: list[tuple[str, dict[str, str], float]], tally: Tally) -> list[str]:
    """Compare the guard's counters with the client's count; the mismatches."""
    problems = []

    def total(name: str, **labels: str) -> float:
        return sum(v for n, lab, v in samples
                   if n == name and all(lab.get(k) == x for k, x in labels.items()))  # fmt: skip

    # Hostile traffic is counted too, under model __other__: the soak's own
    # models must hold exactly what the client sent.
    guard_all = sum(total("guard_requests_total", model=m) for m in EXPECTED)
    if guard_all != tally.total():
        problems.append(f"guard_requests_total={guard_all:.0f}, client sent {tally.total()}")
    for (model, code), n in sorted(tally.calls.items()):
        seen = total("guard_requests_total", model=model, method="Predict", code=code)
        if seen != n:
            problems.append(f"guard_requests_total{{{model},{code}}}={seen:.0f}, client {n}")
        action = EXPECTED[model].get(code)
        if action is not None:
            got = total("guard_responses_total", model=model, action=action)
            if got != n:
                problems.append(f"guard_responses_total{{{model},{action}}}={got:.0f}, client {n}")
    wide = tally.calls[("wide_deep", "OK")]
    checks = {
        ("guard_output_values_total", "wide_deep", ""): wide * WIDE_DEEP.size,
        ("guard_output_violations_total", "wide_deep", "above_max"): wide
        * int((WIDE_DEEP > 1).sum()),
        ("guard_output_violations_total", "reject_me", "nan"): tally.calls[
            ("reject_me", "INTERNAL")
        ],
        ("guard_predicted_class_total", "softmax", ""): tally.calls[("softmax", "OK")]
        * SOFTMAX.shape[0],
    }
    for (name, model, kind), expected in checks.items():
        labels = {"model": model} | ({"kind": kind} if kind else {})
        got = total(name, **labels)
        if got != expected:
            problems.append(f"{name}{labels}={got:.0f}, expected {expected} from the client count")
    return problems


async def soak(
    duration_s: float,
    rate: float,
    warmup_s: float,
    hostile: Collection[str] | None = (),
    max_growth_pct: float = 10.0,
) -> dict[str, Any]:
    """Run the soak; returns the figures and the verdict."""
    server, upstream = await start_upstream()
    try:
        with tempfile.TemporaryDirectory(prefix="guard-soak-") as tmp:
            with guard_process(upstream, Path(tmp)) as (proc, ports, log_path):
                tally = Tally()
                t0 = time.monotonic()
                # Each point is the lowest RSS of the 10 s before it, sampled every
                # second: what the guard holds, not a bomb's passing transient.
                rss: list[tuple[float, float]] = [(0.0, rss_mb(proc.pid))]
                window: list[float] = []
                last = [t0]
                print(f"soak: {duration_s:.0f} s at {rate:.0f} calls/s, guard pid {proc.pid}, "
                      f"warm-up {warmup_s:.0f} s", flush=True)  # fmt: skip
                print(f"{'t_s':>6} {'rss_mb':>8} {'calls':>8} {'errors':>7} {'unexpected':>10}")

                def tick() -> None:
                    now = time.monotonic()
                    window.append(rss_mb(proc.pid))
                    if now - last[0] < 10.0:
                        return
                    last[0] = now
                    sample = (now - t0, min(window))
                    window.clear()
                    rss.append(sample)
                    errors = sum(n for (_, c), n in tally.calls.items() if c != "OK")
                    print(f"{sample[0]:6.0f} {sample[1]:8.1f} {tally.total():8d} {errors:7d} "
                          f"{len(tally.unexpected):10d}", flush=True)  # fmt: skip

                attacker = (
                    contextlib.nullcontext() if hostile is None else Hostile(ports["grpc"], hostile)
                )
                with attacker:
                    await traffic(f"127.0.0.1:{ports['grpc']}", duration_s, rate, tally, tick)
                elapsed = time.monotonic() - t0
                rss.append((elapsed, min([*window, rss_mb(proc.pid)])))
                await asyncio.sleep(0.2)  # the last counters settle before the scrape
                alive = proc.poll() is None
                samples = scrape(f"http://127.0.0.1:{ports['metrics']}/metrics") if alive else []
                log_tail = log_path.read_text(errors="replace")[-6000:]
    finally:
        await server.stop(0)

    after = [m for t, m in rss if t >= warmup_s] or [rss[-1][1]]
    baseline, final = after[0], rss[-1][1]
    growth = (final - baseline) / baseline if baseline else 0.0
    problems = reconcile(samples, tally)
    path_times = attacker.path_times if isinstance(attacker, Hostile) else []
    unexplained = unexplained_cancels(tally.cancelled, path_times)
    verdict = {
        "duration_s": round(elapsed, 1),
        "calls": tally.total(),
        "calls_per_s": round(tally.total() / elapsed, 1),
        "by_model_code": {f"{m}/{c}": n for (m, c), n in sorted(tally.calls.items())},
        "rss_mb": " ".join(f"{t:.0f}s={m:.1f}" for t, m in rss),
        "rss_baseline_mb": round(baseline, 1),
        "rss_final_mb": round(final, 1),
        "rss_growth_after_warmup_pct": round(100 * growth, 2),
        "unexpected_errors": tally.unexpected[:20],
        "unexpected_error_count": len(tally.unexpected),
        "counter_mismatches": problems,
        "guard_alive": alive,
        "hostile_rounds": dict(attacker.rounds) if isinstance(attacker, Hostile) else {},
        "hostile_errors": dict(attacker.errors) if isinstance(attacker, Hostile) else {},
        "server_restarts": sum(v for n, _, v in samples if n == "guard_server_restarts_total"),
        "cancelled_by_a_server_stopping": len(tally.cancelled) - len(unexplained),
        "cancelled_unexplained": len(unexplained),
    }
    verdict["ok"] = bool(
        100 * growth < max_growth_pct and not tally.unexpected and not problems and not unexplained
        and alive and tally.total() > 0
    )  # fmt: skip
    if not alive:
        verdict["guard_exit_code"] = proc.returncode
        verdict["guard_log_tail"] = log_tail
    return verdict


def default_warmup(args: argparse.Namespace) -> float:
    """Seconds before the RSS baseline (see the module's docstring)."""
    if args.no_hostile:
        return min(60.0, args.duration / 3)
    return min(150.0, args.duration / 2)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.soak``."""
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    p.add_argument("--rate", type=float, default=200.0, help="calls per second")
    p.add_argument("--warmup", type=float, help="seconds before the RSS baseline "
                   "(default: half the duration, at most 150; without hostile "
                   "traffic a third, at most 60)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument(
        "--max-rss-growth",
        type=float,
        default=10.0,
        metavar="PCT",
        help="fail when RSS grew by this many percent after warm-up (default 10)",
    )
    hostile = p.add_mutually_exclusive_group()
    hostile.add_argument(
        "--no-hostile",
        action="store_true",
        help="without the hostile background traffic (bench/hostile.py)",
    )
    hostile.add_argument(
        "--hostile-only",
        nargs="+",
        choices=sorted(ATTACKS),
        default=(),
        metavar="ATTACK",
        help="only these attacks: " + ", ".join(ATTACKS),
    )
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else default_warmup(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    verdict = asyncio.run(
        soak(
            args.duration,
            args.rate,
            warmup,
            None if args.no_hostile else args.hostile_only,
            args.max_rss_growth,
        )
    )
    print(json.dumps(verdict, indent=2))
    if args.json:
        args.json.write_text(json.dumps(verdict, indent=2))
    print("soak: PASS" if verdict["ok"] else "soak: FAIL", flush=True)
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
