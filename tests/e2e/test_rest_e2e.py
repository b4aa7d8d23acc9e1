"""The REST front-end end to end: the seed models in the local backend (gRPC
and REST), real ``guard serve`` processes in front of both, and the same
inputs sent over REST and over gRPC through the same guard.

The differential tests hold the two protocols to one answer: the same
classes, labels and scores (float32 for float32), the same action and
violation count, and the same increments of every output metric. The
model's own SavedModel, run in this process, is the independent reference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from guard.dev.backend import BackendProcess, start_backend
from guard.dev.models import BINARY_MLP, SOFTMAX_201, WIDE_DEEP, random_inputs
from tests.support.guard import GuardProcess, scrape, start_guard, stop_all

from ._support import arrays, decode_labels, inputs_for, predict, predict_error, predict_request
from .conftest import EXAMPLE_CONFIG, SCENARIOS, Reference

pytestmark = [pytest.mark.tf, pytest.mark.slow]

FORMATS = ("row", "columnar")
SEEDS = (WIDE_DEEP, BINARY_MLP, SOFTMAX_201)
# What each seed model's one output is called (a REST response does not name it).
OUTPUT = {WIDE_DEEP: "output_1", BINARY_MLP: "probability", SOFTMAX_201: "probabilities"}
_OUTPUT_METRICS = (
    "guard_output_",
    "guard_responses_total",
    "guard_predicted_class_total",
    "guard_abstentions_total",
    "guard_near_uniform_rows_total",
)
# Gauges hold a state (classes per row, drift), not a count of what happened.
_OUTPUT_GAUGES = ("guard_output_classes", "guard_output_drift_psi")


@pytest.fixture(scope="module")
def rest_backend(seed_models: dict[str, Path]) -> Iterator[BackendProcess]:
    with start_backend(seed_models, rest_listen="127.0.0.1:0") as backend:
        yield backend


@pytest.fixture(scope="module")
def rest_guards(
    rest_backend: BackendProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, GuardProcess]]:
    """The ``examples`` and ``reject`` scenarios, each with REST and gRPC served."""
    config_dir = tmp_path_factory.mktemp("rest-configs")
    reject = config_dir / "reject.yaml"
    reject.write_text(yaml.safe_dump(SCENARIOS["reject"]))
    assert rest_backend.rest_address is not None
    extra = ("--rest-listen", "127.0.0.1:0", "--rest-upstream", rest_backend.rest_address)
    guards = {
        name: start_guard(path, *extra, upstream=rest_backend.address)
        for name, path in (("examples", EXAMPLE_CONFIG), ("reject", reject))
    }
    yield guards
    stop_all(list(guards.values()))


def rest_body(inputs: dict[str, np.ndarray], fmt: str) -> bytes:
    """A REST predict request, row (``instances``) or columnar (``inputs``)."""
    if fmt == "columnar":
        return json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode()
    (batch,) = {len(v) for v in inputs.values()}
    if len(inputs) == 1:
        (values,) = inputs.values()
        return json.dumps({"instances": values.tolist()}).encode()
    rows = [{k: v[i].tolist() for k, v in inputs.items()} for i in range(batch)]
    return json.dumps({"instances": rows}).encode()


def rest_post(url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def rest_outputs(doc: dict[str, Any], name: str, fmt: str) -> dict[str, np.ndarray]:
    """A single-output REST response's outputs, by name, as arrays."""
    if fmt == "columnar":
        out = {name: np.array(doc["outputs"])}
        out.update({k: np.array(v) for k, v in doc.get("guard_outputs", {}).items()})
        return out
    out = {name: np.array(doc["predictions"])}
    rows = doc.get("guard_outputs", [])
    for key in rows[0] if rows else ():
        out[key] = np.array([row[key] for row in rows])
    return out


def output_metrics(guard: GuardProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in scrape(guard.metrics_url)
        for s in family.samples
        if s.name.startswith(_OUTPUT_METRICS) and not s.name.startswith(_OUTPUT_GAUGES)
    }


