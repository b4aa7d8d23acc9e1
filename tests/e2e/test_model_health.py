"""Model health end to end (issue 15): the untrained seed model caught and
abstained, calibration against the model's own logits, and drift against a
baseline written by ``guard baseline``. Real backend, real guard processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import yaml

from guard.dataplane.rules import normalized_entropy
from guard.dev.models import SOFTMAX_201, SOFTMAX_201_UNTRAINED, random_inputs
from tests.support.guard import GuardProcess, start_guard

from ._support import arrays, decode_labels, predict, predict_request
from .conftest import (
    LOGITS_MODEL,
    TEMPERATURE,
    BackendFactory,
    Reference,
    logits_keras_model,
)

pytestmark = [pytest.mark.tf, pytest.mark.slow]

Guard = Callable[[str], GuardProcess]
OUT = "probabilities"


def _health(g: GuardProcess, model: str) -> dict[str, float]:
    series = {"model": model, "signature": "serving_default", "output": OUT}
    return {
        "abstained": g.sample("guard_abstentions_total", **series),
        "near_uniform": g.sample("guard_near_uniform_rows_total", **series),
        "rows": g.sample("guard_output_entropy_count", **series),
        "entropy_sum": g.sample("guard_output_entropy_sum", **series),
        "unknown": g.sample("guard_predicted_class_total", **series, **{"class": "unknown"}),
    }


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def test_untrained_model_rows_are_near_uniform_and_abstained(
    guard: Guard, reference: Reference
) -> None:
    g = guard("examples")
    inputs = random_inputs(SOFTMAX_201_UNTRAINED, 64, seed=64)
    served = reference.saved_model(SOFTMAX_201_UNTRAINED, inputs)
    entropy = normalized_entropy(served)
    assert entropy.min() > 0.999 and served.max() < 0.01  # seed 004: about 1/201 each
    before = _health(g, SOFTMAX_201_UNTRAINED)

    response, trailers = predict(g.channel, predict_request(SOFTMAX_201_UNTRAINED, inputs))

    out = arrays(response)
    np.testing.assert_array_equal(out[OUT], served)  # valid: returned untouched
    np.testing.assert_array_equal(out[f"{OUT}_class"], np.full(64, -1))
    assert set(decode_labels(out[f"{OUT}_label"])) == {"unknown"}
    np.testing.assert_array_equal(out[f"{OUT}_score"], served.max(axis=-1))  # scores untouched
    np.testing.assert_array_equal(out[f"{OUT}_top_k_class"][:, 0], np.full(64, -1))
    assert trailers["x-guard-action"] == "clean"
    delta = _delta(before, _health(g, SOFTMAX_201_UNTRAINED))
    assert delta["abstained"] == delta["near_uniform"] == delta["rows"] == 64
    assert delta["unknown"] == 64
    assert delta["entropy_sum"] == pytest.approx(float(entropy.sum()), rel=1e-6)


def test_trained_model_rows_are_neither_near_uniform_nor_abstained(
    guard: Guard, reference: Reference
) -> None:
    g = guard("examples")
    inputs = random_inputs(SOFTMAX_201, 64, seed=64)
    served = reference.saved_model(SOFTMAX_201, inputs)
    entropy = normalized_entropy(served)
    before = _health(g, SOFTMAX_201)

    response, _ = predict(g.channel, predict_request(SOFTMAX_201, inputs))

    out = arrays(response)
    np.testing.assert_array_equal(out[f"{OUT}_class"], served.argmax(axis=-1))
    delta = _delta(before, _health(g, SOFTMAX_201))
    assert delta["rows"] == 64
    assert delta["near_uniform"] == np.count_nonzero(entropy >= 0.98) == 0
    assert delta["abstained"] == delta["unknown"] == 0
    assert delta["entropy_sum"] == pytest.approx(float(entropy.sum()), rel=1e-6)


@pytest.fixture(scope="module")
def logits_model() -> object:
    return logits_keras_model()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def test_temperature_gives_softmax_of_the_models_logits_over_t(
    guard: Guard, logits_model: object
) -> None:
    g = guard("calibrated")
    inputs = random_inputs(SOFTMAX_201, 64, seed=7)
    logits = np.asarray(logits_model.predict(inputs["image"], verbose=0), np.float64)  # type: ignore[attr-defined]
    expected = _softmax(logits / TEMPERATURE)

    response, trailers = predict(g.channel, predict_request(LOGITS_MODEL, inputs))

    out = arrays(response)
    calibrated = out["logits"]
    assert calibrated.dtype == np.float32
    np.testing.assert_allclose(calibrated, expected, rtol=1e-4, atol=1e-7)
    sure = expected.max(axis=-1) >= 0.3 + 1e-5
    unsure = expected.max(axis=-1) < 0.3 - 1e-5
    cls = out["logits_class"]
    np.testing.assert_array_equal(cls[sure], expected.argmax(axis=-1)[sure])
    np.testing.assert_array_equal(cls[unsure], -1)
    assert sure.any() and unsure.any()  # T = 2.5 leaves some rows below 0.3
    assert trailers["x-guard-action"] == "clean"


# ------------------------------------------------------------------------- drift


def _darker(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v * 0.5).astype(np.float32) for k, v in inputs.items()}


@pytest.fixture(scope="module")
def drift_guard(
    backends: BackendFactory,
    reference: Reference,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GuardProcess]:
    """A guard whose softmax_201 rule has a baseline written by ``guard baseline
    --values`` from the served model's confidences on one input distribution.
    Drift is computed after decoding: one encoding is enough."""
    tmp = tmp_path_factory.mktemp("drift")
    confidence = reference.saved_model(SOFTMAX_201, random_inputs(SOFTMAX_201, 1000, 1)).max(-1)
    values = tmp / "validation.txt"
    values.write_text("\n".join(repr(float(v)) for v in confidence) + "\n")
    written = subprocess.run(
        [sys.executable, "-m", "guard", "baseline", "--values", str(values)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    baseline = yaml.safe_load(written.stdout)["baseline"]
    rule = {"name": OUT, "argmax": True, "baseline": baseline, "drift_window": 500}
    config = tmp / "guard.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": SOFTMAX_201, "outputs": [rule]}]}))
    g = start_guard(config, upstream=backends("typed").address)
    yield g
    g.stop()


def _psi(g: GuardProcess) -> float:
    return g.sample("guard_output_drift_psi", model=SOFTMAX_201, output=OUT)


def test_drift_psi_stays_low_on_the_same_distribution_and_rises_on_a_shift(
    drift_guard: GuardProcess, reference: Reference
) -> None:
    g = drift_guard
    same = random_inputs(SOFTMAX_201, 500, 2)
    predict(g.channel, predict_request(SOFTMAX_201, same))
    assert 0 <= _psi(g) < 0.1

    predict(g.channel, predict_request(SOFTMAX_201, _darker(random_inputs(SOFTMAX_201, 500, 3))))
    assert _psi(g) > 0.25
