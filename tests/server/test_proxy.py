"""The proxy through real gRPC servers: official stubs -> guard -> fake upstream."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
)

from tests.conftest import GuardFactory
from tests.support.guard import samples_by, scrape
from tests.support.protos import predict_request, predict_response
from tests.support.upstream import ECHO_METHOD, FakeUpstream, start_upstream

WIDE_DEEP = {
    "models": [
        {
            "name": "wide_deep",
            "outputs": [
                {"name": "*", "on_violation": "clamp", "threshold": 0.5, "labels": ["NO", "YES"]}
            ],
        }
    ]
}
# The seed's table: five "probabilities" above 1 and three near 0.
SEED_VALUES = np.array(
    [[1.002850], [1.001444], [1.001368], [1.000986], [1.000707], [0.000463], [0.001023],
     [0.001365]], dtype=np.float32,
)  # fmt: skip


def _trailers(call: Any) -> dict[str, str]:
    return {k: v for k, v in call.trailing_metadata()}


async def _predict(guard: Any, request: predict_pb2.PredictRequest, **kw: Any) -> Any:
    call = guard.stub.Predict(request, **kw)
    response = await call
    return response, {k: v for k, v in await call.trailing_metadata()}


# ------------------------------------------------------------------ passthrough


async def test_predict_without_rules_is_byte_identical(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("plain", predict_response("plain", {"y": SEED_VALUES}))
    guard = await make_guard(WIDE_DEEP)
    raw_guard = guard.channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    async with grpc.aio.insecure_channel(upstream.address) as direct:
        raw_direct = direct.unary_unary("/tensorflow.serving.PredictionService/Predict")
        req = predict_request("plain", x=[1.0]).SerializeToString()
        assert await raw_guard(req) == await raw_direct(req)


async def test_every_tf_serving_method_passes_through_byte_identically(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    guard = await make_guard(WIDE_DEEP)
    meta_req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    meta_req.model_spec.name = "wide_deep"
    status_req = get_model_status_pb2.GetModelStatusRequest()
    status_req.model_spec.name = "wide_deep"
    cls_req = classification_pb2.ClassificationRequest()
    cls_req.model_spec.name = "wide_deep"
    cases = [
        ("/tensorflow.serving.PredictionService/GetModelMetadata", meta_req),
        ("/tensorflow.serving.ModelService/GetModelStatus", status_req),
        ("/tensorflow.serving.PredictionService/Classify", cls_req),
    ]
    async with grpc.aio.insecure_channel(upstream.address) as direct:
        for method, req in cases:
            body = req.SerializeToString()
            via_guard = await guard.channel.unary_unary(method)(body)
            via_direct = await direct.unary_unary(method)(body)
            assert via_guard == via_direct, method
    # The Classify score of 1.7 is outside [0, 1] and must still pass untouched.
    resp = classification_pb2.ClassificationResponse.FromString(via_guard)
    assert resp.result.classifications[0].classes[0].score == pytest.approx(1.7)


async def test_unknown_unary_method_is_forwarded_with_trailers(make_guard: GuardFactory) -> None:
    guard = await make_guard()
    call = guard.channel.unary_unary(ECHO_METHOD)(b"\x01\x02\x03")
    assert await call == b"\x03\x02\x01"
    assert ("x-echo", "1") in tuple(await call.trailing_metadata())


async def test_upstream_errors_pass_through_unchanged(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.fail(
        "broken", grpc.StatusCode.INVALID_ARGUMENT, "input 'x' is missing",
        (("x-detail", "why"),), (("x-initial", "sent-first"),),
    )  # fmt: skip
    guard = await make_guard(WIDE_DEEP)
    for model, code, details in [
        ("broken", grpc.StatusCode.INVALID_ARGUMENT, "input 'x' is missing"),
        ("nope", grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await guard.stub.Predict(predict_request(model))
        assert err.value.code() == code
        assert err.value.details() == details
    assert ("x-detail", "why") not in (err.value.trailing_metadata() or ())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(predict_request("broken"))
    assert ("x-detail", "why") in tuple(err.value.trailing_metadata())
    # The upstream's initial metadata reaches the client on an error too.
    assert ("x-initial", "sent-first") in tuple(err.value.initial_metadata())
    assert (
        guard.sample(
            "guard_requests_total",
            {"protocol": "grpc", "model": "__other__", "method": "Predict", "code": "NOT_FOUND"},
        )
        == 1
    )


async def test_client_metadata_and_deadline_reach_upstream(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("wide_deep", predict_response("wide_deep", {"y": SEED_VALUES}))
    guard = await make_guard(WIDE_DEEP, default_timeout_s=7)
    await guard.stub.Predict(
        predict_request("wide_deep"), metadata=(("x-request-id", "abc"),), timeout=3.0
    )
    # The health probe (every 0.2 s here) may land in between: look at Predicts only.
    seen = [r for r in upstream.received if r.method == "Predict"][-1]
    assert seen.metadata.get("x-request-id") == "abc"
    assert seen.time_remaining is not None and 1.0 < seen.time_remaining <= 3.1
    # Without a client deadline, default_timeout_s applies (gRPC rounds the
    # timeout it sends up, hence the small slack).
    await guard.stub.Predict(predict_request("wide_deep"))
    seen = [r for r in upstream.received if r.method == "Predict"][-1]
    assert seen.time_remaining is not None and 3.1 < seen.time_remaining <= 7.1


async def test_large_messages_pass_within_default_limit(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    # 8 MiB each way: twice gRPC's 4 MiB default, which would break TF Serving traffic.
    big = np.full((2 * 1024 * 1024,), 0.5, dtype=np.float32)
    upstream.reply("plain", predict_response("plain", {"y": big}, encoding="content"))
    guard = await make_guard(WIDE_DEEP)
    req = predict_request("plain", x=np.zeros(2 * 1024 * 1024))
    resp = await guard.stub.Predict(req)
    assert np.array_equal(tf.make_ndarray(resp.outputs["y"]), big)


async def test_message_limit_is_enforced_and_named(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    big = np.zeros((2 * 1024 * 1024,), dtype=np.float32)  # 8 MiB response
    upstream.reply("plain", predict_response("plain", {"y": big}, encoding="content"))
    guard = await make_guard(WIDE_DEEP, max_message_mb=1, max_request_mb=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(predict_request("plain"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_message_mb=1" in err.value.details()

    # A request over max_request_mb is refused before it reaches the upstream.
    def predicts() -> int:
        return sum(r.method == "Predict" for r in upstream.received)

    before = predicts()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(predict_request("plain", x=np.zeros(512 * 1024)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert predicts() == before


# --------------------------------------------------------------- interception


@pytest.mark.parametrize("encoding", ["typed", "content"])
async def test_wide_deep_clamp_threshold_labels(
    upstream: FakeUpstream, make_guard: GuardFactory, encoding: str
) -> None:
    upstream.reply(
        "wide_deep", predict_response("wide_deep", {"output_1": SEED_VALUES}, encoding=encoding)
    )
    guard = await make_guard(WIDE_DEEP)
    resp, trailers = await _predict(guard, predict_request("wide_deep"))
    out = resp.outputs["output_1"]
    # The encoding the upstream used is kept: clients reading .float_val still work.
    if encoding == "typed":
        assert len(out.float_val) == SEED_VALUES.size and not out.tensor_content
        assert len(resp.outputs["output_1_class"].int64_val) == SEED_VALUES.size
    else:
        assert out.tensor_content and not out.float_val
        assert resp.outputs["output_1_class"].tensor_content
    np.testing.assert_array_equal(tf.make_ndarray(out), np.clip(SEED_VALUES, 0, 1))
    classes = tf.make_ndarray(resp.outputs["output_1_class"])
    np.testing.assert_array_equal(classes, (SEED_VALUES > 0.5).astype(np.int64))
    labels = tf.make_ndarray(resp.outputs["output_1_label"])
    assert labels.ravel().tolist() == [b"YES"] * 5 + [b"NO"] * 3
    assert trailers["x-guard-action"] == "clamped"
    assert trailers["x-guard-violations"] == "5"
    assert trailers["x-upstream"] == "tfs"  # the upstream's own trailers survive
    lbl = {"model": "wide_deep", "version": "1", "signature": "serving_default"}
    assert guard.sample("guard_responses_total", {**lbl, "action": "clamped"}) == 1
    assert (
        guard.sample(
            "guard_output_violations_total", {**lbl, "output": "output_1", "kind": "above_max"}
        )
        == 5
    )
    assert guard.sample("guard_output_values_total", {**lbl, "output": "output_1"}) == 8
    hist = {"model": "wide_deep", "signature": "serving_default", "output": "output_1"}
    assert guard.sample("guard_output_value_bucket", {**hist, "le": "1.0"}) == 3
    assert guard.sample("guard_output_value_bucket", {**hist, "le": "1.01"}) == 8
    assert (
        guard.sample(
            "guard_predicted_class_total",
            {
                "model": "wide_deep",
                "signature": "serving_default",
                "output": "output_1",
                "class": "YES",
            },
        )  # fmt: skip
        == 5
    )


async def test_reject_fails_with_internal_and_details(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("wide_deep", predict_response("wide_deep", {"output_1": SEED_VALUES}))
    guard = await make_guard(
        {"models": [{"name": "wide_deep", "outputs": [{"name": "*", "on_violation": "reject"}]}]}
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(predict_request("wide_deep"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "guard: model 'wide_deep' output 'output_1': 5 values above 1.0"
    trailers = tuple(err.value.trailing_metadata())
    assert ("x-guard-action", "rejected") in trailers
    assert ("x-guard-violations", "5") in trailers  # as on every guarded answer (red team)
    lbl = {"model": "wide_deep", "version": "1", "signature": "serving_default"}
    assert guard.sample("guard_responses_total", {**lbl, "action": "rejected"}) == 1
    assert (
        guard.sample(
            "guard_requests_total",
            {"protocol": "grpc", "model": "wide_deep", "method": "Predict", "code": "INTERNAL"},
        )
        == 1
    )


async def test_a_model_spec_sent_twice_is_judged_as_tf_serving_merges_it(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    """Red team: protobuf merges every copy of model_spec, and TF Serving
    served the merged one (wide_deep), while the guard read the first ('x',
    or none at all) and relayed wide_deep's answer unguarded past its reject
    rule."""
    upstream.reply("wide_deep", predict_response("wide_deep", {"output_1": SEED_VALUES}))
    guard = await make_guard(
        {"models": [{"name": "wide_deep", "outputs": [{"name": "*", "on_violation": "reject"}]}]}
    )
    inputs = predict_request("unused", x=[1.0])
    inputs.ClearField("model_spec")

    def spec(name: str) -> bytes:
        return predict_pb2.PredictRequest(model_spec={"name": name}).SerializeToString()

    raw = guard.channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    for request in (
        spec("x") + inputs.SerializeToString() + spec("wide_deep"),
        b"\x0a\x00" + inputs.SerializeToString() + spec("wide_deep"),  # an empty spec first
    ):
        assert predict_pb2.PredictRequest.FromString(request).model_spec.name == "wide_deep"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(request)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "output 'output_1': 5 values above 1.0" in (err.value.details() or "")
    lbl = {"model": "wide_deep", "version": "1", "signature": "serving_default"}
    assert guard.sample("guard_responses_total", {**lbl, "action": "rejected"}) == 2


async def test_observe_returns_upstream_bytes_and_counts(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("wide_deep", predict_response("wide_deep", {"output_1": SEED_VALUES}))
    guard = await make_guard({"models": [{"name": "wide_deep", "outputs": [{"name": "*"}]}]})
    body = predict_request("wide_deep").SerializeToString()
    method = "/tensorflow.serving.PredictionService/Predict"
    call = guard.channel.unary_unary(method)(body)
    via_guard = await call
    trailers = dict(tuple(await call.trailing_metadata()))
    async with grpc.aio.insecure_channel(upstream.address) as direct:
        assert via_guard == await direct.unary_unary(method)(body)
    assert trailers["x-guard-action"] == "observed"
    assert trailers["x-guard-violations"] == "5"


async def test_softmax_argmax_top_k_labels_and_sum_check(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(4, 201)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs[3] *= 1.5  # one broken row
    labels = [f"angle_{i - 100}" for i in range(201)]
    upstream.reply("softmax_201", predict_response("softmax_201", {"probs": probs}))
    guard = await make_guard(
        {
            "models": [
                {
                    "name": "softmax_201",
                    "outputs": [
                        {
                            "name": "probs",
                            "check_sum": True,
                            "argmax": True,
                            "top_k": 3,
                            "labels": labels,
                        },
                    ],
                }
            ]
        }  # fmt: skip
    )
    resp, trailers = await _predict(guard, predict_request("softmax_201"))
    cls = tf.make_ndarray(resp.outputs["probs_class"])
    np.testing.assert_array_equal(cls, probs.argmax(-1))
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["probs_score"]), probs.max(-1))
    top = tf.make_ndarray(resp.outputs["probs_top_k_class"])
    np.testing.assert_array_equal(top, np.argsort(-probs, axis=-1, kind="stable")[:, :3])
    top_labels = tf.make_ndarray(resp.outputs["probs_top_k_label"])
    assert top_labels[0].tolist() == [labels[i].encode() for i in top[0]]
    assert tf.make_ndarray(resp.outputs["probs_label"]).tolist() == [
        labels[i].encode() for i in cls
    ]
    assert trailers["x-guard-action"] == "observed"
    assert trailers["x-guard-violations"] == "1"
    assert (
        guard.sample(
            "guard_output_sum_violations_total",
            {
                "model": "softmax_201",
                "version": "1",
                "signature": "serving_default",
                "output": "probs",
            },
        )  # fmt: skip
        == 1
    )


async def test_output_filter_absent_output_is_skipped(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply(
        "m",
        predict_response("m", {"a": SEED_VALUES, "b": np.array([[0.2]], dtype=np.float32)}),
    )
    guard = await make_guard(
        {"models": [{"name": "m", "outputs": [{"name": "a", "on_violation": "reject"}]}]}
    )
    req = predict_request("m")
    req.output_filter.append("b")
    resp, trailers = await _predict(guard, req)
    assert list(resp.outputs.keys()) == ["b"]
    assert trailers["x-guard-action"] == "clean"


async def test_non_float_outputs_are_untouched(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    ids = np.array([5, 7], dtype=np.int64)
    upstream.reply("m", predict_response("m", {"ids": ids, "p": np.array([0.5], np.float32)}))
    guard = await make_guard(
        {"models": [{"name": "m", "outputs": [{"name": "*", "argmax": True}]}]}
    )
    resp, _ = await _predict(guard, predict_request("m"))
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["ids"]), ids)
    assert "ids_class" not in resp.outputs and "p_class" in resp.outputs


async def test_label_count_mismatch_is_internal(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    upstream.reply("m", predict_response("m", {"p": np.full((2, 3), 1 / 3, np.float32)}))
    guard = await make_guard(
        {
            "models": [
                {"name": "m", "outputs": [{"name": "p", "argmax": True, "labels": ["a", "b"]}]}
            ]
        }
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(predict_request("m"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "2 labels configured but the output has 3 classes" in err.value.details()


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff\xff", b"\x0a\x80\x80", b"not a protobuf at all \x00\x01"],
)
async def test_undecodable_upstream_response_is_internal_and_counted(
    make_guard: GuardFactory, payload: bytes
) -> None:
    fake = await start_upstream(FakeUpstream())
    fake.reply("wide_deep", payload)
    server = fake.server
    assert server is not None
    try:
        guard = await make_guard(WIDE_DEEP, upstream=fake.address)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await guard.stub.Predict(predict_request("wide_deep"))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert err.value.details().startswith("guard: cannot decode PredictResponse from upstream")
        assert guard.sample("guard_decode_errors_total", {"model": "wide_deep"}) == 1
        # The guard keeps serving.
        status = await guard.model_stub.GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(
                model_spec={"name": "wide_deep"}  # type: ignore[arg-type]
            )
        )
        assert status.model_version_status[0].version == 1
    finally:
        await server.stop(0)


async def test_unknown_model_names_do_not_create_series(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    guard = await make_guard(WIDE_DEEP)
    for i in range(50):
        with pytest.raises(grpc.aio.AioRpcError):
            await guard.stub.Predict(predict_request(f"made-up-{i}"))
    text = scrape(guard.metrics_url)
    models = {s.labels.get("model") for f in text for s in f.samples if "model" in s.labels}
    assert models <= {"wide_deep", "__other__"}
    assert (
        guard.sample(
            "guard_requests_total",
            {"protocol": "grpc", "model": "__other__", "method": "Predict", "code": "NOT_FOUND"},
        )
        == 50
    )


# ---------------------------------------------------------------------- health


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(resp.status)


async def test_an_upstreams_own_unavailable_does_not_mark_it_down(
    make_guard: GuardFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Found (red team): any call the upstream answered UNAVAILABLE marked it
    down, and the guard NOT_SERVING (its pod unready), until the next probe,
    though it answered. Such a call now makes the probe run at once."""
    fake = await start_upstream(FakeUpstream())
    fake.fail("wide_deep", grpc.StatusCode.UNAVAILABLE, "model warming up")
    guard = await make_guard(WIDE_DEEP, upstream=fake.address, health_check_interval_s=60.0)
    try:
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await guard.stub.Predict(predict_request("wide_deep"), timeout=5)
            assert (err.value.code(), err.value.details()) == (
                grpc.StatusCode.UNAVAILABLE,
                "model warming up",
            )
            assert await _health(guard.channel) == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(0.2)  # the probes the failures asked for have answered
        assert await _health(guard.channel) == health_pb2.HealthCheckResponse.SERVING
        assert guard.sample("guard_upstream_up") == 1
        assert not [r for r in caplog.records if "is DOWN" in r.getMessage()]
    finally:
        assert fake.server is not None
        await fake.server.stop(0)


