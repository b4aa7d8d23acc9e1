"""The local backend through the official tensorflow_serving stubs, both encodings."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from guard.dev.backend import BackendProcess, start_backend
from guard.dev.models import MODEL_NAMES, demo_inputs, random_inputs

from .conftest import ReferencePredict

REPO_ROOT = Path(__file__).resolve().parents[3]
PredictionStub = Any  # prediction_service_pb2_grpc.PredictionServiceStub (untyped)


def _request(
    model: str,
    inputs: dict[str, np.ndarray],
    *,
    signature: str = "",
    version: int | None = None,
    output_filter: tuple[str, ...] = (),
    typed_inputs: bool = False,
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for alias, array in inputs.items():
        proto = tf.make_tensor_proto(array)
        if typed_inputs and proto.dtype == types_pb2.DT_FLOAT:
            proto.ClearField("tensor_content")
            proto.float_val.extend(array.ravel().tolist())
        request.inputs[alias].CopyFrom(proto)
    request.output_filter.extend(output_filter)
    return request


def _error(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    return info.value


def _assert_encoding(proto: tensor_pb2.TensorProto, backend: BackendProcess, field: str) -> None:
    content_mode = "--tensor-content" in list(backend.process.args)  # type: ignore[arg-type]
    if content_mode and proto.dtype != types_pb2.DT_STRING:
        assert proto.tensor_content, field
        assert len(getattr(proto, field)) == 0
    else:
        assert not proto.tensor_content
        count = int(np.prod([d.size for d in proto.tensor_shape.dim]))
        per_value = 2 if proto.dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128) else 1
        assert len(getattr(proto, field)) == count * per_value


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("typed_inputs", [False, True], ids=["content-in", "typed-in"])
def test_predict_matches_the_model_in_process(
    name: str,
    typed_inputs: bool,
    backend: BackendProcess,
    prediction_stub: PredictionStub,
    reference_predict: ReferencePredict,
) -> None:
    for inputs in (demo_inputs(name), random_inputs(name, 64, seed=3)):
        response = prediction_stub.Predict(
            _request(name, inputs, typed_inputs=typed_inputs), timeout=60
        )
        expected = reference_predict(name, inputs)
        assert set(response.outputs) == set(expected)
        for alias, want in expected.items():
            proto = response.outputs[alias]
            _assert_encoding(proto, backend, "float_val")
            got = tf.make_ndarray(proto)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert response.model_spec.name == name
        assert response.model_spec.signature_name == "serving_default"
        assert response.model_spec.version.value == 1


def test_every_output_dtype_round_trips(
    backend: BackendProcess, prediction_stub: PredictionStub, reference_predict: ReferencePredict
) -> None:
    x = {"x": np.array([[0.25, 0.5, 0.75], [1.5, -2.0, 0.0]], np.float32)}
    response = prediction_stub.Predict(_request("dtypes", x), timeout=60)
    expected = reference_predict("dtypes", x)
    fields = {
        "float": "float_val",
        "double": "double_val",
        "half": "half_val",
        "int64": "int64_val",
        "int32": "int_val",
        "uint8": "int_val",
        "bool": "bool_val",
        "string": "string_val",
        "total": "float_val",
    }
    assert set(response.outputs) == set(fields)
    for alias, field in fields.items():
        proto = response.outputs[alias]
        _assert_encoding(proto, backend, field)
        got = tf.make_ndarray(proto)
        assert got.shape == expected[alias].shape, alias
        np.testing.assert_array_equal(got, expected[alias])
    assert list(response.outputs["total"].tensor_shape.dim) == []
    assert response.outputs["total"].HasField("tensor_shape")


def test_output_filter_returns_only_the_named_outputs(prediction_stub: PredictionStub) -> None:
    x = {"x": np.ones((2, 3), np.float32)}
    response = prediction_stub.Predict(
        _request("dtypes", x, output_filter=("int64", "double")), timeout=60
    )
    assert set(response.outputs) == {"int64", "double"}
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["double"]), 2 * x["x"])

    err = _error(prediction_stub.Predict, _request("dtypes", x, output_filter=("nope",)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "output tensor alias not found in signature: nope Outputs expected to be in the set "
        "{bool,double,float,half,int32,int64,string,total,uint8}."
    )
    err = _error(prediction_stub.Predict, _request("dtypes", x, output_filter=("half", "half")))
    assert err.details() == "duplicate output tensor alias: half"


def test_fill_convention_input(
    prediction_stub: PredictionStub, reference_predict: ReferencePredict
) -> None:
    request = _request("binary_mlp", {})
    proto = request.inputs["features"]
    proto.dtype = types_pb2.DT_FLOAT
    proto.tensor_shape.dim.add(size=3)
    proto.tensor_shape.dim.add(size=8)
    proto.float_val.append(0.5)
    response = prediction_stub.Predict(request, timeout=60)
    want = reference_predict("binary_mlp", {"features": np.full((3, 8), 0.5, np.float32)})
    np.testing.assert_array_equal(
        tf.make_ndarray(response.outputs["probability"]), want["probability"]
    )


def test_version_selection(
    prediction_stub: PredictionStub, reference_predict: ReferencePredict
) -> None:
    mlp_inputs = demo_inputs("binary_mlp")
    v1 = prediction_stub.Predict(_request("versioned", mlp_inputs, version=1), timeout=60)
    assert v1.model_spec.version.value == 1
    np.testing.assert_array_equal(
        tf.make_ndarray(v1.outputs["probability"]),
        reference_predict("binary_mlp", mlp_inputs)["probability"],
    )
    # The latest version (7) is softmax_201: it serves by default.
    image = demo_inputs("softmax_201")
    latest = prediction_stub.Predict(_request("versioned", image), timeout=60)
    assert latest.model_spec.version.value == 7
    assert set(latest.outputs) == {"probabilities"}

    err = _error(prediction_stub.Predict, _request("versioned", mlp_inputs, version=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "Servable not found for request: Specific(versioned, 5)"


@pytest.mark.parametrize(
    ("mutate", "code", "details"),
    [
        (
            lambda r: r.model_spec.__setattr__("name", "nope"),
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(nope)",
        ),
        (
            lambda r: r.model_spec.__setattr__("name", ""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ModelSpec has no name specified.",
        ),
        (
            lambda r: r.ClearField("model_spec"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Missing ModelSpec",
        ),
        (
            lambda r: r.model_spec.__setattr__("signature_name", "nope"),
            grpc.StatusCode.FAILED_PRECONDITION,
            'Serving signature key "nope" not found.',
        ),
        (
            lambda r: r.model_spec.__setattr__("version_label", "stable"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Unrecognized servable version label: stable",
        ),
        (
            lambda r: r.inputs.pop("deep"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input size does not match signature: 1!=2 len({wide}) != len({deep,wide}). "
            "Sent extra: {}. Missing but required: {deep}.",
        ),
        (
            lambda r: r.inputs["extra"].CopyFrom(tf.make_tensor_proto(np.zeros(2, np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input size does not match signature: 3!=2 len({deep,extra,wide}) != "
            "len({deep,wide}). Sent extra: {extra}. Missing but required: {}.",
        ),
        (
            lambda r: r.inputs["Wide"].CopyFrom(r.inputs.pop("wide")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input tensor alias not found in signature: Wide. "
            "Inputs expected to be in the set {deep,wide}.",
        ),
        (
            lambda r: r.inputs["wide"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 4), np.int64))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Expects arg[1] to be float but int64 is provided",
        ),
        (
            lambda r: r.inputs["deep"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 16, 4)))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Expects arg[0] to be float but double is provided",
        ),
        (
            lambda r: r.inputs["wide"].__setattr__("tensor_content", b"\0" * 5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor parsing error: wide",
        ),
        (
            lambda r: r.inputs["wide"].CopyFrom(
                tf.make_tensor_proto(np.zeros((12, 5), np.float32))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input wide has shape [12,5] but signature serving_default expects [-1,4] "
            "(-1: any size)",
        ),
    ],
    ids=[
        "unknown-model",
        "empty-name",
        "no-model-spec",
        "unknown-signature",
        "version-label",
        "missing-input",
        "extra-input",
        "wrong-alias",
        "wrong-dtype-wide",
        "wrong-dtype-deep",
        "bad-tensor-content",
        "wrong-shape",
    ],
)
def test_predict_errors_follow_tf_serving(
    mutate: Any, code: grpc.StatusCode, details: str, prediction_stub: PredictionStub
) -> None:
    request = _request("wide_deep", demo_inputs("wide_deep"))
    mutate(request)
    err = _error(prediction_stub.Predict, request)
    assert err.code() == code
    assert err.details() == details


def _saved_signature_defs(base: Path) -> dict[str, Any]:
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((base / "1" / "saved_model.pb").read_bytes())
    return dict(saved.meta_graphs[0].signature_def)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_get_model_metadata_returns_the_signature_def_map(
    name: str, prediction_stub: PredictionStub, seed_models: dict[str, Path]
) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = name
    response = prediction_stub.GetModelMetadata(request, timeout=60)
    assert response.model_spec.name == name
    assert response.model_spec.version.value == 1
    assert not response.model_spec.signature_name
    packed = response.metadata["signature_def"]
    assert packed.type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert packed.Unpack(signature_map)
    assert dict(signature_map.signature_def) == _saved_signature_defs(seed_models[name])
    assert "serving_default" in signature_map.signature_def


def test_get_model_metadata_errors(prediction_stub: PredictionStub) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "wide_deep"
    err = _error(prediction_stub.GetModelMetadata, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "GetModelMetadataRequest must specify at least one metadata_field"
    request.metadata_field.append("signature_def")
    request.model_spec.name = "nope"
    err = _error(prediction_stub.GetModelMetadata, request)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "Servable not found for request: Latest(nope)"
    request.model_spec.name = "versioned"
    response = prediction_stub.GetModelMetadata(request, timeout=60)
    assert response.model_spec.version.value == 7


def test_get_model_status(model_stub: model_service_pb2_grpc.ModelServiceStub) -> None:
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    for name in MODEL_NAMES:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        response = model_stub.GetModelStatus(request, timeout=60)
        assert [(s.version, s.state) for s in response.model_version_status] == [(1, available)]
        assert response.model_version_status[0].status.error_code == 0

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "versioned"
    response = model_stub.GetModelStatus(request, timeout=60)
    assert [(s.version, s.state) for s in response.model_version_status] == [
        (7, available),
        (1, available),
    ]
    request.model_spec.version.value = 3
    err = _error(model_stub.GetModelStatus, request)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "Could not find version 3 of model versioned"
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "nope"
    err = _error(model_stub.GetModelStatus, request)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "Could not find any versions of model nope"


def test_unsupported_methods_are_unimplemented(
    prediction_stub: PredictionStub, model_stub: model_service_pb2_grpc.ModelServiceStub
) -> None:
    calls = [
        (prediction_stub.Classify, classification_pb2.ClassificationRequest(), "Classify"),
        (prediction_stub.Regress, regression_pb2.RegressionRequest(), "Regress"),
        (prediction_stub.MultiInference, inference_pb2.MultiInferenceRequest(), "MultiInference"),
        (
            model_stub.HandleReloadConfigRequest,
            model_management_pb2.ReloadConfigRequest(),
            "HandleReloadConfigRequest",
        ),
    ]
    for call, request, method in calls:
        err = _error(call, request)
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert err.details().startswith(f"{method} is not implemented by the guard's local backend")


def test_concurrent_predicts_all_answer_correctly(
    prediction_stub: PredictionStub, reference_predict: ReferencePredict
) -> None:
    batches = [random_inputs("softmax_201", 16, seed=s) for s in range(12)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [
            pool.submit(prediction_stub.Predict, _request("softmax_201", b), timeout=120)
            for b in batches
        ]
        responses = [f.result() for f in futures]
    for batch, response in zip(batches, responses, strict=True):
        want = reference_predict("softmax_201", batch)["probabilities"]
        np.testing.assert_allclose(
            tf.make_ndarray(response.outputs["probabilities"]), want, rtol=1e-6, atol=1e-7
        )


def test_messages_above_grpc_default_4mib(prediction_stub: PredictionStub) -> None:
    x = np.random.RandomState(0).uniform(size=(400_000, 3)).astype(np.float32)  # 4.8 MB
    response = prediction_stub.Predict(
        _request("dtypes", {"x": x}, output_filter=("double",)), timeout=120
    )
    np.testing.assert_array_equal(
        tf.make_ndarray(response.outputs["double"]), 2.0 * x.astype(np.float64)
    )


def test_logs_the_device(backend: BackendProcess) -> None:
    log = backend.log_text()
    expected = "running on GPU" if tf.config.list_physical_devices("GPU") else "running on CPU"
    assert expected in log


def test_port_file_and_graceful_stop(extra_models: dict[str, Path], tmp_path: Path) -> None:
    backend = start_backend({"dtypes": extra_models["dtypes"]}, log_path=tmp_path / "log")
    try:
        with grpc.insecure_channel(backend.address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Predict(
                _request("dtypes", {"x": np.ones((1, 3), np.float32)}), timeout=60
            )
            assert tf.make_ndarray(response.outputs["total"]) == 3.0
        backend.process.send_signal(signal.SIGTERM)
        assert backend.process.wait(timeout=60) == 0
    finally:
        backend.stop()
    assert "stopping" in (tmp_path / "log").read_text()


def _refused(args: list[str], message: str) -> None:
    """``python -m guard.dev.backend ARGS`` exits 2 with ``message``, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "guard.dev.backend", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "wide_deep"], "expected NAME=BASE_PATH"),
        (["--model", "m=/nonexistent/base"], "is not a directory"),
    ],
)
def test_cli_rejects_bad_model_arguments(args: list[str], message: str) -> None:
    _refused(args, message)


def test_cli_rejects_a_damaged_saved_model_in_one_line(tmp_path: Path) -> None:
    """Found (a red-team pass): a saved_model.pb that is not one was a traceback."""
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "saved_model.pb").write_bytes(b"junk\n")
    _refused(["--model", f"m={tmp_path / 'm'}"], "saved_model.pb: not a SavedModel")


def test_cli_rejects_a_base_path_without_versions(tmp_path: Path) -> None:
    (tmp_path / "empty" / "not-a-version").mkdir(parents=True)
    _refused(["--model", f"m={tmp_path / 'empty'}"], "no version directory")
