"""What the guard step costs on a REST predict body, against one ``json.loads``.

The body is what TF Serving returns for softmax_201 with a batch of 1024 in row
format (1024 x 201 float32, about 3 MB), written by the backend's TF-Serving
writer from softmax outputs; ``--body FILE`` reads a saved response instead (for
instance one the local backend returned). The guard step is the guard's own
(``guard_rest_response`` with examples/guard.yaml's softmax_201 rule: check_sum,
argmax, top_k 5, labels): read the body, decide, write the guarded body, count.
With the native kernels (what the guard runs), a one-output body is read by one
native scan and decided by the output's lane; with the reference kernels,
numpy scans and numpy decides. The allocator
has the guard's settings (``guard.control.memory.tune_malloc``): they decide
how many pages each step faults in.

``python -m bench.restjson [--rows 1024] [--classes 201] [--repeat 15] [--body FILE]``

Prints, for each, the median and the best wall time of ``--repeat`` runs and the
best thread CPU time, in milliseconds. Where ``pysimdjson`` is installed (it is
not a dependency: ``pip install pysimdjson``), it also times simdjson's DOM
parse of the body, which reads every number and makes no Python object: a
floor for any step that must read them all. Other load on the box moves the wall
times (and, through the shared caches, the CPU times): run it idle, twice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from guard.control.config import load_config
from guard.control.memory import tune_malloc
from guard.dataplane.book import RuleBook
from guard.dataplane.codec.restjson import read_predict_response
from guard.dataplane.kernels import REFERENCE, Kernels, default
from guard.dev.backend.json_tensor import predict_response
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.rest.guarding import RestRequest, guard_rest_response
from guard.server.rest.signatures import Metadata, OutputInfo

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "guard.yaml"


def softmax_body(rows: int, classes: int) -> bytes:
    logits = np.random.default_rng(0).normal(0, 2, (rows, classes))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    return predict_response([("probabilities", probs, 1)], "row")


class GuardStep:
    """The guard's REST step for softmax_201's responses, on one kernel set."""

    def __init__(self, kernels: Kernels, classes: int) -> None:
        config = load_config(EXAMPLES)
        self.book = RuleBook(config.models, config.max_message_bytes, kernels)
        self.metrics = GuardMetrics(CollectorRegistry(), config.model_names())
        outputs = {"probabilities": OutputInfo("DT_FLOAT", (-1, classes))}
        metadata = Metadata(1, {"serving_default": outputs})
        self.request = RestRequest("softmax_201", "", "row", metadata)

    def __call__(self, body: bytes) -> bytes:
        guarded = guard_rest_response(body, self.request, self.book, self.metrics)
        assert guarded is not None
        return guarded.body


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float, float]:
    """Median and best wall time, and the best thread CPU time, in ms."""
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        cpu.append((time.thread_time() - start_cpu) * 1e3)
        wall.append((time.perf_counter() - start) * 1e3)
    return statistics.median(wall), min(wall), min(cpu)


def _parse_floor(body: bytes) -> Callable[[], object] | None:
    """simdjson's DOM parse of ``body``, where pysimdjson is installed."""
    try:
        import simdjson  # type: ignore[import-not-found]
    except ImportError:
        print("(pip install pysimdjson to time simdjson's parse of the body as a floor)")
        return None
    parser = simdjson.Parser()
    return lambda: parser.parse(body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=201)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--body", type=Path, help="a saved row-format response to use")
    args = parser.parse_args(argv)
    tune_malloc()
    body = args.body.read_bytes() if args.body else softmax_body(args.rows, args.classes)
    native = default()
    by_lane, by_numpy = GuardStep(native, args.classes), GuardStep(REFERENCE, args.classes)
    scan = native.number_scan
    guarded = by_lane(body)
    assert guarded == by_numpy(body), "both routes write the same body"
    assert json.loads(guarded)["guard_outputs"][0]["probabilities_top_k_label"]
    print(f"body: {len(body) / 1e6:.2f} MB, guarded: {len(guarded) / 1e6:.2f} MB")
    floor = _parse_floor(body)
    for name, fn in (
        *((("simdjson DOM parse (floor)", floor),) if floor else ()),
        ("json.loads(body)", lambda: json.loads(body)),
        ("restjson read, numpy scan", lambda: read_predict_response(body, "row")),
        ("restjson read, native scan", lambda: read_predict_response(body, "row", scan)),
        ("guard step, reference kernels", lambda: by_numpy(body)),
        ("guard step, native kernels", lambda: by_lane(body)),
    ):
        median, best, cpu = timed(fn, args.repeat)
        print(f"{name:34s} median {median:6.1f} ms  best {best:6.1f} ms  best CPU {cpu:6.1f} ms")


if __name__ == "__main__":
    main()
