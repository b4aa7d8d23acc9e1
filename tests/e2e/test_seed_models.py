"""The seed stories end to end: real models in the local backend, a real guard
process in front, the official client, and the model run in this process as the
reference. Every test runs against both backend encodings."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from guard.dev.models import BINARY_MLP, MODELS, SOFTMAX_201, WIDE_DEEP, random_inputs
from tests.support.guard import scrape

from ._support import (
    BATCHES,
    PREDICT,
    arrays,
    decode_labels,
    inputs_for,
    predict,
    predict_error,
    predict_request,
    raw_call,
)
from .conftest import EXAMPLE_CONFIG, GuardProcess, Reference

pytestmark = [pytest.mark.tf, pytest.mark.slow]

Guard = Callable[[str], GuardProcess]

# Values this close to a decision boundary may land on either side of it between
# model.predict and the served graph (a last-bit difference); such rows are only
# compared with the served SavedModel, which is what the backend runs.
_BOUNDARY_EPS = 1e-6


def _series(model: str, output: str) -> dict[str, str]:
    return {"model": model, "version": "1", "signature": "serving_default", "output": output}


def _counters(guard: GuardProcess, model: str, output: str) -> dict[str, float]:
    labels = _series(model, output)
    counters = {
        kind: guard.sample("guard_output_violations_total", kind=kind, **labels)
        for kind in ("below_min", "above_max", "nan", "inf")
    }
    counters["values"] = guard.sample("guard_output_values_total", **labels)
    counters["sum"] = guard.sample("guard_output_sum_violations_total", **labels)
    for action in ("clean", "observed", "clamped", "rejected"):
        counters[action] = guard.sample(
            "guard_responses_total", model=model, version="1", action=action
        )
    return counters


def _histogram(guard: GuardProcess, model: str, output: str) -> dict[float, float]:
    """``guard_output_value``'s cumulative bucket counts by upper bound."""
    series = {"model": model, "signature": "serving_default", "output": output}
    buckets: dict[float, float] = {}
    for family in scrape(guard.metrics_url):
        for s in family.samples:
            if s.name == "guard_output_value_bucket" and all(
                s.labels.get(k) == v for k, v in series.items()
            ):
                buckets[float(s.labels["le"])] = float(s.value)
    return buckets


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


# ---------------------------------------------------------------------- wide_deep


@pytest.mark.parametrize("batch", BATCHES)
def test_wide_deep_observe_counts_exactly_the_models_values_above_one(
    guard: Guard,
    backend_channel: grpc.Channel,
    reference: Reference,
    batch: str,
) -> None:
    g = guard("observe")
    inputs = inputs_for(WIDE_DEEP, batch)
    by_keras = reference.keras_predict(WIDE_DEEP, inputs)
    served = reference.saved_model(WIDE_DEEP, inputs)
    above = int(np.count_nonzero(by_keras > 1.0))
    assert above > 0, "the batch must reproduce the seed story"
    assert np.count_nonzero(served > 1.0) == above

    request = predict_request(WIDE_DEEP, inputs)
    before = _counters(g, WIDE_DEEP, "output_1")
    hist_before = _histogram(g, WIDE_DEEP, "output_1")
    body, trailers = raw_call(g.channel, PREDICT, request)
    after = _counters(g, WIDE_DEEP, "output_1")
    hist_after = _histogram(g, WIDE_DEEP, "output_1")
    direct, _ = raw_call(backend_channel, PREDICT, request)

    assert body == direct, "observe must return the upstream's bytes unchanged"
    out = arrays(predict_pb2.PredictResponse.FromString(body))["output_1"]
    np.testing.assert_array_equal(out, served)
    assert trailers["x-guard-action"] == "observed"
    assert trailers["x-guard-violations"] == str(above)
    assert _delta(before, after) == {"above_max": above, "values": served.size, "observed": 1}
    # The histogram resolves the region above 1: what lies above the 1.0 bucket.
    observed = {le: hist_after[le] - hist_before.get(le, 0.0) for le in hist_after}
    assert observed[float("inf")] == served.size
    assert observed[float("inf")] - observed[1.0] == above
    for le, count in observed.items():
        assert count == np.count_nonzero(served.astype(np.float64) <= le), f"bucket le={le}"


