"""REST's native route (guard/server/rest/plan.py) against the reference route:
for one-output responses in both formats, the same body, action, violations
and metric samples, whether the lane decides or leaves the response to numpy;
and, where the lane decides, derived outputs that read back as a plain numpy
computation of them."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from guard.control.config import parse_config
from guard.dataplane.book import RuleBook
from guard.dataplane.codec.restjson import Format, read_predict_response
from guard.dataplane.errors import DecodeError, GuardError, OutputShapeError, RejectedOutputError
from guard.dataplane.evaluate import resolve
from guard.dataplane.kernels import REFERENCE, Kernels
from guard.dataplane.lanes import Lane
from guard.dataplane.results import Action
from guard.dev.backend.json_tensor import DT_DOUBLE, DT_FLOAT, predict_response
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.rest import guarding
from guard.server.rest.guarding import RestRequest, guard_rest_response
from guard.server.rest.plan import rest_plan
from guard.server.rest.signatures import Metadata, OutputInfo
from tests.dataplane.test_rank import rule_configs
from tests.dataplane.test_restjson import OUTPUTS_TWICE
from tests.native import native

_DTYPES = {
    np.dtype(np.float32): (DT_FLOAT, "DT_FLOAT"),
    np.dtype(np.float64): (DT_DOUBLE, "DT_DOUBLE"),
}


class _Rest:
    """One rule for output ``probs`` of model ``m``, a fresh registry, and the
    metadata TF Serving gives for a signature with that one output."""

    def __init__(self, output: dict[str, Any], values: np.ndarray, fmt: Format, kernels: Kernels):
        config = parse_config({"models": [{"name": "m", "outputs": [output]}]})
        self.book = RuleBook(config.models, config.max_message_bytes, kernels)
        self.registry = CollectorRegistry()
        self.metrics = GuardMetrics(self.registry, config.model_names())
        info = OutputInfo(_DTYPES[values.dtype][1], (-1, *values.shape[1:]))
        metadata = Metadata(3, {"serving_default": {"probs": info}})
        self.request = RestRequest("m", "", fmt, metadata)

    def guard(self, body: bytes) -> Any:
        try:
            guarded = guard_rest_response(body, self.request, self.book, self.metrics)
        except GuardError as exc:
            return type(exc), exc.details
        return None if guarded is None else (guarded.body, guarded.action, guarded.violations)

    def exposition(self) -> list[bytes]:
        # _created timestamps differ between two registries; everything else must not.
        return [
            line for line in generate_latest(self.registry).splitlines() if b"_created" not in line
        ]


def _body(values: np.ndarray, fmt: Format) -> bytes:
    return predict_response([("probs", values, _DTYPES[values.dtype][0])], fmt)


def _both(output: dict[str, Any], values: np.ndarray, fmt: Format) -> tuple[Any, Any]:
    body = _body(values, fmt)
    outcomes = []
    for kernels in (native(), REFERENCE):
        rest = _Rest(output, values, fmt, kernels)
        outcomes.append((rest.guard(body), rest.guard(body), rest.exposition()))
    return outcomes[0], outcomes[1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_configs(), st.sampled_from(["row", "columnar"]))
def test_the_native_route_writes_the_bytes_and_metrics_of_the_reference(
    case: tuple[dict[str, Any], np.ndarray], fmt: Format
) -> None:
    """Twice each (the second response takes the plan the first made)."""
    output, values = case
    if values.ndim == 0:
        fmt = "columnar"  # row format needs a batch axis
    by_lane, by_numpy = _both(output, values, fmt)
    assert by_lane == by_numpy


def _decided_by_lane(output: dict[str, Any], values: np.ndarray, fmt: Format) -> bytes:
    """The body the lane writes (asserting that it decides), checked against the reference's."""
    rest = _Rest(output, values, fmt, native())
    body = _body(values, fmt)
    response = read_predict_response(body, fmt, native().number_scan)
    target = resolve(rest.book, "m", "", 3, rest.metrics)
    assert target is not None
    info = rest.request.metadata.signatures["serving_default"]["probs"]
    plan = rest_plan(response, "probs", info, target, rest.book, rest.metrics)
    assert plan is not None
    found = plan.run(response)
    assert found is not None, "the lane decides"
    by_lane, by_numpy = _both(output, values, fmt)
    assert by_lane == by_numpy
    assert by_lane[0][0] is not None and found[0] == by_lane[0][0]
    return found[0]


