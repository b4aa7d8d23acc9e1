"""What a fixed HTTP/2 stream window (``stream_window_kb``) costs large
requests, by the distance to the client.

A client sends Predict requests of 16 MB and 1 MB to the guard through a TCP
relay that holds every chunk for a one-way delay in each direction (the
chunks stay pipelined, so the relay adds latency, not a bandwidth limit); the
guard forwards them to the attack upstream of tests/attacks, which answers
small. For each window and delay, a fresh guard; milliseconds per call.

    python -m bench.window                      # windows 0 64 256 1024 KiB, delays 0 1 10 ms
    python -m bench.window --windows 0 1024 --delays 10 --json out.json

``0`` is gRPC's own sizing (BDP probing on). The relay runs as
``python -m bench.window --relay PORT TARGET DELAY_MS``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.attacks import _harness as H
from tests.attacks import attacks

SIZES = {"16 MB": (16_000_000, 5), "1 MB": (1_000_000, 20)}  # request bytes, calls timed


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while True:
            chunk = await reader.read(1 << 20)
            await queue.put((time.monotonic() + delay, chunk))
            if not chunk:
                return

    async def write() -> None:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(due - time.monotonic(), 0))
            if not chunk:
                writer.close()
                return
            writer.write(chunk)
            await writer.drain()

    await asyncio.gather(read(), write(), return_exceptions=True)


async def _relay(port: int, target: str, delay_ms: float) -> None:
    host, target_port = target.rsplit(":", 1)
    delay = delay_ms / 1000

    async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection(host, int(target_port))
        await asyncio.gather(_pump(r1, w2, delay), _pump(r2, w1, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    await server.serve_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _measure(tmp: Path, upstream: H.Proc, window_kb: int, delay_ms: float) -> dict[str, float]:
    config = f"stream_window_kb: {window_kb}\nmax_request_mb: 64\nmax_inflight_mb: 512\n"
    guard = H.start_guard(tmp, upstream.address, config + H.BASE_RULES)
    port = _free_port()
    relay = subprocess.Popen(
        [sys.executable, "-m", "bench.window", "--relay", str(port), guard.address, str(delay_ms)],
        stdout=subprocess.PIPE,
        cwd=H.REPO,
    )
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == b"ready"
        out = {}
        with H.channel(f"127.0.0.1:{port}") as ch:
            for label, (size, calls) in SIZES.items():
                request = attacks.large_request(size, "small")
                assert H.legit_call(ch, request, timeout=30).code == "OK"  # warm
                began = time.perf_counter()
                for _ in range(calls):
                    result = H.legit_call(ch, request, timeout=30)
                    assert result.code == "OK", result
                out[label] = (time.perf_counter() - began) / calls * 1000
        return out
    finally:
        relay.kill()
        relay.wait()
        guard.stop()


def run(windows: list[int], delays: list[float]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-window-") as tmp:
        upstream = H.start_upstream(Path(tmp))
        try:
            for delay in delays:
                for window in windows:
                    ms = _measure(Path(tmp), upstream, window, delay)
                    rows.append({"delay_ms": delay, "window_kb": window, "ms_per_call": ms})
                    shown = ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
                    print(f"delay {delay:g} ms, stream_window_kb {window}: {shown}", flush=True)
        finally:
            upstream.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, nargs="+", default=[0, 64, 256, 1024])
    p.add_argument("--delays", type=float, nargs="+", default=[0.0, 1.0, 10.0])
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--relay", nargs=3, metavar=("PORT", "TARGET", "DELAY_MS"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.relay:
        port, target, delay_ms = args.relay
        asyncio.run(_relay(int(port), target, float(delay_ms)))
        return
    rows = run(args.windows, args.delays)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
