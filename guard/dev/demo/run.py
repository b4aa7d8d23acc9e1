"""``guard demo``: the seed stories, end to end, on this machine.

Builds (or reuses) the seed models, starts the local backend and the guard as
child processes on free ports (gRPC and REST both), sends each model a batch
through the guard with the official ``tensorflow_serving`` client, and prints raw
against guarded outputs; then sends the same batch over TF Serving's REST API and
prints the raw JSON beside the guarded JSON (:mod:`guard.dev.demo.rest`); then
the guard's counters. This module imports TensorFlow (for the
official client protos); the guard process it starts never does.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from guard.control.process import ChildStartError, guard_argv, start
from guard.dataplane.rules import normalized_entropy
from guard.dev.backend import BackendProcess, start_backend
from guard.dev.demo import rest
from guard.dev.models import (
    BINARY_MLP,
    MODELS,
    SOFTMAX_201,
    SOFTMAX_201_UNTRAINED,
    WIDE_DEEP,
    build_models,
    demo_inputs,
)

#: The demo's mark for a near-uniform row (examples/guard.yaml's near_uniform_entropy).
NEAR_UNIFORM = 0.98

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO_ROOT / "examples" / "guard.yaml"
DEFAULT_MODELS_DIR = REPO_ROOT / ".cache" / "models"


class _Timer:
    """Where the time goes, printed at the end."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - start))

    def report(self) -> str:
        total = sum(s for _, s in self.phases)
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.phases)
        return f"time: {total:.1f} s ({parts})"


#: The REST request format per seed model: both formats are shown.
REST_FORMATS = {
    WIDE_DEEP: "row",
    BINARY_MLP: "columnar",
    SOFTMAX_201: "row",
    SOFTMAX_201_UNTRAINED: "row",
}


@contextlib.contextmanager
def _guard_process(config: Path, backend: BackendProcess, log: Path) -> Iterator[dict[str, int]]:
    assert backend.rest_address is not None, "the backend was started without REST"
    argv = guard_argv(
        "serve", "--config", str(config), "--upstream", backend.address,
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
        "--rest-upstream", backend.rest_address, "--rest-listen", "127.0.0.1:0",
    )  # fmt: skip
    try:
        child = start(argv, log_path=log)
    except ChildStartError as exc:
        raise RuntimeError(f"the guard did not start: {exc}") from None
    with child:
        yield child.ports


def _request(model: str, inputs: dict[str, np.ndarray]) -> Any:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    for name, value in inputs.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return req


def _fmt(v: float) -> str:
    return f"{v:.6f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def join(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([join(header), join(["-" * w for w in widths]), *map(join, rows)])


def _input_summary(inputs: dict[str, np.ndarray], row: int) -> str:
    name, value = next(iter(inputs.items()))
    flat = value[row].ravel()
    head = ", ".join(f"{v:.2f}" for v in flat[:3])
    return f"{name}=[{head}{', ...' if flat.size > 3 else ''}]"


def _show_binary(
    model: str,
    inputs: dict[str, np.ndarray],
    raw: np.ndarray,
    guarded: Any,
    trailers: dict[str, str],
) -> str:
    import tensorflow as tf

    out = MODELS[model].outputs[0].name
    values = tf.make_ndarray(guarded.outputs[out]).ravel()
    classes = tf.make_ndarray(guarded.outputs[f"{out}_class"]).ravel()
    labels = tf.make_ndarray(guarded.outputs[f"{out}_label"]).ravel()
    rows = []
    for i, (r, g, c, lab) in enumerate(zip(raw.ravel(), values, classes, labels, strict=True)):
        mark = "* clamped" if r != g else ("! out of range" if not 0 <= r <= 1 else "")
        rows.append([str(i), _input_summary(inputs, i), _fmt(r), _fmt(g), str(c), lab.decode(),
                     mark])  # fmt: skip
    head = f"{model}: output '{out}', action={trailers.get('x-guard-action')} " \
           f"violations={trailers.get('x-guard-violations')}"  # fmt: skip
    return (
        head + "\n" + _table(rows, ["row", "input", "raw output", "guarded", "class", "label", ""])
    )