@pytest.mark.parametrize("fmt", ["row", "columnar"])
def test_a_softmax_ranked_by_the_lane_reads_back_as_numpy_ranks_it(fmt: Format) -> None:
    x = np.random.default_rng(7).dirichlet(np.ones(20), size=6).astype(np.float32)
    labels = [f"c{i}" for i in range(20)]
    rule = {"name": "probs", "check_sum": True, "argmax": True, "top_k": 3, "labels": labels}
    doc = json.loads(_decided_by_lane(rule, x, fmt))
    best = np.argsort(-x, axis=1, kind="stable")[:, :3]
    if fmt == "row":
        derived = {k: [row[k] for row in doc["guard_outputs"]] for k in doc["guard_outputs"][0]}
    else:
        derived = doc["guard_outputs"]
    assert derived["probs_class"] == best[:, 0].tolist()
    assert np.array_equal(np.array(derived["probs_score"], np.float32), x.max(axis=1))
    assert derived["probs_top_k_class"] == best.tolist()
    assert derived["probs_label"] == [labels[i] for i in best[:, 0]]
    assert derived["probs_top_k_label"] == [[labels[i] for i in row] for row in best]
    key = "predictions" if fmt == "row" else "outputs"
    assert np.array_equal(np.array(doc[key], np.float32), x)


def test_a_threshold_with_labels_and_abstentions_is_decided_by_the_lane() -> None:
    x = np.array([[0.73], [0.2], [0.55], [1.25]], np.float32)  # 1.25 is observed
    rule = {"name": "probs", "threshold": 0.5, "labels": ["no", "yes"], "min_confidence": 0.6,
            "valid_range": [0.0, 1.0], "on_violation": "observe"}  # fmt: skip
    doc = json.loads(_decided_by_lane(rule, x, "row"))
    rows = doc["guard_outputs"]
    assert [r["probs_class"] for r in rows] == [[1], [0], [-1], [1]]
    assert [r["probs_label"] for r in rows] == [["yes"], ["no"], ["unknown"], ["yes"]]


def test_a_clamp_decided_by_the_lane_rewrites_only_the_values_it_changed() -> None:
    x = np.array([[0.25, 0.75], [1.5, -0.5]], np.float32)
    rule = {"name": "probs", "argmax": True, "valid_range": [0.0, 1.0], "on_violation": "clamp"}
    body = _decided_by_lane(rule, x, "row")
    original = _body(x, "row")
    assert body.startswith(original[: original.index(b"1.5")])
    doc = json.loads(body)
    assert doc["predictions"] == [[0.25, 0.75], [1.0, 0.0]]
    assert [r["probs_class"] for r in doc["guard_outputs"]] == [1, 0]


def test_the_lane_answers_a_second_response_from_the_plan_of_the_first() -> None:
    rule = {"name": "probs", "threshold": 0.5}
    x = np.array([[0.7]], np.float32)
    rest = _Rest(rule, x, "row", native())
    rest.guard(_body(x, "row"))
    plans = len(rest.book.plans)
    found = rest.guard(_body(np.array([[0.2]], np.float32), "row"))
    assert found[1] is Action.CLEAN and len(rest.book.plans) == plans
    assert json.loads(found[0])["guard_outputs"] == [{"probs_class": [0]}]