@pytest.mark.parametrize("batch", BATCHES)
def test_wide_deep_clamp_returns_the_models_values_clipped(
    guard: Guard, reference: Reference, batch: str
) -> None:
    g = guard("clamp")
    inputs = inputs_for(WIDE_DEEP, batch)
    served = reference.saved_model(WIDE_DEEP, inputs)
    above = int(np.count_nonzero(served > 1.0))
    assert above > 0

    before = _counters(g, WIDE_DEEP, "output_1")
    response, trailers = predict(g.channel, predict_request(WIDE_DEEP, inputs))
    after = _counters(g, WIDE_DEEP, "output_1")

    out = arrays(response)
    assert set(out) == {"output_1"}
    assert out["output_1"].dtype == np.float32
    assert out["output_1"].shape == served.shape
    np.testing.assert_array_equal(out["output_1"], np.clip(served, 0.0, 1.0))
    inside = served <= 1.0
    np.testing.assert_array_equal(out["output_1"][inside], served[inside])
    assert response.model_spec.name == WIDE_DEEP
    assert response.model_spec.version.value == 1
    assert trailers["x-guard-action"] == "clamped"
    assert trailers["x-guard-violations"] == str(above)
    assert _delta(before, after) == {"above_max": above, "values": served.size, "clamped": 1}


@pytest.mark.parametrize("batch", BATCHES)
def test_wide_deep_reject_fails_with_internal_naming_model_output_and_count(
    guard: Guard, reference: Reference, batch: str
) -> None:
    g = guard("reject")
    inputs = inputs_for(WIDE_DEEP, batch)
    above = int(np.count_nonzero(reference.saved_model(WIDE_DEEP, inputs) > 1.0))
    assert above > 0
    requests_before = g.sample(
        "guard_requests_total", model=WIDE_DEEP, method="Predict", code="INTERNAL"
    )
    before = _counters(g, WIDE_DEEP, "output_1")

    error = predict_error(g.channel, predict_request(WIDE_DEEP, inputs))

    assert error.code() == grpc.StatusCode.INTERNAL
    assert (
        error.details() == f"guard: model 'wide_deep' output 'output_1': {above} values above 1.0"
    )
    assert dict(error.trailing_metadata() or ())["x-guard-action"] == "rejected"
    after = _counters(g, WIDE_DEEP, "output_1")
    assert _delta(before, after)["rejected"] == 1
    assert _delta(before, after)["above_max"] == above
    requests_after = g.sample(
        "guard_requests_total", model=WIDE_DEEP, method="Predict", code="INTERNAL"
    )
    assert requests_after - requests_before == 1


def test_wide_deep_reject_passes_a_batch_inside_the_range_unchanged(
    guard: Guard, backend_channel: grpc.Channel, reference: Reference
) -> None:
    demo = inputs_for(WIDE_DEEP, "demo")
    inputs = {name: value[5:] for name, value in demo.items()}  # the rows in [0, 1]
    served = reference.saved_model(WIDE_DEEP, inputs)
    assert served.max() <= 1.0

    request = predict_request(WIDE_DEEP, inputs)
    body, trailers = raw_call(guard("reject").channel, PREDICT, request)
    direct, _ = raw_call(backend_channel, PREDICT, request)

    assert body == direct
    assert trailers["x-guard-action"] == "clean"
    assert trailers["x-guard-violations"] == "0"


def test_wide_deep_example_rules_clamp_then_threshold_and_label(
    guard: Guard, reference: Reference
) -> None:
    inputs = inputs_for(WIDE_DEEP, "random257")
    clipped = np.clip(reference.saved_model(WIDE_DEEP, inputs), 0.0, 1.0)

    response, trailers = predict(guard("examples").channel, predict_request(WIDE_DEEP, inputs))

    out = arrays(response)
    assert set(out) == {"output_1", "output_1_class", "output_1_label"}
    np.testing.assert_array_equal(out["output_1"], clipped)
    assert out["output_1_class"].dtype == np.int64
    np.testing.assert_array_equal(out["output_1_class"], (clipped > 0.5).astype(np.int64))
    np.testing.assert_array_equal(
        decode_labels(out["output_1_label"]), np.array(["NO", "YES"])[out["output_1_class"]]
    )
    assert trailers["x-guard-action"] == "clamped"


# --------------------------------------------------------------------- binary_mlp


@pytest.mark.parametrize("batch", BATCHES)
def test_binary_mlp_class_is_model_predict_above_half_with_labels(
    guard: Guard, reference: Reference, batch: str
) -> None:
    g = guard("examples")
    inputs = inputs_for(BINARY_MLP, batch)
    by_keras = reference.keras_predict(BINARY_MLP, inputs)
    served = reference.saved_model(BINARY_MLP, inputs)
    expected = (by_keras > 0.5).astype(np.int64)
    series = {"model": BINARY_MLP, "signature": "serving_default", "output": "probability"}
    counted_before = {
        label: g.sample("guard_predicted_class_total", **series, **{"class": label})
        for label in MODELS[BINARY_MLP].labels
    }

    response, trailers = predict(g.channel, predict_request(BINARY_MLP, inputs))

    out = arrays(response)
    assert set(out) == {"probability", "probability_class", "probability_label"}
    np.testing.assert_array_equal(out["probability"], served)
    cls = out["probability_class"]
    assert cls.dtype == np.int64
    assert cls.shape == served.shape
    np.testing.assert_array_equal(cls, (served > 0.5).astype(np.int64))
    clear = np.abs(by_keras - 0.5) > _BOUNDARY_EPS
    np.testing.assert_array_equal(cls[clear], expected[clear])
    labels = np.array(MODELS[BINARY_MLP].labels)
    np.testing.assert_array_equal(decode_labels(out["probability_label"]), labels[cls])
    assert trailers["x-guard-action"] == "clean"
    assert trailers["x-guard-violations"] == "0"
    for index, label in enumerate(MODELS[BINARY_MLP].labels):
        counted = g.sample("guard_predicted_class_total", **series, **{"class": label})
        assert counted - counted_before[label] == np.count_nonzero(cls == index)


