"""``make bench-check``: a cheap benchmark-regression check for CI.

Times the post-processing micro-benchmarks at small sizes and compares
**ratios**, never absolute times, against thresholds with generous margins:

- guard / numpy floor: what the guard adds over the bare math;
- naive / guard: how much faster than the official message classes it is.

Ratios use the fastest of the timing loops (the least noisy estimator), and a
case that misses is measured again (up to ``--attempts``) before it counts, so a
noisy neighbour does not fail the build. Exit 0 when all pass, 1 on a
regression (with a message per miss), 2 when the guard's pipeline is missing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from bench import micro


@dataclass(frozen=True)
class Threshold:
    """Bounds for one case; ``None`` means not checked."""

    rows: int
    classes: int
    encoding: str
    max_guard_vs_floor: float | None
    min_naive_vs_guard: float | None
    threshold: bool = False
    """binary_mlp's threshold rule instead of the softmax ranking (bench.micro)."""
    repair: bool = False
    """1 % of the values out of range, clamped (bench.micro)."""
    softmax: bool = False
    """Logits through the softmax activation (bench.micro)."""
    renormalise: bool = False
    """With ``repair``: the sum checked too, so the repaired rows are renormalised."""
    abstain: bool = False
    """Half the rows near uniform under min_confidence: they abstain (bench.micro)."""

    @property
    def case(self) -> micro.Case:
        """The micro-benchmark case."""
        return micro.Case(
            self.rows, self.classes, self.encoding, self.threshold, self.repair, self.softmax,
            self.renormalise, self.abstain,
        )  # fmt: skip


# Measured on the 2-core development box (see docs/benchmarks.md), quiet and
# with two CPU hogs beside it: guard/floor 0.3-0.66, naive/guard 4.7-9 (64x10
# float_val), 6-6.4 (64x10 tensor_content), 23-28 (256x201 float_val) and
# 2.7-2.8 (256x201 tensor_content). The bounds leave about 2x of room for
# noise beyond that; they catch a regression (the native modules not used, an
# accidental per-value Python loop, a copy per output), not a few per cent.
# Without the native modules the guard takes 1.8-2.3x the floor, and misses.
# Since each row's entropy is measured by default (multi-class rules), the
# 256x201 float_val case measured 7.5-12 on the loaded box: the native
# entropy loop (0.8-1.6 ns a value) costs as much again as the rest of the
# clean path; folding it into the ranking pass is the performance issue's.
# Tighten them as the guard gets faster.
#
# binary_mlp's threshold rule on an 8x1 response (the native threshold lane),
# on the same box with other workers beside it (load 3-4 on 2 cores), single
# measurements: guard/floor 0.87-3.5 (mostly below 2), naive/guard 1.8-4.0.
# On the reference kernels the same case measured guard/floor 9.8-27 and
# naive/guard 0.15-0.67: the bounds sit about 1.5-2.5x from the worst native
# figures and about 2x from the best of the reference's.
#
# The lanes that count and clamp (64x20, 1 % of the values above 1.0, clamp,
# no sum check) and rank activated values (64x10 logits, softmax), three
# single measurements each beside a running test suite: repair guard/floor
# 0.25-0.34, naive/guard 7.8-12.2; softmax 0.49-0.61 and 3.6-4.5. On the
# reference kernels: repair 2.6-2.9 and 0.74-1.42, softmax 1.7-2.4 and
# 0.96-1.32. (A 256x201 repair case was tried first: there the numpy floor's
# own clip dominates, and the reference came within its bounds now and then.)
# The bounds sit about 2-3x from the native figures; the reference misses both.
#
# The same repair with the sum checked (64x20 renormalise: each row with a
# value above 1.0 is clamped, then renormalised), three single measurements on
# the quiet box: guard/floor 0.23-0.31, naive/guard 7.3-10.7; on the reference
# kernels 2.6-3.0 and 0.78-0.87. The repair case's bounds fit it as well.
#
# Abstentions (64x20, every other row near uniform under min_confidence 0.5),
# three single measurements beside a running test suite: guard/floor
# 0.16-0.26, naive/guard 9.9-13.1; on the reference kernels 3.8-5.8 and
# 0.37-0.59. The same bounds again.
THRESHOLDS: tuple[Threshold, ...] = (
    Threshold(64, 10, "float_val", 1.2, 2.5),
    Threshold(64, 10, "tensor_content", 1.2, 2.5),
    Threshold(256, 201, "float_val", 1.5, 5.0),
    Threshold(256, 201, "tensor_content", 1.5, 1.3),
    Threshold(8, 1, "float_val", 5.0, 1.2, threshold=True),
    Threshold(8, 1, "tensor_content", 5.0, 1.2, threshold=True),
    Threshold(64, 20, "float_val", 1.0, 3.0, repair=True),
    Threshold(64, 20, "float_val", 1.0, 3.0, repair=True, renormalise=True),
    Threshold(64, 20, "float_val", 1.0, 3.0, abstain=True),
    Threshold(64, 10, "float_val", 1.2, 2.0, softmax=True),
)