async def test_an_upstream_the_guard_cannot_reach_is_named_as_the_guard_s(
    make_guard: GuardFactory,
) -> None:
    """Found (a red-team pass): the client got gRPC's words about the guard's
    own channel ('failed to connect to all addresses'), which read as though
    its own connection, to the guard, had failed."""
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    # A name that does not resolve is worded otherwise by gRPC (the same red team).
    for upstream in (address, "nonexistent-tf-serving.invalid:8500"):
        guard = await make_guard(WIDE_DEEP, upstream=upstream)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await guard.stub.Predict(predict_request("wide_deep"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        details = err.value.details() or ""
        assert details.startswith(f"guard: cannot reach the upstream {upstream}: "), details
        labels = {"protocol": "grpc", "model": "wide_deep", "method": "Predict"}
        assert guard.sample("guard_requests_total", {**labels, "code": "UNAVAILABLE"}) == 1


async def test_an_upstream_s_own_words_for_a_channel_failure_are_passed_on(
    make_guard: GuardFactory,
) -> None:
    """Found (a red-team pass): an upstream that answered UNAVAILABLE in gRPC's
    words for a channel failure (a proxy behind it that could not reach its
    own upstream) was taken for the guard's channel failing."""
    fake = await start_upstream(FakeUpstream())
    words = "failed to connect to all addresses; last error: ipv4:10.9.9.9:8500: refused"
    fake.fail("wide_deep", grpc.StatusCode.UNAVAILABLE, words)
    guard = await make_guard(WIDE_DEEP, upstream=fake.address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await guard.stub.Predict(predict_request("wide_deep"), timeout=5)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE, words)
    finally:
        assert fake.server is not None
        await fake.server.stop(0)


async def test_health_follows_upstream(make_guard: GuardFactory) -> None:
    fake = await start_upstream(FakeUpstream())
    server = fake.server
    assert server is not None
    guard = await make_guard(WIDE_DEEP, upstream=fake.address)
    assert await _health(guard.channel) == health_pb2.HealthCheckResponse.SERVING
    assert guard.sample("guard_upstream_up") == 1
    await server.stop(0)
    for _ in range(100):  # bounded: 100 x 0.05 s
        if await _health(guard.channel) == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.05)
    assert await _health(guard.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert guard.sample("guard_upstream_up") == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.stub.Predict(predict_request("wide_deep"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # The upstream comes back on the same port: the guard recovers by itself.
    fake.address = f"127.0.0.1:{fake.address.rsplit(':', 1)[1]}"
    await start_upstream(fake)
    server = fake.server
    assert server is not None
    try:
        fake.reply("wide_deep", predict_response("wide_deep", {"y": SEED_VALUES}))
        for _ in range(100):
            if await _health(guard.channel) == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)
        assert await _health(guard.channel) == health_pb2.HealthCheckResponse.SERVING
        resp = await guard.stub.Predict(predict_request("wide_deep"), timeout=5)
        assert "y_class" in resp.outputs
    finally:
        await server.stop(0)


async def test_a_model_s_new_versions_keep_their_own_series(
    upstream: FakeUpstream, make_guard: GuardFactory
) -> None:
    """TF Serving loads a model's new versions without a restart, and the
    256 ``version`` values, shared by every model, filled up: a new version
    then read ``__other__``. A model keeps its last 8 versions' series; a
    version that comes back after its series went gets them again (its
    plan, made before, let go of the old ones)."""
    guard = await make_guard(WIDE_DEEP)
    for version in [*range(1, 11), 1]:
        upstream.reply("wide_deep", predict_response("wide_deep", {"y": SEED_VALUES},
                                                     version=version))  # fmt: skip
        await _predict(guard, predict_request("wide_deep", x=[1.0]))
    counted = samples_by(
        guard.metrics_url, "guard_output_values_total", "version", model="wide_deep"
    )
    assert counted == {**{str(v): 8.0 for v in range(4, 11)}, "1": 8.0}