@pytest.mark.parametrize("fmt", ["row", "columnar"])
@pytest.mark.parametrize("policy", ["observe", "clamp"])
def test_a_rule_that_only_checks_is_decided_by_the_lane(fmt: Format, policy: str) -> None:
    """Seed 001's case: a one-value sigmoid output at 1.0028 under a range
    rule alone. Clean or not, the lane decides it: the body as the
    reference writes it (as it came where nothing is repaired: no
    ``guard_outputs``), the same metrics, and no class counted."""
    rule = {"name": "probs", "valid_range": [0.0, 1.0], "on_violation": policy}
    for values in ([[0.25], [0.75]], [[0.25], [1.0028]]):
        x = np.array(values, dtype=np.float32)
        body = _decided_by_lane(rule, x, fmt)
        assert b"guard_outputs" not in body
        if policy == "observe" or x.max() <= 1.0:
            assert body == _body(x, fmt)
    rest = _Rest(rule, x, fmt, native())
    rest.guard(_body(x, fmt))
    assert not [line for line in rest.exposition() if line.startswith(b"guard_predicted_class")]


def test_a_shape_the_signature_does_not_declare_is_refused_on_both_routes() -> None:
    x = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    refused = []
    for kernels in (native(), REFERENCE):
        rest = _Rest({"name": "probs", "argmax": True}, x, "row", kernels)
        metadata = Metadata(3, {"serving_default": {"probs": OutputInfo("DT_FLOAT", (-1, 3))}})
        rest.request = RestRequest("m", "", "row", metadata)
        refused.append(rest.guard(_body(x, "row")))
    assert refused[0] == refused[1]
    assert "the signature declares [-1, 3]" in refused[0][1]


def test_remembered_texts_are_the_references_in_both_formats() -> None:
    """The plan remembers each answer's guard_outputs text (classes and labels,
    per format); answers in both formats through one plan, seen again and
    again, still write the reference's bytes and metrics. A large batch's
    texts are not kept."""
    rule = {"name": "probs", "threshold": 0.5, "labels": ["no", "yes"]}
    first = np.zeros((6, 1), np.float32)
    lane, numpy = _Rest(rule, first, "row", native()), _Rest(rule, first, "row", REFERENCE)
    rng = np.random.default_rng(11)
    seen = set()
    for i in range(300):
        fmt: Format = "row" if i % 3 else "columnar"
        lane.request = numpy.request = replace(lane.request, format=fmt)
        x = rng.random((6, 1)).astype(np.float32)
        seen.add((fmt, (x > 0.5).tobytes()))
        assert lane.guard(_body(x, fmt)) == numpy.guard(_body(x, fmt))
    assert lane.exposition() == numpy.exposition()
    assert len(lane.book.texts) == len(seen) > 64
    big = rng.random((100, 1)).astype(np.float32)
    assert lane.guard(_body(big, "row")) == numpy.guard(_body(big, "row"))
    assert len(lane.book.texts) == len(seen)


def test_texts_holding_scores_are_not_remembered() -> None:
    """A score's text is the body's own token, so the same lane entries may be
    written differently by another body: those texts are made every time."""
    rule = {"name": "probs", "argmax": True}
    x = np.array([[0.25, 0.75]], np.float32)
    rest = _Rest(rule, x, "row", native())
    body = _body(x, "row")
    other = body.replace(b"0.75", b"7.5e-1")
    assert other != body
    for text, score in ((body, b"0.75"), (other, b"7.5e-1"), (body, b"0.75")):
        guarded = rest.guard(text)[0]
        assert guarded == _Rest(rule, x, "row", REFERENCE).guard(text)[0]
        assert b'"probs_score": ' + score in guarded
    assert len(rest.book.texts) == 0


class _Reads:
    """Counts the responses guarding.py reads whole (the express route reads none)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0

        def counted(*args: Any) -> Any:
            self.count += 1
            return read_predict_response(*args)

        monkeypatch.setattr(guarding, "read_predict_response", counted)


@pytest.mark.parametrize("fmt", ["row", "columnar"])
def test_a_response_like_one_the_lane_decided_is_answered_from_its_scan(
    fmt: Format, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first response of a shape, the next ones are not read whole:
    the plan answers from the scan's float32 values, with the reference's
    bytes, actions, violations and metric samples (1.25 is observed)."""
    reads = _Reads(monkeypatch)
    rule = {"name": "probs", "threshold": 0.5, "labels": ["no", "yes"],
            "valid_range": [0.0, 1.0], "on_violation": "observe"}  # fmt: skip
    batches = [np.array([[0.7], [0.2]], np.float32), np.array([[0.1], [1.25]], np.float32)]
    lane, numpy = _Rest(rule, batches[0], fmt, native()), _Rest(rule, batches[0], fmt, REFERENCE)
    for x in batches * 3:
        assert lane.guard(_body(x, fmt)) == numpy.guard(_body(x, fmt))
    assert lane.exposition() == numpy.exposition()
    # numpy's route reads all six; the lane's route, the first of each text it remembers.
    assert reads.count == 6 + 2


