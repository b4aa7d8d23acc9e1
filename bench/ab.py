"""A/B of the proxy's CPU per request: guard checkouts against the passthrough.

Each variant is a checkout of this repository (a ``git worktree`` of another
commit, or this one), started with ``python -m guard serve`` from that
directory against one canned upstream, then loaded with h2load (c=16 unless
``--concurrency`` says otherwise; c=1 is the latency target's case) while
/proc accounts its CPU. Before that, ``--latency-calls`` sequential calls (a
Python client, as in ``make bench``) time each path's added latency at c=1:
its p50 minus the p50 of calls straight to the upstream in the same round.
Variants and the raw passthrough are interleaved, their order rotated per
round, and each round's ratio to the passthrough is printed: on a shared,
noisy machine the paired ratio is the figure to trust.

``python -m bench.ab [--rounds 4] [--concurrency 16] [--latency-calls 1000]
[--batch 8 --classes 201] [--rules demo|clamp] NAME=CHECKOUT[:norules] ...``, e.g.::

    git worktree add /tmp/before HEAD~3
    python -m bench.ab before=/tmp/before after=. after-norules=.:norules

``:norules`` runs the guard with a config that matches no model (the hop alone).
``--batch 1 --classes 1 --rules clamp`` is the per-call case: a 1x1 response
under a clamp + argmax rule, its value in range.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench import cases, load, payloads
from bench.paths import Setup, spawn_python
from bench.run import start_upstream, write_guard_config
from bench.upstream import model_from_args
from bench.upstream import parse_args as upstream_args

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="NAME=CHECKOUT[:norules]")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--latency-calls", type=int, default=1000, help="0 skips the latency part")
    p.add_argument(
        "--batch", type=int, help="rows of the canned response (bench.upstream's default)"
    )
    p.add_argument("--classes", type=int, help="classes of the canned response")
    p.add_argument("--rules", choices=("demo", "clamp"), default="demo")
    args = p.parse_args(argv)
    variants: dict[str, tuple[Path, bool] | None] = {"passthrough": None}
    for spec in args.variants:
        name, _, where = spec.partition("=")
        path, _, flag = where.partition(":")
        variants[name] = (Path(path).resolve(), flag == "norules")

    shape = [f"--{k}={v}" for k in ("batch", "classes") if (v := getattr(args, k)) is not None]
    model = model_from_args(upstream_args(shape))
    request = payloads.predict_request(model)
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    added_p50: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="guard-ab-") as tmp:
        workdir = Path(tmp)
        data = workdir / "predict.grpc"
        data.write_bytes(payloads.grpc_frame(request))
        upstream, address = start_upstream(workdir, shape)
        rules = write_guard_config(workdir, model)
        if args.rules == "clamp":
            rules.write_text(clamp_rules(model))
        no_rules = workdir / "no-rules.yaml"
        no_rules.write_text(rules.read_text().replace(f"name: {model.name}", "name: no-such-model"))
        setup = Setup(address, workdir)
        try:
            names = list(variants)
            for r in range(args.rounds):
                direct_p50 = 0.0
                if args.latency_calls:
                    direct = load.latency_c1(address, request, args.latency_calls, 200)
                    direct_p50 = direct.p50_ms
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    variant = variants[name]
                    if variant is None:
                        argv_ = [
                            "bench.passthrough",
                            "--upstream",
                            address,
                            "--listen",
                            "127.0.0.1:0",
                        ]
                        checkout = REPO
                    else:
                        checkout, bare = variant
                        argv_ = [
                            "guard", "serve", "--config", str(no_rules if bare else rules),
                            "--upstream", address, "--listen", "127.0.0.1:0",
                            "--metrics-listen", "127.0.0.1:0",
                        ]  # fmt: skip
                    hop = spawn_python(
                        name, setup, f"{name}-r{r}", argv_,
                        env={"PYTHONPATH": str(checkout)}, cwd=checkout,
                    )  # fmt: skip
                    try:
                        if args.latency_calls:
                            lat = load.latency_c1(hop.target, request, args.latency_calls, 300)
                            added_p50[name].append(lat.p50_ms - direct_p50)
                        else:
                            load.latency_c1(hop.target, request, 300, 0)  # warm up
                        tp = load.throughput(
                            hop.port, data, args.requests, args.concurrency, proxy_pid=hop.pid
                        )
                        if tp.cpu_ms_per_request is not None:
                            cpu[name].append(tp.cpu_ms_per_request)
                    finally:
                        hop.stop()
        finally:
            upstream.terminate()
            upstream.wait(10)
    _report(f"CPU ms/request c={args.concurrency}", cpu)
    if args.latency_calls:
        _report("added p50 ms c=1", added_p50)


def clamp_rules(model: payloads.CannedModel) -> str:
    """One output under valid_range [0, 1], clamped, with argmax."""
    return cases.guard_config(model, cases.CLAMP_ARGMAX)


def _report(what: str, figures: dict[str, list[float]]) -> None:
    base = figures["passthrough"]
    for name, values in figures.items():
        line = f"{name:16s} {what}: median {statistics.median(values):.3f}"
        if name != "passthrough":
            paired = [v / b for v, b in zip(values, base, strict=False)]
            line += f"; vs passthrough {statistics.median(paired):.2f}x"
            line += f" (rounds {', '.join(f'{x:.2f}' for x in paired)})"
        print(line)


if __name__ == "__main__":
    main()
