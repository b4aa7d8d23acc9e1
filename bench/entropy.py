"""What the entropy check adds to guarding one clean softmax response.

    .venv/bin/python -m bench.entropy [--rounds 7]

For an 8x201 and a 1024x201 float32 response (the native route, packed
float_val), the time of ``guard_predict_response`` with ``entropy: true`` and
``entropy: false``. The entropy is computed when queued rows are folded in:
past 65,536 queued values (inside the loop, as in a proxy) and once at the
end (a scrape's fold, counted too). A scrape's text rendering is not counted:
it is paid per scrape, not per response. Median of ``--rounds``; the machine
is shared, so compare the two columns of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from guard.control.config import parse_config
from guard.dataplane.book import RuleBook
from guard.dataplane.pipeline import guard_predict_response
from guard.metrics.guard_metrics import GuardMetrics
from tests.support.protos import predict_response


def _body(rows: int) -> bytes:
    rng = np.random.default_rng(rows)
    p = rng.dirichlet(np.full(201, 0.1), size=rows).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    return bytes(predict_response("m", {"probs": p}).SerializeToString())


def _per_response_us(body: bytes, entropy: bool, n: int) -> float:
    rule = {"name": "probs", "argmax": True, "top_k": 5, "check_sum": True, "entropy": entropy}
    config = parse_config({"models": [{"name": "m", "outputs": [rule]}]})
    book = RuleBook(config.models, config.max_message_bytes)
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, ["m"])
    guard_predict_response(body, None, book, metrics)  # the plan is made once
    started = time.perf_counter()
    for _ in range(n):
        result: Any = guard_predict_response(body, None, book, metrics)
    list(metrics.entropy.collect())  # folds what is still queued
    elapsed = time.perf_counter() - started
    assert result is not None and result.action.label == "clean"
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"per clean response, folds included: median of {args.rounds} rounds (us)")
    for rows, n in ((8, 2048), (1024, 128)):
        body = _body(rows)
        on, off = [], []
        for _ in range(args.rounds):
            off.append(_per_response_us(body, False, n))
            on.append(_per_response_us(body, True, n))
        a, b = statistics.median(off), statistics.median(on)
        print(f"{rows}x201: entropy off {a:8.1f}  on {b:8.1f}  added {b - a:7.1f} ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