def test_what_the_scan_alone_cannot_answer_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """An activation changes every value (their text is rewritten from a read
    response); a new shape or new metadata has no plan yet; a NaN leaves the
    lane. Each is read, and answered as the reference answers it. A clamp's
    repaired values are written where the scan found them: read once only."""
    x, high = np.array([[0.7], [0.2]], np.float32), np.array([[0.7], [0.9]], np.float32)
    threshold = {"name": "probs", "threshold": 0.5}
    # Classes as the raw values would give them: only the values differ.
    activated = {**threshold, "activation": "sigmoid"}
    clamped = {**threshold, "valid_range": [0.0, 0.5], "on_violation": "clamp"}
    cases: list[tuple[dict[str, Any], list[np.ndarray], int]] = [
        (activated, [high, high], 2),
        (clamped, [x, x, high], 1),
        (threshold, [x, np.array([[0.7]], np.float32)], 2),
        (threshold, [x, np.array([[np.nan], [0.2]], np.float32)], 2),
        (threshold, [x, x, x], 1),
    ]
    for rule, batches, expected in cases:
        reads = _Reads(monkeypatch)
        lane, numpy = _Rest(rule, x, "row", native()), _Rest(rule, x, "row", REFERENCE)
        for values in batches:
            assert lane.guard(_body(values, "row")) == numpy.guard(_body(values, "row"))
        assert lane.exposition() == numpy.exposition()
        assert reads.count - len(batches) == expected, rule
    # The same metadata again, but a new object (refreshed): read again.
    reads = _Reads(monkeypatch)
    lane = _Rest(threshold, x, "row", native())
    lane.guard(_body(x, "row"))
    lane.guard(_body(x, "row"))
    lane.request = replace(lane.request, metadata=replace(lane.request.metadata))
    lane.guard(_body(x, "row"))
    assert reads.count == 2