# -------------------------------------------------------------------- softmax_201


def _example_labels() -> np.ndarray:
    lines = (EXAMPLE_CONFIG.parent / "softmax_201_labels.txt").read_text().splitlines()
    return np.array([line for line in lines if line])


@pytest.mark.parametrize("batch", BATCHES)
def test_softmax_201_argmax_top_k_and_labels_match_numpy(
    guard: Guard, reference: Reference, batch: str
) -> None:
    g = guard("examples")
    inputs = inputs_for(SOFTMAX_201, batch)
    by_keras = reference.keras_predict(SOFTMAX_201, inputs)
    served = reference.saved_model(SOFTMAX_201, inputs)
    names = _example_labels()
    assert names.size == 201
    assert tuple(names) == MODELS[SOFTMAX_201].labels
    before = _counters(g, SOFTMAX_201, "probabilities")
    hist_before = _histogram(g, SOFTMAX_201, "probabilities")

    response, trailers = predict(g.channel, predict_request(SOFTMAX_201, inputs))

    after = _counters(g, SOFTMAX_201, "probabilities")
    hist_after = _histogram(g, SOFTMAX_201, "probabilities")
    out = arrays(response)
    assert set(out) == {
        "probabilities",
        "probabilities_class",
        "probabilities_score",
        "probabilities_label",
        "probabilities_top_k_class",
        "probabilities_top_k_score",
        "probabilities_top_k_label",
    }
    np.testing.assert_array_equal(out["probabilities"], served)

    cls = out["probabilities_class"]
    assert cls.dtype == np.int64
    np.testing.assert_array_equal(cls, np.argmax(served, axis=-1))
    ranked = np.sort(by_keras, axis=-1)
    clear = ranked[:, -1] - ranked[:, -2] > _BOUNDARY_EPS
    np.testing.assert_array_equal(cls[clear], np.argmax(by_keras, axis=-1)[clear])
    np.testing.assert_array_equal(out["probabilities_score"], served.max(axis=-1))
    np.testing.assert_array_equal(decode_labels(out["probabilities_label"]), names[cls])

    top_k = np.argsort(-served, axis=-1, kind="stable")[:, :5]
    np.testing.assert_array_equal(out["probabilities_top_k_class"], top_k)
    np.testing.assert_array_equal(
        out["probabilities_top_k_score"], np.take_along_axis(served, top_k, axis=-1)
    )
    np.testing.assert_array_equal(decode_labels(out["probabilities_top_k_label"]), names[top_k])

    assert trailers["x-guard-action"] == "clean"
    assert trailers["x-guard-violations"] == "0"
    assert _delta(before, after) == {"values": served.size, "clean": 1}
    # A multi-class output puts each row's top probability (its confidence) in the histogram.
    confidence = served.max(axis=-1)
    for le, count in hist_after.items():
        observed = count - hist_before.get(le, 0.0)
        assert observed == np.count_nonzero(confidence.astype(np.float64) <= le), f"bucket le={le}"


def test_softmax_201_batch_larger_than_grpcs_default_message_limit(
    guard: Guard, backend_channel: grpc.Channel
) -> None:
    # 5300 rows: a 5.4 MB request and a 4.3 MB response, both over gRPC's 4 MiB default.
    inputs = random_inputs(SOFTMAX_201, 5300, seed=3)
    request = predict_request(SOFTMAX_201, inputs)
    assert request.ByteSize() > 4 * 1024 * 1024

    guarded, trailers = predict(guard("examples").channel, request)
    direct, _ = predict(backend_channel, request)

    assert direct.ByteSize() > 4 * 1024 * 1024
    served = tf.make_ndarray(direct.outputs["probabilities"])
    out = arrays(guarded)
    np.testing.assert_array_equal(out["probabilities"], served)
    np.testing.assert_array_equal(out["probabilities_class"], np.argmax(served, axis=-1))
    assert trailers["x-guard-action"] == "clean"
