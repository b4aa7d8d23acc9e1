"""The guard step alone, per kind of rule, on a 1x1 float32 answer, hot.

One output's answer (a sigmoid's one value, as seed 002's model gives) is
guarded in a loop by the gRPC step (``guard_predict_response``) and the
REST step (``guard_rest_response``, row format), each with its own rule
book and metrics on a fresh registry, no network: µs per call, the best of
five runs. The rules: a range rule that clamps (seed 001's), one that
observes, and the demo's threshold with labels (seed 002's). A rule the
native lanes do not take costs the numpy reference's time here.

    python -m bench.steps [--calls 5000] [--value 0.73]

``--value 1.0028`` times the answer seed 001's users saw (out of range).
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from bench.payloads import CannedModel, predict_response_for
from bench.rest_upstream import DT_FLOAT
from guard.control.config import parse_config
from guard.dataplane.book import RuleBook
from guard.dataplane.pipeline import guard_predict_response
from guard.dev.backend.json_tensor import predict_response as rest_body
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.rest.guarding import RestRequest, guard_rest_response
from guard.server.rest.signatures import Metadata, OutputInfo

MODEL = CannedModel(name="m", output_name="probs", batch=1, classes=1, encoding="tensor_content")
RULES: dict[str, dict[str, Any]] = {
    "clamp": {"valid_range": [0.0, 1.0], "on_violation": "clamp"},
    "observe": {"valid_range": [0.0, 1.0], "on_violation": "observe"},
    "threshold": {"threshold": 0.5, "labels": ["no", "yes"]},
}


def _book(rule: dict[str, Any]) -> tuple[RuleBook, GuardMetrics]:
    config = parse_config(
        {"models": [{"name": MODEL.name, "outputs": [{"name": "probs", **rule}]}]}
    )
    metrics = GuardMetrics(CollectorRegistry(), config.model_names())
    return RuleBook(config.models, config.max_message_bytes), metrics


def grpc_step(rule: dict[str, Any], values: np.ndarray) -> Callable[[], object]:
    """One gRPC step: the answer's bytes in, the guarded bytes out."""
    book, metrics = _book(rule)
    body = predict_response_for(MODEL, values)
    return lambda: guard_predict_response(body, None, book, metrics)


def rest_step(rule: dict[str, Any], values: np.ndarray) -> Callable[[], object]:
    """One REST step on TF Serving's row-format answer."""
    book, metrics = _book(rule)
    body = rest_body([("probs", values, DT_FLOAT)], "row")
    metadata = Metadata(
        MODEL.version, {"serving_default": {"probs": OutputInfo("DT_FLOAT", (-1, 1))}}
    )
    request = RestRequest(MODEL.name, "", "row", metadata)
    return lambda: guard_rest_response(body, request, book, metrics)


def best_us(step: Callable[[], object], calls: int) -> float:
    """µs per call, the best of five runs (after one warm-up call)."""
    step()
    return min(timeit.repeat(step, number=calls, repeat=5)) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--value", type=float, default=0.73)
    args = p.parse_args(argv)
    values = np.array([[args.value]], np.float32)
    print(f"µs per 1x1 step (value {args.value:g}), best of 5 x {args.calls} calls")
    for name, rule in RULES.items():
        grpc_us = best_us(grpc_step(rule, values), args.calls)
        rest_us = best_us(rest_step(rule, values), args.calls)
        print(f"{name:10s} grpc {grpc_us:6.1f}  rest {rest_us:6.1f}")


if __name__ == "__main__":
    main()
