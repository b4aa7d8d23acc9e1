"""Paired A/B of the proxy's CPU per request under one machine load.

``bench.ab`` runs the variants one after the other; on a box shared with other
jobs, the load changes between them and single ratios swing by ±15 %. Here the
passthrough and every guard checkout run side by side, each loaded by its own
h2load (c=32: 2 connections x 16 streams) at the same time, and /proc accounts
each process's CPU over the same window: whatever else the machine does, all
of them pay it together. The response is 1x1 under a clamp + argmax rule (the
per-call case), unless ``--batch``/``--classes`` say otherwise.

``python -m bench.together [--rounds 4] [--requests 4000] NAME=CHECKOUT ...``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench import load, payloads
from bench.ab import REPO, clamp_rules
from bench.paths import Hop, Setup, spawn_python
from bench.run import start_upstream
from bench.upstream import model_from_args
from bench.upstream import parse_args as upstream_args

_CLIENTS, _STREAMS = 2, 16


def _start(name: str, checkout: Path | None, setup: Setup, tag: str, rules: Path) -> Hop:
    if checkout is None:
        argv = ["bench.passthrough", "--upstream", setup.upstream, "--listen", "127.0.0.1:0"]
        checkout = REPO
    else:
        argv = [
            "guard", "serve", "--config", str(rules), "--upstream", setup.upstream,
            "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
        ]  # fmt: skip
    return spawn_python(name, setup, tag, argv, env={"PYTHONPATH": str(checkout)}, cwd=checkout)


def _round(hops: dict[str, Hop], data: Path, request: bytes, requests: int) -> dict[str, float]:
    """CPU ms per request of each hop, all loaded at once."""
    for hop in hops.values():
        load.latency_c1(hop.target, request, 300, 0)  # warm up
    before = {name: load.cpu_seconds(hop.pid or 0) for name, hop in hops.items()}
    procs = {
        name: subprocess.Popen(
            load.h2load_command(hop.port, data, requests, _CLIENTS, _STREAMS),
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, hop in hops.items()
    }
    outputs = {name: proc.communicate()[0] for name, proc in procs.items()}
    cpu = {}
    for name, hop in hops.items():
        result = load.parse_h2load(outputs[name], _CLIENTS * _STREAMS)
        if result.errors:
            raise RuntimeError(f"{name}: {result.errors} calls failed\n{outputs[name]}")
        cpu[name] = (load.cpu_seconds(hop.pid or 0) - before[name]) / requests * 1000
    return cpu


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="NAME=CHECKOUT")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--classes", type=int, default=1)
    args = p.parse_args(argv)
    variants: dict[str, Path | None] = {"passthrough": None}
    for spec in args.variants:
        name, _, where = spec.partition("=")
        variants[name] = Path(where).resolve()
    shape = [f"--batch={args.batch}", f"--classes={args.classes}"]
    model = model_from_args(upstream_args(shape))
    request = payloads.predict_request(model)
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="guard-together-") as tmp:
        workdir = Path(tmp)
        data = workdir / "predict.grpc"
        data.write_bytes(payloads.grpc_frame(request))
        rules = workdir / "guard.yaml"
        rules.write_text(clamp_rules(model))
        upstream, address = start_upstream(workdir, shape)
        setup = Setup(address, workdir)
        try:
            for r in range(args.rounds):
                hops = {
                    name: _start(name, checkout, setup, f"{name}-r{r}", rules)
                    for name, checkout in variants.items()
                }
                try:
                    figures = _round(hops, data, request, args.requests)
                finally:
                    for hop in hops.values():
                        hop.stop()
                for name, value in figures.items():
                    cpu[name].append(value)
                print(f"round {r}: " + ", ".join(f"{n} {v:.3f}" for n, v in figures.items()))
        finally:
            upstream.terminate()
            upstream.wait(10)
    _report(cpu)


def _report(cpu: dict[str, list[float]]) -> None:
    base = cpu["passthrough"]
    for name, values in cpu.items():
        line = f"{name:16s} CPU ms/request c=32: median {statistics.median(values):.3f}"
        if name != "passthrough":
            paired = [v / b for v, b in zip(values, base, strict=True)]
            line += f"; vs passthrough {statistics.median(paired):.2f}x"
            line += f" (rounds {', '.join(f'{x:.2f}' for x in paired)})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