def _show_softmax(
    model: str,
    inputs: dict[str, np.ndarray],
    raw: np.ndarray,
    guarded: Any,
    trailers: dict[str, str],
) -> str:
    import tensorflow as tf

    out = MODELS[model].outputs[0].name
    cls = tf.make_ndarray(guarded.outputs[f"{out}_class"])
    score = tf.make_ndarray(guarded.outputs[f"{out}_score"])
    label = tf.make_ndarray(guarded.outputs[f"{out}_label"])
    top = tf.make_ndarray(guarded.outputs[f"{out}_top_k_label"])
    entropy = normalized_entropy(raw.reshape(raw.shape[0], -1))
    rows = []
    for i in range(raw.shape[0]):
        row_sum = float(raw[i].sum(dtype=np.float64))
        marks = ["! sum off 1"] if abs(row_sum - 1) > 1e-3 else []
        marks += ["! near-uniform"] if entropy[i] >= NEAR_UNIFORM else []
        marks += ["abstained"] if cls[i] == -1 else []
        top3 = ", ".join(t.decode() for t in top[i][:3])
        rows.append([str(i), _input_summary(inputs, i), _fmt(float(raw[i].max())),
                     f"{row_sum:.4f}", f"{entropy[i]:.4f}", str(cls[i]),
                     _fmt(float(score[i])), label[i].decode(), top3,
                     ", ".join(marks)])  # fmt: skip
    head = f"{model}: output '{out}' ({raw.shape[1]} classes), " \
           f"action={trailers.get('x-guard-action')} " \
           f"violations={trailers.get('x-guard-violations')}"  # fmt: skip
    return (
        head
        + "\n"
        + _table(
            rows,
            [
                "row",
                "input",
                "raw max",
                "raw sum",
                "entropy",
                "class",
                "score",
                "label",
                "top 3",
                "",
            ],
        )
    )


def rest_reports(backend_url: str, guard_url: str) -> list[str]:
    """One REST predict per seed model, direct and through the guard, side by side."""
    reports = []
    for model, fmt in REST_FORMATS.items():
        body = rest.request_body(demo_inputs(model), columnar=fmt == "columnar")
        raw = rest.post_predict(backend_url, model, body)
        guarded = rest.post_predict(guard_url, model, body)
        reports.append(rest.report(model, fmt, raw, guarded))
    return reports


def _counters(metrics_url: str) -> str:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=5) as r:  # noqa: S310 - loopback
        text = r.read().decode()
    lines = []
    wanted = (
        "guard_responses_total",
        "guard_output_violations_total",
        "guard_output_sum_violations_total",
        "guard_predicted_class_total",
        "guard_abstentions_total",
        "guard_near_uniform_rows_total",
    )
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted and s.value:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                lines.append(f"{s.name}{{{labels}}} {s.value:g}")
    return "\n".join(lines)


def _grpc_reports(guard_address: str, backend_address: str) -> list[str]:
    """One request per seed model, straight to the backend and through the guard."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    reports = []
    with (
        grpc.insecure_channel(guard_address) as guard_ch,
        grpc.insecure_channel(backend_address) as direct_ch,
    ):
        via_guard = prediction_service_pb2_grpc.PredictionServiceStub(guard_ch)
        direct = prediction_service_pb2_grpc.PredictionServiceStub(direct_ch)
        for model in (WIDE_DEEP, BINARY_MLP, SOFTMAX_201, SOFTMAX_201_UNTRAINED):
            inputs = demo_inputs(model)
            req = _request(model, inputs)
            raw_resp = direct.Predict(req, timeout=60)
            raw = tf.make_ndarray(raw_resp.outputs[MODELS[model].outputs[0].name])
            guarded, call = via_guard.Predict.with_call(req, timeout=60)
            trailers = dict(call.trailing_metadata() or ())
            softmax = model in (SOFTMAX_201, SOFTMAX_201_UNTRAINED)
            show = _show_softmax if softmax else _show_binary
            reports.append(show(model, inputs, raw, guarded, trailers))
    return reports


def run_demo(config: Path, models_dir: Path, tensor_content: bool = False) -> int:
    """Run the demo; returns the exit code."""
    timer = _Timer()
    print(f"guard demo: config {config}")
    with timer.phase("client TF import"):  # timed apart: most of the client's start
        importlib.import_module("tensorflow")
        importlib.import_module("tensorflow_serving.apis.prediction_service_pb2_grpc")

    with timer.phase("model build"):
        paths = build_models(models_dir)
    with tempfile.TemporaryDirectory(prefix="guard-demo-") as tmp:
        with timer.phase("backend start"):
            backend = start_backend(paths, tensor_content=tensor_content, rest_listen="127.0.0.1:0")
        with backend:
            with timer.phase("guard start"):
                guard_cm = _guard_process(config, backend, Path(tmp) / "guard.log")
                ports = guard_cm.__enter__()
            try:
                with timer.phase("requests"):
                    reports = _grpc_reports(f"127.0.0.1:{ports['grpc']}", backend.address)
                    assert backend.rest_url is not None
                    reports += rest_reports(backend.rest_url, f"http://127.0.0.1:{ports['rest']}")
                    counters = _counters(f"http://127.0.0.1:{ports['metrics']}/metrics")
            finally:
                guard_cm.__exit__(None, None, None)
    for report in reports:
        print()
        print(report)
    print()
    print("guard counters (from /metrics, non-zero):")
    print(counters)
    print()
    print(timer.report())
    return 0