def test_a_plan_whose_texts_hold_scores_reads_each_response_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A softmax ranked with its scores: texts are never remembered, so the
    scan alone never answers, and each response is checked by the lane once."""
    encoded = []
    real = Lane.encode

    def counted(lane: Lane, values: Any) -> Any:
        encoded.append(len(values))
        return real(lane, values)

    monkeypatch.setattr(Lane, "encode", counted)
    x = np.random.default_rng(3).dirichlet(np.ones(5), size=4).astype(np.float32)
    rule = {"name": "probs", "argmax": True, "top_k": 2}
    lane, numpy = _Rest(rule, x, "row", native()), _Rest(rule, x, "row", REFERENCE)
    for _ in range(3):
        assert lane.guard(_body(x, "row")) == numpy.guard(_body(x, "row"))
    assert len(encoded) == 3


# --- hostile upstream answers: a GuardError that says why, on both routes ----


def _on_both_routes(rule: dict[str, Any], body: bytes, fmt: Format = "row") -> Any:
    """The answer to ``body`` on the lane's route and on numpy's, asserted the
    same (metric samples too)."""
    x = np.zeros((2, 1), np.float32)
    lane, numpy = _Rest(rule, x, fmt, native()), _Rest(rule, x, fmt, REFERENCE)
    found = lane.guard(body)
    assert found == numpy.guard(body)
    assert lane.exposition() == numpy.exposition()
    return found


_REJECT = {"name": "probs", "threshold": 0.5, "labels": ["n", "y"], "on_violation": "reject"}


@pytest.mark.parametrize("body, fmt, held", OUTPUTS_TWICE)
def test_an_output_written_twice_is_a_decode_error(body: bytes, fmt: Format, held: str) -> None:
    """json.loads reads the last 'predictions' ([[1.9], [-5]]), which the guard
    passed as clean after checking the first."""
    error, details = _on_both_routes(_REJECT, body.replace(b'"p"', b'"probs"'), fmt)
    assert error is DecodeError
    assert details.startswith(
        "guard: cannot read the REST predict response of model 'm' from upstream: "
    )
    assert held.replace("'p'", "'probs'") in details and "fix the upstream" in details


@pytest.mark.parametrize("digits", [5000, 100_000])
def test_an_integer_of_thousands_of_digits_is_an_out_of_range_value(digits: int) -> None:
    body = b'{"predictions": [[' + b"7" * digits + b"], [0.25]]}"
    assert json.loads(body, parse_int=float)["predictions"] == [[np.inf], [0.25]]
    assert _on_both_routes(_REJECT, body) == (
        RejectedOutputError,
        "guard: model 'm' output 'probs': 1 infinite values",
    )
    clamp = {"name": "probs", "valid_range": [0.0, 1.0], "on_violation": "clamp"}
    guarded, action, violations = _on_both_routes(clamp, body)
    assert json.loads(guarded) == {"predictions": [[1.0], [0.25]]}
    assert (action, violations) == (Action.CLAMPED, 1)


_OWN_GUARD_OUTPUTS = b'{"predictions": [[0.9], [0.2]], "guard_outputs": [{"probs_class": [0]}, {}]}'


def test_an_upstream_guard_outputs_member_is_refused_where_the_guard_writes_one() -> None:
    """Two 'guard_outputs' members would leave the client to pick one."""
    error, details = _on_both_routes(_REJECT, _OWN_GUARD_OUTPUTS)
    assert error is OutputShapeError
    assert details.startswith("guard: model 'm': cannot add the derived outputs")
    assert "already has a top-level 'guard_outputs' member" in details
    rest = _Rest(_REJECT, np.zeros((2, 1), np.float32), "row", native())
    response = read_predict_response(_OWN_GUARD_OUTPUTS, "row", native().number_scan)
    target = resolve(rest.book, "m", "", 3, rest.metrics)
    assert target is not None
    info = rest.request.metadata.signatures["serving_default"]["probs"]
    plan = rest_plan(response, "probs", info, target, rest.book, rest.metrics)
    assert plan is not None and plan.run(response) is None  # the lane leaves it to numpy


def test_an_upstream_guard_outputs_member_passes_where_nothing_is_derived() -> None:
    clamp = {"name": "probs", "valid_range": [0.0, 0.5], "on_violation": "clamp"}
    guarded, action, violations = _on_both_routes(clamp, _OWN_GUARD_OUTPUTS)
    expected = json.loads(_OWN_GUARD_OUTPUTS)
    expected["predictions"] = [[0.5], [0.2]]
    assert json.loads(guarded) == expected
    assert (action, violations) == (Action.CLAMPED, 1)


@pytest.mark.parametrize(
    "body, held",
    [(b'{"predictions": ["2.0", "0.5"]}', "values that are not numbers"),
     (b'{"predictions": [[2], [0]]}', "integers"),
     (b'{"predictions": [[true], [false]]}', "values that are not numbers")],
)  # fmt: skip
def test_an_output_declared_float_that_comes_as_other_json_is_refused(
    body: bytes, held: str
) -> None:
    """Red team: strings for a DT_FLOAT output passed as clean (no rule reads
    strings), and lenient readers (JavaScript's Number, Go's ",string") take
    "2.0" for 2. TF Serving writes a float as a number with a decimal point."""
    error, details = _on_both_routes(_REJECT, body)
    assert error is OutputShapeError
    assert details == (
        f"guard: model 'm' output 'probs': the signature declares DT_FLOAT, but the response "
        f"holds {held}, which TF Serving never writes for it; the guard cannot check them: "
        "fix the upstream"
    )