def delta(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model", SEEDS)
def test_rest_and_grpc_give_the_same_guarded_answer_and_metrics(
    rest_guards: dict[str, GuardProcess], reference: Reference, model: str, fmt: str
) -> None:
    guard = rest_guards["examples"]
    inputs = inputs_for(model, "demo") if model != SOFTMAX_201 else random_inputs(model, 33, 4)
    served = reference.saved_model(model, inputs)
    url = f"{guard.rest_url}/v1/models/{model}:predict"

    before = output_metrics(guard)
    status, headers, body = rest_post(url, rest_body(inputs, fmt))
    after_rest = output_metrics(guard)
    response, trailers = predict(guard.channel, predict_request(model, inputs))
    after_grpc = output_metrics(guard)

    assert status == 200, body
    by_rest = rest_outputs(json.loads(body), OUTPUT[model], fmt)
    by_grpc = arrays(response)
    assert set(by_rest) == set(by_grpc)
    for name, grpc_values in by_grpc.items():
        rest_values = by_rest[name]
        if grpc_values.dtype == object:  # labels
            np.testing.assert_array_equal(rest_values.astype(str), decode_labels(grpc_values))
        else:
            np.testing.assert_array_equal(rest_values.astype(grpc_values.dtype), grpc_values)
    guarded = by_grpc[OUTPUT[model]]
    np.testing.assert_array_equal(guarded, np.clip(served, 0.0, 1.0))  # the model's own answer
    assert headers["x-guard-action"] == trailers["x-guard-action"]
    assert headers["x-guard-violations"] == trailers["x-guard-violations"]
    by_rest_delta, by_grpc_delta = delta(before, after_rest), delta(after_rest, after_grpc)
    assert by_rest_delta != {}
    # Counts are exact; a histogram's _sum is a running float total, so its
    # increments agree to the last bits only.
    assert by_rest_delta == pytest.approx(by_grpc_delta, rel=1e-12, abs=0)
    rest_ok = {"protocol": "rest", "model": model, "method": "Predict", "code": "OK"}
    assert guard.sample("guard_requests_total", **rest_ok) >= 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_rejection_has_the_same_text_over_rest_as_over_grpc(
    rest_guards: dict[str, GuardProcess], fmt: str
) -> None:
    guard = rest_guards["reject"]
    inputs = inputs_for(WIDE_DEEP, "demo")
    url = f"{guard.rest_url}/v1/models/{WIDE_DEEP}:predict"

    status, headers, body = rest_post(url, rest_body(inputs, fmt))
    error = predict_error(guard.channel, predict_request(WIDE_DEEP, inputs))

    assert status == 500
    assert json.loads(body) == {"error": error.details()}
    assert error.details() == "guard: model 'wide_deep' output 'output_1': 5 values above 1.0"
    assert headers["x-guard-action"] == "rejected"
    internal = {"protocol": "rest", "model": WIDE_DEEP, "method": "Predict", "code": "INTERNAL"}
    assert guard.sample("guard_requests_total", **internal) >= 1


def test_a_model_without_rules_and_metadata_pass_byte_identical(
    rest_guards: dict[str, GuardProcess], rest_backend: BackendProcess
) -> None:
    guard = rest_guards["reject"]  # rules for wide_deep only
    body = rest_body(inputs_for(BINARY_MLP, "demo"), "row")

    via_guard = rest_post(f"{guard.rest_url}/v1/models/{BINARY_MLP}:predict", body)
    direct = rest_post(f"{rest_backend.rest_url}/v1/models/{BINARY_MLP}:predict", body)
    with urllib.request.urlopen(f"{guard.rest_url}/v1/models/{SOFTMAX_201}/metadata") as r:  # noqa: S310
        metadata = r.read()
    with urllib.request.urlopen(f"{rest_backend.rest_url}/v1/models/{SOFTMAX_201}/metadata") as r:  # noqa: S310
        direct_metadata = r.read()

    assert via_guard[0] == direct[0] == 200
    assert via_guard[2] == direct[2]
    drop = {"Date"}
    assert {k: v for k, v in via_guard[1].items() if k not in drop} == {
        k: v for k, v in direct[1].items() if k not in drop
    }
    assert metadata == direct_metadata


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_gets_the_seed_users_threshold_applied(rest_guards: dict[str, GuardProcess]) -> None:
    guard = rest_guards["examples"]
    body = rest_body(inputs_for(BINARY_MLP, "demo"), "row")
    out = subprocess.run(
        ["curl", "-sS", "-i", "-X", "POST", "-H", "Content-Type: application/json",
         "--data-binary", "@-", f"{guard.rest_url}/v1/models/{BINARY_MLP}:predict"],
        input=body, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    head, _, payload = out.stdout.partition(b"\r\n\r\n")
    doc = json.loads(payload)

    assert head.startswith(b"HTTP/1.1 200")
    assert b"x-guard-action: clean" in head.lower()
    scores = np.array(doc["predictions"], dtype=np.float32).ravel()
    classes = [row["probability_class"][0] for row in doc["guard_outputs"]]
    assert classes == (scores > 0.5).astype(int).tolist()
    assert [row["probability_label"][0] for row in doc["guard_outputs"]] == [
        ["negative", "positive"][c] for c in classes
    ]
    assert abs(scores[0] - 0.074706882) < 1e-6  # the seed user's first score


def test_dev_mode_serves_rest_against_the_local_backends_rest_port(
    seed_models: dict[str, Path],
) -> None:
    model = f"{WIDE_DEEP}={seed_models[WIDE_DEEP]}"
    guard = start_guard(EXAMPLE_CONFIG, "--model", model, "--rest-listen", "127.0.0.1:0")
    try:
        body = rest_body(inputs_for(WIDE_DEEP, "demo"), "columnar")
        status, headers, out = rest_post(f"{guard.rest_url}/v1/models/{WIDE_DEEP}:predict", body)
    finally:
        guard.stop()

    assert status == 200, out
    assert headers["x-guard-action"] == "clamped"
    doc = json.loads(out)
    assert max(np.array(doc["outputs"]).ravel()) == 1.0
    assert doc["guard_outputs"]["output_1_label"][:5] == [["YES"]] * 5
