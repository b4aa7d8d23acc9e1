"""A/B of the REST hop's CPU per request: guard checkouts against the passthrough.

The REST counterpart of :mod:`bench.ab`. Each variant is a checkout of this
repository (a ``git worktree`` of another commit, with its native modules
built or copied in, or this one), started with ``python -m guard serve`` from
that directory with ``bench.rest``'s demo rules, in front of one canned
upstream (:mod:`bench.rest_upstream`), beside the raw aiohttp passthrough.
Each slice loads one hop with ``h2load --h1`` (16 connections) while /proc
accounts its CPU; the hops take their slices in turn, the order rotating, so
that a slow spell of a shared machine falls on all of them. The medians of
the slices, and their ratio to the passthrough's, are printed.

    git worktree add /tmp/before HEAD~3
    python -m bench.ab_rest --size 1x1 --slices 16 before=/tmp/before after=.

A variant may name other rules than the demo's after its checkout, to see
where a guard's CPU goes: ``:norules`` (no rule for either model, as
:mod:`bench.ab` names it: answers are streamed through as they come) or
``:range`` (an observe-only ``valid_range`` on each output: every number is
read, nothing is written):

    python -m bench.ab_rest --size 1024x201 bare=.:norules range=.:range demo=.

``--lean`` adds the passthrough on the guard's own upstream client
(``bench.rest_passthrough --client guard``), printed as ``lean-passthrough``:
the guard's own work is what it costs over that one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import rest
from bench.rest_upstream import SOFTMAX, TINY, RestModel
from guard.control.process import read_port_file

_REQUESTS = {"1x1": 4000, "1024x201": 200}
_RULES = ("demo", "range", "norules")


def _config(workdir: Path, name: str, rules: str) -> Path:
    """The config of a variant whose ``rules`` are not the demo's."""
    config = workdir / f"{name}.yaml"
    outputs = {TINY.name: TINY.output, SOFTMAX.name: SOFTMAX.output}
    models = "".join(
        f"  - name: {model}\n    outputs:\n      - name: {output}\n"
        "        valid_range: [0.0, 1.0]\n        on_violation: observe\n"
        for model, output in outputs.items()
    )
    config.write_text(
        "health_check_interval_s: 60\n"
        + (f"models:\n{models}" if rules == "range" else "models: []\n")
    )
    return config


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_guard(
    checkout: Path, upstream: int, workdir: Path, name: str, rules: str = "demo"
) -> tuple[subprocess.Popen[bytes], int]:
    """``guard serve`` from ``checkout``, REST on, the demo rules (or ``rules``)."""
    port_file = workdir / f"{name}.ports.json"
    argv = rest._guard_argv(workdir, f"127.0.0.1:{upstream}")  # noqa: SLF001 - same rules
    if rules != "demo":
        argv[argv.index("--config") + 1] = str(_config(workdir, name, rules))
    cmd = [sys.executable, "-m", *argv, "--port-file", str(port_file)]
    proc = subprocess.Popen(cmd, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} did not start (exit {proc.poll()})")
        time.sleep(0.1)
    return proc, int(read_port_file(port_file)["rest"])


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help=f"NAME=CHECKOUT[:RULES], RULES one of {_RULES}")
    p.add_argument("--size", choices=tuple(_REQUESTS), default="1x1")
    p.add_argument("--slices", type=int, default=16)
    p.add_argument("--lean", action="store_true", help="add the passthrough on the guard's client")
    args = p.parse_args(argv)
    variants = []
    for spec in args.variants:
        name, _, where = spec.partition("=")
        where, _, rules = where.partition(":")
        if rules not in ("", *_RULES):
            p.error(f"{spec}: rules {rules!r} is not one of {_RULES}")
        variants.append((name, Path(where).resolve(), rules or "demo"))
    model = TINY if args.size == "1x1" else SOFTMAX
    requests = _REQUESTS[args.size]
    workdir = Path(tempfile.mkdtemp(prefix="bench-ab-rest-"))
    up_argv = ["bench.rest_upstream", "--listen", "127.0.0.1:0"]
    upstream, up_port, _ = rest._spawn(up_argv, workdir, "upstream", "http")  # noqa: SLF001
    hops: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        passthrough = rest.start_path("passthrough", up_port, workdir, "ab")
        assert passthrough.proc is not None
        hops["passthrough"] = (passthrough.proc, passthrough.port)
        if args.lean:
            argv = ["bench.rest_passthrough", "--upstream", f"127.0.0.1:{up_port}",
                    "--listen", "127.0.0.1:0", "--client", "guard"]  # fmt: skip
            proc, port, _ = rest._spawn(argv, workdir, "lean", "http")  # noqa: SLF001
            hops["lean-passthrough"] = (proc, port)
        for name, where, rules in variants:
            hops[name] = _start_guard(where, up_port, workdir, name, rules)
        per = _measure(hops, model, requests, args.slices, workdir)
    finally:
        for proc, _ in hops.values():
            proc.terminate()
            proc.wait()
        upstream.terminate()
        upstream.wait()
    base = statistics.median(per["passthrough"])
    print(f"CPU ms per request, {args.size}, h2load --h1 c=16, {args.slices} slices per hop")
    for name, values in per.items():
        median = statistics.median(values)
        print(
            f"{name:16s} median {median:.4f}  ratio {median / base:.3f}  "
            f"slices {min(values):.4f}-{max(values):.4f}"
        )


def _measure(
    hops: dict[str, tuple[subprocess.Popen[bytes], int]],
    model: RestModel,
    requests: int,
    slices: int,
    workdir: Path,
) -> dict[str, list[float]]:
    """CPU ms per request of each slice, per hop, the hops in rotating order."""
    for _, port in hops.values():
        rest.h2load_run(port, model, requests // 2, workdir)  # warm up
    per: dict[str, list[float]] = {name: [] for name in hops}
    names = list(hops)
    for s in range(slices):
        for name in names[s % len(names) :] + names[: s % len(names)]:
            proc, port = hops[name]
            before = _cpu_s(proc.pid)
            rest.h2load_run(port, model, requests, workdir)
            per[name].append((_cpu_s(proc.pid) - before) / requests * 1000)
    return per


if __name__ == "__main__":
    main()
