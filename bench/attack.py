"""Attack bench: the attacks of tests/attacks, parametrised and longer, each
against a fresh ``guard serve`` (port 0) in front of the raw-bytes upstream of
tests/attacks/upstream.py. Every scenario is bounded in count and time.

    python -m bench.attack                        # every scenario, default sizes
    python -m bench.attack --only reset bomb      # some of them
    python -m bench.attack --quick                # the smallest size of each
    python -m bench.attack --json out.json        # also write the rows as JSON

Scenarios (rows of the attack list):

- ``path``: non-UTF-8 ``:path``, repeated; time until a legitimate call is OK again;
- ``stuck``: streams that never send their message, per connection x connections;
- ``scan``: model_spec behind N MiB of unknown fields (or zeros), gzip'd;
- ``bomb``: gzip bombs of 300 MiB, 1 / 4 / 8 at once; RSS peak, end, 10 s later;
- ``reset``: HEADERS + RST_STREAM pairs for 3 s and 10 s;
- ``churn``: 300 rapid-reset bursts of 20,000 pairs, each on a new connection; RSS every 25;
- ``metadata``: 12 KiB .. 1 MiB headers and 10,000 headers, before/after the SETTINGS ACK;
- ``fill``: an upstream response declaring N values with one float_val;
- ``streaming``: client/server/bidi streaming, zero messages, error + initial metadata;
- ``arrivals``: 16 and 64 gRPC requests of 31 MB sent at once; peak, refusals, RSS after;
- ``floods``: the 2019 HTTP/2 frame floods for 5 s each, PRIORITY with and without
  ``max_memory_mb``.

Numbers: guard RSS / peak RSS (VmRSS / VmHWM), guard CPU (utime + stime), and a
legitimate Predict on another connection (every 20-50 ms): its worst latency is
the event loop's stall, its failures are the collateral. Extra guard config can
be prepended with ``--config-prefix 'max_message_mb: 64\\n'``; the environment is
passed to the guard, so allocator or grpc settings can be tried from the outside.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from tests.attacks import _harness as H
from tests.attacks import attacks, h2raw, protos

Row = dict[str, Any]
MB = 1024  # kB
# The guard's trimmer looks every 2 s and trims at the first look past its
# threshold: read 2.5 s after 16 arrivals of 31 MB, RSS was still the
# peak's in some runs (322 MB, and 91 MB a second later).
_TRIM_WAIT_S = 5.0


def _codes(results: list[H.CallResult]) -> dict[str, int]:
    return dict(Counter(r.code for r in results))


class Bench:
    def __init__(self, tmp: Path, prefix: str, quick: bool) -> None:
        self.tmp = tmp
        self.prefix = prefix
        self.quick = quick
        self.rows: list[Row] = []

    def stack(self, rules: str = H.BASE_RULES) -> Any:
        return H.guarded(self.tmp, self.prefix + rules)

    def emit(self, row: Row) -> None:
        self.rows.append(row)
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    def sizes(self, full: list[Any]) -> list[Any]:
        return full[:1] if self.quick else full

    # ------------------------------------------------------------ scenarios

    def path(self) -> None:
        for repeats in self.sizes([1, 20]):
            with self.stack() as (_up, guard):
                recover: list[float | None] = []
                exited = None
                for _ in range(repeats):
                    attacks.non_utf8_path(guard.port)
                    t0 = time.monotonic()
                    result = H.answering_within(guard, 5.0)
                    if result is None:
                        guard.popen.wait(5)
                        exited = guard.popen.returncode
                        break
                    ok = result.code == "OK"
                    recover.append(time.monotonic() - t0 if ok else None)
                    if not ok:
                        break  # not answering after 5 s: repeating tells nothing more
                self.emit({"scenario": "path", "repeats": repeats, "exit_code": exited,
                           "recovered": sum(r is not None for r in recover),
                           "worst_recovery_s": round(max((r for r in recover if r is not None),
                                                         default=0), 3)})  # fmt: skip

    def stuck(self) -> None:
        grid = [
            (1100, 1, "headers"),
            (1100, 1, "prefix"),
            (100, 12, "headers"),
            (2000, 1, "headers"),
        ]
        for per_conn, conns, mode in self.sizes(grid):
            with self.stack() as (_up, guard):
                rss0, cpu0 = guard.rss_kb(), guard.cpu_s()
                clients = [attacks.stuck_streams(guard.port, per_conn, mode) for _ in range(conns)]
                try:
                    for c in clients:
                        c.drain(0.3)
                    results = [H.legit_ok(guard.address, timeout=3) for _ in range(10)]
                    refused = sum(
                        s.reset is not None or s.grpc_status is not None
                        for c in clients
                        for s in c.streams.values()
                    )
                    inflight = H.sample(guard.metrics(), "guard_inflight_requests")
                finally:
                    for c in clients:
                        c.close()
                self.emit({"scenario": "stuck", "mode": mode, "streams": f"{conns}x{per_conn}",
                           "ended_by_server": refused, "legit": _codes(results),
                           "inflight_gauge": inflight, "rss_mb": (guard.rss_kb() - rss0) // MB,
                           "cpu_s": round(guard.cpu_s() - cpu0, 2)})  # fmt: skip

    def scan(self) -> None:
        for mib, kind in self.sizes([(1, "varint"), (4, "varint"), (16, "varint"), (16, "zeros")]):
            body = attacks.hidden_spec_request(mib, kind)
            with self.stack() as (_up, guard):
                with H.Prober(guard.address, 0.02, timeout_s=120, max_s=150) as prober:
                    time.sleep(0.2)
                    cpu0 = guard.cpu_s()
                    state = attacks.send_compressed(guard.port, body, timeout=120)
                    time.sleep(0.2)
                self.emit({"scenario": "scan", "kind": kind, "mib": mib,
                           "gzip_kib": len(body) // 1024, "status": state.grpc_status,
                           "stall_s": round(prober.max_latency_s, 3),
                           "legit": _codes(prober.results),
                           "cpu_s": round(guard.cpu_s() - cpu0, 2)})  # fmt: skip

    def bomb(self) -> None:
        for n in self.sizes([1, 4, 8]):
            with self.stack() as (_up, guard):
                time.sleep(0.5)
                rss0, cpu0 = guard.rss_kb(), guard.cpu_s()
                t0 = time.monotonic()
                codes = attacks.concurrent_bombs(guard.port, n)
                seconds = time.monotonic() - t0
                peak, end = guard.hwm_kb(), guard.rss_kb()
                time.sleep(10)
                self.emit({"scenario": "bomb", "n": n, "codes": dict(Counter(codes)),
                           "seconds": round(seconds, 2), "rss_start_mb": rss0 // MB,
                           "peak_mb": peak // MB, "end_mb": end // MB,
                           "after_10s_mb": guard.rss_kb() // MB,
                           "cpu_s": round(guard.cpu_s() - cpu0, 2),
                           "legit_after": H.legit_ok(guard.address).code})  # fmt: skip

    def reset(self) -> None:
        for seconds in self.sizes([3.0, 10.0]):
            with self.stack() as (_up, guard):
                with H.Prober(guard.address, 0.05, timeout_s=5, max_s=seconds + 30) as prober:
                    time.sleep(0.2)
                    rss0, cpu0 = guard.rss_kb(), guard.cpu_s()
                    out = attacks.rapid_reset(guard.port, 10_000_000, seconds)
                    cpu_attack = guard.cpu_s() - cpu0
                    time.sleep(2)
                self.emit({"scenario": "reset", "seconds": round(out.seconds, 2),
                           "pairs": out.pairs, "pairs_per_s": int(out.pairs / out.seconds),
                           "goaway": None if out.goaway is None else out.goaway.error_code,
                           "closed": out.closed, "server_resets": dict(out.server_resets),
                           "cpu_attack_s": round(cpu_attack, 2),
                           "cpu_total_s": round(guard.cpu_s() - cpu0, 2),
                           "legit": _codes(prober.results),
                           "worst_latency_s": round(prober.max_latency_s, 3),
                           "rss_mb": (guard.rss_kb() - rss0) // MB})  # fmt: skip

    def churn(self) -> None:
        """Rapid-reset bursts, each on a new connection: the guard's RSS every
        25 bursts (its trimmer returns what is free), to tell a leak from the
        heap settling."""
        bursts = self.sizes([100, 300])[-1]
        with self.stack() as (_up, guard):
            rss0 = guard.rss_kb()
            points = []
            for i in range(1, bursts + 1):
                attacks.rapid_reset(guard.port, 20_000, 1.0)
                if i % 25 == 0:
                    time.sleep(_TRIM_WAIT_S)
                    points.append(f"{i}:{guard.rss_kb() / 1024:.1f}")
            self.emit({"scenario": "churn", "bursts": bursts, "pairs_each": 20_000,
                       "rss_start_mb": round(rss0 / 1024, 1), "rss_mb_after": " ".join(points),
                       "answering": H.legit_ok(guard.address, timeout=3).code})  # fmt: skip

    def metadata(self) -> None:
        cases: list[tuple[str, Callable[[], list[h2raw.Header]]]] = [
            ("12KiB", lambda: attacks.one_big_header(12_000)),
            ("20KiB", lambda: attacks.one_big_header(20_000)),
            ("1MiB", attacks.one_big_header),
            ("10k-keys", attacks.many_headers),
        ]
        with self.stack() as (upstream, guard):
            for ack in (False, True):
                for name, make in self.sizes(cases):
                    before = H.upstream_stats(upstream)["calls"].get("Predict", 0)
                    state = attacks.big_metadata_call(guard.port, make(), ack_settings=ack)
                    reached = H.upstream_stats(upstream)["calls"].get("Predict", 0) - before
                    self.emit({"scenario": "metadata", "case": name, "settings_acked": ack,
                               "status": state.grpc_status, "reset": state.reset,
                               "reached_upstream": reached,
                               "message": (state.grpc_message or "")[:60]})  # fmt: skip

    def fill(self) -> None:
        rules = "models:\n  - name: '*'\n    outputs: [{name: p, threshold: 0.5, labels: [n, y]}]\n"
        for n in self.sizes([1_000_000, 8_000_000]):
            with self.stack(rules) as (_up, guard):
                with H.Prober(guard.address, 0.02, timeout_s=60, max_s=90) as prober:
                    time.sleep(0.2)
                    rss0, cpu0 = guard.rss_kb(), guard.cpu_s()
                    with H.channel(guard.address) as ch:
                        result = H.legit_call(ch, protos.predict_request(f"fill:{n}"), 60)
                    time.sleep(0.2)
                self.emit({"scenario": "fill", "values": n, "code": result.code,
                           "response_mb": round(len(result.body) / 2**20, 1),
                           "peak_growth_mb": (guard.hwm_kb() - rss0) // MB,
                           "stall_s": round(prober.max_latency_s, 3),
                           "cpu_s": round(guard.cpu_s() - cpu0, 2)})  # fmt: skip

    def streaming(self) -> None:
        svc = H.INTEROP
        with self.stack() as (upstream, guard):
            for target, label in ((upstream.address, "direct"), (guard.address, "guard")):
                with H.channel(target) as ch:
                    calls: dict[str, Callable[[], Any]] = {
                        "client_stream": lambda: json.loads(
                            ch.stream_unary(svc + "Collect")(iter([b"a", b"bb", b"c"]), timeout=3)
                        )["n"],
                        "server_stream": lambda: len(list(ch.unary_stream(svc + "Fanout")(
                            json.dumps({"n": 3}).encode(), timeout=3))),
                        "zero_messages": lambda: len(list(ch.unary_stream(svc + "Nothing")(
                            b"q", timeout=3))),
                    }  # fmt: skip
                    for name, fn in calls.items():
                        try:
                            outcome: Any = fn()
                        except grpc.RpcError as exc:
                            outcome = exc.code().name
                        self.emit({"scenario": "streaming", "via": label, "case": name,
                                   "outcome": outcome})  # fmt: skip

    def arrivals(self) -> None:
        request = attacks.large_request(31 * 2**20)
        for clients in self.sizes([16, 64]):
            with self.stack() as (_up, guard):
                before = guard.hwm_kb()
                results = H.calls_at_once(guard.address, request, clients)
                peak = guard.hwm_kb() - before
                refused = H.sample(
                    guard.metrics(), "guard_refused_requests_total", reason="inflight_bytes"
                )
                time.sleep(_TRIM_WAIT_S)
                self.emit({"scenario": "arrivals", "clients": clients, "request_mb": 31,
                           "codes": _codes(results), "refused_inflight_bytes": refused,
                           "peak_growth_mb": peak // MB, "rss_after_mb": guard.rss_kb() // MB,
                           "answering": H.legit_ok(guard.address, timeout=3).code})  # fmt: skip

    def floods(self) -> None:
        kinds = [
            ("ping", h2raw.frame(h2raw.T_PING, 0, 0, b"floodin!"), ""),
            ("settings", h2raw.frame(h2raw.T_SETTINGS, 0, 0, struct.pack(">HI", 4, 65535)), ""),
            ("empty-data", h2raw.frame(h2raw.T_DATA, 0, 1, b""), ""),
            ("window-update", h2raw.frame(h2raw.T_WINDOW, 0, 0, struct.pack(">I", 1)), ""),
            ("unknown-type", h2raw.frame(0x20, 0, 0, b"abcd"), ""),
            ("priority", _PRIORITY, ""),
            ("priority", _PRIORITY, "max_memory_mb: 256\n"),
        ]
        for kind, frame, config in self.sizes(kinds):
            with self.stack(config + H.BASE_RULES) as (_up, guard):
                rss0, cpu0 = guard.rss_kb(), guard.cpu_s()
                with H.Prober(guard.address, 0.02) as prober:
                    flood = attacks.frame_flood(
                        guard.port, frame, 5.0, open_stream=kind == "empty-data"
                    )
                self.emit({"scenario": "floods", "kind": kind, "ceiling": config.strip() or None,
                           "frames": flood.frames, "closed": flood.closed,
                           "seconds": round(flood.seconds, 2),
                           "cpu_s": round(guard.cpu_s() - cpu0, 2),
                           "peak_growth_mb": (guard.hwm_kb() - rss0) // MB,
                           "resets": H.sample(guard.metrics(), "guard_memory_resets_total"),
                           "prober": _codes(prober.results),
                           "worst_s": round(prober.max_latency_s, 3)})  # fmt: skip


_PRIORITY = h2raw.frame(2, 0, 1, struct.pack(">IB", 0, 16))

SCENARIOS = [
    "path", "stuck", "scan", "bomb", "reset", "churn", "metadata", "fill", "streaming",
    "arrivals", "floods",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.attack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=SCENARIOS)
    p.add_argument("--quick", action="store_true", help="only the smallest size of each")
    p.add_argument("--config-prefix", default="", help="YAML put before the rules")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-attack-") as tmp:
        bench = Bench(Path(tmp), args.config_prefix.replace("\\n", "\n"), args.quick)
        for name in args.only:
            print(f"== {name}", flush=True)
            getattr(bench, name)()
    if args.json:
        args.json.write_text(json.dumps(bench.rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