@dataclass
class Outcome:
    """Measured ratios for one threshold and what they missed."""

    threshold: Threshold
    guard_vs_floor: float
    naive_vs_guard: float

    def misses(self) -> list[str]:
        """A sentence per bound this outcome misses."""
        t, out = self.threshold, []
        name = t.case.label
        if t.max_guard_vs_floor is not None and self.guard_vs_floor > t.max_guard_vs_floor:
            out.append(
                f"{name}: guard takes {self.guard_vs_floor:.2f}x the numpy floor "
                f"(allowed <= {t.max_guard_vs_floor:g}x)"
            )
        if t.min_naive_vs_guard is not None and self.naive_vs_guard < t.min_naive_vs_guard:
            out.append(
                f"{name}: guard is only {self.naive_vs_guard:.2f}x faster than the official "
                f"message classes (required >= {t.min_naive_vs_guard:g}x)"
            )
        return out


def measure(threshold: Threshold, budget_s: float, native: bool = True) -> Outcome:
    """Time one case and compute its ratios from the fastest loops."""
    result = micro.run_case(threshold.case, budget_s, native)
    guard = result["guard"]["min_us"]
    return Outcome(threshold, guard / result["floor"]["min_us"], result["naive"]["min_us"] / guard)


def check(
    thresholds: tuple[Threshold, ...] = THRESHOLDS,
    budget_s: float = 0.15,
    attempts: int = 3,
    native: bool = True,
) -> list[Outcome]:
    """Measure every case; a missing case is retried and its best ratios kept.

    ``native=False`` measures the guard on its reference kernels.
    """
    outcomes = []
    for threshold in thresholds:
        best = measure(threshold, budget_s, native)
        for _ in range(attempts - 1):
            if not best.misses():
                break
            again = measure(threshold, budget_s, native)
            best = Outcome(
                threshold,
                min(best.guard_vs_floor, again.guard_vs_floor),
                max(best.naive_vs_guard, again.naive_vs_guard),
            )
        outcomes.append(best)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    micro.same_allocator_as_guard()
    p = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__)
    p.add_argument("--budget", type=float, default=0.15, help="seconds per path and case")
    p.add_argument("--attempts", type=int, default=3, help="measurements before a miss counts")
    args = p.parse_args(argv)
    if micro.guard_path(THRESHOLDS[0].case) is None:
        print(
            "bench-check: guard.dataplane.pipeline is not importable; nothing to check",
            file=sys.stderr,
        )
        return 2
    outcomes = check(budget_s=args.budget, attempts=args.attempts)
    misses = [m for o in outcomes for m in o.misses()]
    for o in outcomes:
        print(
            f"{o.threshold.case.label:30} guard/floor {o.guard_vs_floor:6.2f}x   "
            f"naive/guard {o.naive_vs_guard:6.2f}x"
        )
    if misses:
        print("bench-check: post-processing regression:", file=sys.stderr)
        for miss in misses:
            print("  - " + miss, file=sys.stderr)
        return 1
    print("bench-check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
