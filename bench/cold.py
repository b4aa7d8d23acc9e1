"""What guarding one response costs when the CPU caches are cold.

In a loaded proxy the client, the upstream and the kernel run between two
responses and evict the caches, so the guard's per-response work costs several
times what a hot loop measures (thread CPU time inside a loaded guard: ~300 us
for the demo response, against ~85 us hot). This runs the guard's response
function in a loop, hot and with the caches thrashed before each call, and
prints both medians of thread CPU time. Use it to judge changes to the data
plane: the cold figure predicts the proxy's CPU per request far better.

``python -m bench.cold [--rows 8] [--classes 201] [--encoding float_val] [--numpy-too]``

``--numpy-too`` also times the guard without its native modules
(``guard.dataplane._rank``, ``guard.dataplane._walk``), alternating the two call by call in one
process, as an install without a C compiler would run.
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib
from collections.abc import Callable

import numpy as np

from bench import micro


def _thrasher() -> Callable[[], None]:
    junk = np.ones(8 << 20, dtype=np.uint8)  # larger than L2 and most of an L3 slice
    blob = bytes(range(256)) * 4096

    def thrash() -> None:
        zlib.compress(blob, 1)  # unrelated code
        junk[::64].sum()  # unrelated data, one touch per cache line

    return thrash


def _guard(case: micro.Case, native: bool) -> Callable[[bytes], bytes]:
    """The guard's response function, on the native or the reference kernels."""
    run = micro.guard_path(case, native=native)
    if run is None:
        raise SystemExit("the guard is not importable from this checkout")
    body = micro.response_bytes(case)
    for _ in range(200):  # the rule book's caches are filled
        run(body)
    return run


def measure(case: micro.Case, calls: int, numpy_too: bool = False) -> dict[str, float]:
    """Median thread-CPU microseconds per call, hot and cold (and for the numpy
    path, with ``numpy_too``: keys ``numpy hot`` and ``numpy cold``)."""
    micro.same_allocator_as_guard()
    from guard.dataplane import kernels

    if kernels.NATIVE is None and numpy_too:
        raise SystemExit(f"{kernels.MISSING} not built here: nothing to compare against")
    runs = {"": _guard(case, native=True)}
    if numpy_too:
        runs["numpy "] = _guard(case, native=False)
    body = micro.response_bytes(case)
    thrash = _thrasher()
    times: dict[str, list[int]] = {f"{p}{m}": [] for p in runs for m in ("hot", "cold")}
    for mode in ("hot", "cold"):
        for _ in range(calls):
            for prefix, run in runs.items():  # alternated call by call
                if mode == "cold":
                    thrash()
                start = time.thread_time_ns()
                run(body)
                times[f"{prefix}{mode}"].append(time.thread_time_ns() - start)
    return {key: statistics.median(t) / 1000 for key, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--classes", type=int, default=201)
    p.add_argument("--encoding", choices=["float_val", "tensor_content"], default="float_val")
    p.add_argument("--calls", type=int, default=1500)
    p.add_argument("--numpy-too", action="store_true", help="also time the numpy-only path")
    args = p.parse_args(argv)
    case = micro.Case(args.rows, args.classes, args.encoding)
    figures = measure(case, args.calls, args.numpy_too)
    print(f"{case.label}: hot {figures['hot']:.1f} us, cold {figures['cold']:.1f} us (median)")
    if args.numpy_too:
        print(
            f"{case.label}, without the native modules: hot {figures['numpy hot']:.1f} us, "
            f"cold {figures['numpy cold']:.1f} us (median)"
        )


if __name__ == "__main__":
    main()
