"""The local backend's REST API, over real HTTP on an ephemeral port.

One backend process serves the seed models, the ``versioned``/``dtypes`` extra
models and ``rest_multi`` (several outputs of several dtypes, NaN/±Inf, bytes,
and three signatures), on gRPC and REST at once, so every REST answer can be
checked against the gRPC side for the same inputs. Expected texts and status
codes are TF Serving's (see the notes in guard/dev/backend/rest.py).
"""

from __future__ import annotations

import concurrent.futures
import gzip
import http.client
import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from guard.dataplane.codec.restjson import read_predict_response
from guard.dev.backend import BackendProcess, start_backend
from guard.dev.models import demo_inputs, random_inputs

pytestmark = pytest.mark.tf


class _RestModel(tf.Module):
    """Several outputs of every dtype the REST writer handles, and two more signatures."""

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {
            "scores": x * 0.5,
            "total": tf.cast(tf.reduce_sum(x, axis=1), tf.float64) / 3.0,
            "argmax": tf.argmax(x, axis=1),
            "positive": x > 0,
            "label": tf.strings.as_string(x[:, 0], precision=1),
            "label_bytes": tf.strings.as_string(x[:, 1], precision=1),
            "special": x / (x - x),  # +Inf, -Inf and NaN for x > 0, x < 0, x == 0
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="v")])
    def halve(self, v: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"half": v / 2.0}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float16, name="h")])
    def halfin(self, h: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"widened": tf.cast(h, tf.float32)}

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 2], tf.float32, name="a"),
            tf.TensorSpec([None], tf.int64, name="b"),
        ]
    )
    def pair(self, a: tf.Tensor, b: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"sum": tf.reduce_sum(a, axis=1) + tf.cast(b, tf.float32)}


@pytest.fixture(scope="module")
def rest_models(
    seed_models: dict[str, Path],
    extra_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("rest-models") / "rest_multi"
    module = _RestModel()
    tf.saved_model.save(
        module,
        str(base / "1"),
        signatures={
            "serving_default": module.serve.get_concrete_function(),
            "halve": module.halve.get_concrete_function(),
            "pair": module.pair.get_concrete_function(),
            "halfin": module.halfin.get_concrete_function(),
        },
    )
    return {**seed_models, **extra_models, "rest_multi": base}


@pytest.fixture(scope="module")
def rest_backend(rest_models: dict[str, Path]) -> Iterator[BackendProcess]:
    backend = start_backend(rest_models, rest_listen="127.0.0.1:0")
    yield backend
    backend.stop()


class Reply:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.reason = response.reason
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.body = response.read()

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    backend: BackendProcess,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    assert backend.rest_address is not None
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection = http.client.HTTPConnection(backend.rest_address, timeout=120)
    try:
        connection.request(method, path, body=data, headers=headers or {})
        return Reply(connection.getresponse())
    finally:
        connection.close()


def grpc_predict(
    backend: BackendProcess, model: str, inputs: dict[str, np.ndarray], signature: str = ""
) -> dict[str, np.ndarray]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for alias, array in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(array))
    options = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    with grpc.insecure_channel(backend.address, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=120)
    return {alias: tf.make_ndarray(t) for alias, t in response.outputs.items()}


def rows(inputs: dict[str, np.ndarray]) -> list[Any]:
    """Row format: one object per instance, or bare values with a single input."""
    batch = len(next(iter(inputs.values())))
    if len(inputs) == 1:
        return next(iter(inputs.values())).tolist()  # type: ignore[no-any-return]
    return [{alias: a[i].tolist() for alias, a in inputs.items()} for i in range(batch)]


def assert_float32_exact(text_values: Any, expected: np.ndarray) -> None:
    got = np.asarray(text_values, dtype=np.float64).astype(np.float32)
    assert got.shape == expected.shape
    assert got.tobytes() == expected.astype(np.float32).tobytes()


MULTI_X = np.array([[1.5, -2.0, 0.0], [0.1, 0.2, -0.3], [7.0, 1e-5, 3.0]], np.float32)


# --- predict, both formats ------------------------------------------------


def test_row_single_output_is_the_grpc_float32_bit_for_bit(rest_backend: BackendProcess) -> None:
    inputs = demo_inputs("binary_mlp")
    reply = call(rest_backend, "POST", "/v1/models/binary_mlp:predict", {"instances": rows(inputs)})
    assert reply.status == 200 and reply.reason == "OK"
    assert reply.headers["content-type"] == "application/json"
    expected = grpc_predict(rest_backend, "binary_mlp", inputs)["probability"]
    assert set(reply.json()) == {"predictions"}
    assert_float32_exact(reply.json()["predictions"], expected)
    # TF Serving's layout: single-line instances, the list closed on its own line.
    assert reply.body.startswith(b'{\n    "predictions": [[')
    assert reply.body.endswith(b"]\n    ]\n}")


def test_columnar_single_output(rest_backend: BackendProcess) -> None:
    inputs = demo_inputs("wide_deep")
    body = {"inputs": {alias: a.tolist() for alias, a in inputs.items()}}
    reply = call(rest_backend, "POST", "/v1/models/wide_deep:predict", body)
    assert reply.status == 200, reply.body
    expected = grpc_predict(rest_backend, "wide_deep", inputs)["output_1"]
    assert set(reply.json()) == {"outputs"}
    assert_float32_exact(reply.json()["outputs"], expected)
    assert reply.body.startswith(b'{\n    "outputs": [\n        [\n            ')


def test_row_objects_for_several_inputs(rest_backend: BackendProcess) -> None:
    inputs = demo_inputs("wide_deep")
    reply = call(rest_backend, "POST", "/v1/models/wide_deep:predict", {"instances": rows(inputs)})
    assert reply.status == 200, reply.body
    expected = grpc_predict(rest_backend, "wide_deep", inputs)["output_1"]
    assert_float32_exact(reply.json()["predictions"], expected)


def test_a_large_batch_reads_back_exactly_with_restjson(rest_backend: BackendProcess) -> None:
    inputs = random_inputs("softmax_201", 64, seed=3)
    reply = call(
        rest_backend, "POST", "/v1/models/softmax_201:predict", {"instances": rows(inputs)}
    )
    assert reply.status == 200
    expected = grpc_predict(rest_backend, "softmax_201", inputs)["probabilities"]
    read = read_predict_response(reply.body, "row").outputs[None]
    assert read.kind == "float32"
    assert read.values.tobytes() == expected.tobytes()
    assert_float32_exact(reply.json()["predictions"], expected)


def test_several_outputs_row(rest_backend: BackendProcess) -> None:
    reply = call(
        rest_backend, "POST", "/v1/models/rest_multi:predict", {"instances": MULTI_X.tolist()}
    )
    assert reply.status == 200, reply.body
    expected = grpc_predict(rest_backend, "rest_multi", {"x": MULTI_X})
    predictions = reply.json()["predictions"]
    assert len(predictions) == 3
    assert list(predictions[0]) == sorted(expected)  # one object per instance
    assert_float32_exact([p["scores"] for p in predictions], expected["scores"])
    assert [p["total"] for p in predictions] == expected["total"].tolist()  # float64 exact
    assert [p["argmax"] for p in predictions] == expected["argmax"].tolist()
    assert [p["positive"] for p in predictions] == expected["positive"].tolist()
    assert [p["label"] for p in predictions] == [b.decode() for b in expected["label"]]
    assert [p["label_bytes"] for p in predictions] == [
        {"b64": "LTIuMA=="},
        {"b64": "MC4y"},
        {"b64": "MC4w"},
    ]


def test_several_outputs_columnar(rest_backend: BackendProcess) -> None:
    reply = call(
        rest_backend, "POST", "/v1/models/rest_multi:predict", {"inputs": MULTI_X.tolist()}
    )
    assert reply.status == 200, reply.body
    expected = grpc_predict(rest_backend, "rest_multi", {"x": MULTI_X})
    outputs = reply.json()["outputs"]
    assert sorted(outputs) == sorted(expected)  # an object keyed by alias
    assert_float32_exact(outputs["scores"], expected["scores"])
    assert outputs["total"] == expected["total"].tolist()
    assert outputs["label_bytes"] == [{"b64": "LTIuMA=="}, {"b64": "MC4y"}, {"b64": "MC4w"}]


def test_nan_and_infinity_are_bare_tokens(rest_backend: BackendProcess) -> None:
    reply = call(
        rest_backend, "POST", "/v1/models/rest_multi:predict", {"instances": MULTI_X.tolist()}
    )
    line = '"special": [Infinity, -Infinity, NaN]'
    assert line in reply.body.decode()
    assert '"NaN"' not in reply.body.decode() and '"Infinity"' not in reply.body.decode()
    special = reply.json()["predictions"][0]["special"]
    assert special[0] == math.inf and special[1] == -math.inf and math.isnan(special[2])
    read = read_predict_response(reply.body, "row").outputs["special"].values
    assert np.isposinf(read[0, 0]) and np.isneginf(read[0, 1]) and np.isnan(read[0, 2])


def test_signature_name_selects_the_signature(rest_backend: BackendProcess) -> None:
    body = {"signature_name": "halve", "instances": [1.0, 3.0, 0.5]}
    reply = call(rest_backend, "POST", "/v1/models/rest_multi:predict", body)
    assert reply.status == 200, reply.body
    assert reply.json() == {"predictions": [0.5, 1.5, 0.25]}
    assert reply.body == b'{\n    "predictions": [0.5, 1.5, 0.25\n    ]\n}'


def test_named_inputs_in_both_formats(rest_backend: BackendProcess) -> None:
    a = [[1.0, 2.0], [3.0, 4.0]]
    row = {"signature_name": "pair", "instances": [{"a": a[0], "b": 10}, {"a": a[1], "b": 20}]}
    columnar = {"signature_name": "pair", "inputs": {"a": a, "b": [10, 20]}}
    assert call(rest_backend, "POST", "/v1/models/rest_multi:predict", row).json() == {
        "predictions": [13.0, 27.0]
    }
    assert call(rest_backend, "POST", "/v1/models/rest_multi:predict", columnar).json() == {
        "outputs": [13.0, 27.0]
    }


# --- versions, labels, status, metadata ------------------------------------


def test_versions_in_the_path(rest_backend: BackendProcess) -> None:
    mlp, softmax = demo_inputs("binary_mlp"), demo_inputs("softmax_201")
    v1 = call(
        rest_backend, "POST", "/v1/models/versioned/versions/1:predict", {"inputs": rows(mlp)}
    )
    v7 = call(
        rest_backend, "POST", "/v1/models/versioned/versions/7:predict", {"inputs": rows(softmax)}
    )
    latest = call(rest_backend, "POST", "/v1/models/versioned:predict", {"inputs": rows(softmax)})
    assert np.asarray(v1.json()["outputs"]).shape == (10, 1)
    assert np.asarray(v7.json()["outputs"]).shape == (6, 201)
    assert latest.body == v7.body
    missing = call(rest_backend, "POST", "/v1/models/versioned/versions/3:predict", {"inputs": [1]})
    assert missing.status == 404
    assert missing.json() == {"error": "Servable not found for request: Specific(versioned, 3)"}


def test_labels_are_rejected_like_grpc_but_status_ignores_them(
    rest_backend: BackendProcess,
) -> None:
    predict = call(rest_backend, "POST", "/v1/models/versioned/labels/stable:predict", {})
    assert predict.status == 400
    assert predict.json() == {"error": "Unrecognized servable version label: stable"}
    metadata = call(rest_backend, "GET", "/v1/models/versioned/labels/stable/metadata")
    assert metadata.status == 400
    status = call(rest_backend, "GET", "/v1/models/versioned/labels/stable")
    assert status.status == 200  # GetModelStatus never looks at version_label
    assert [v["version"] for v in status.json()["model_version_status"]] == ["7", "1"]


def test_model_status(rest_backend: BackendProcess) -> None:
    reply = call(rest_backend, "GET", "/v1/models/binary_mlp")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    one = call(rest_backend, "GET", "/v1/models/versioned/versions/7")
    assert [v["version"] for v in one.json()["model_version_status"]] == ["7"]
    gone = call(rest_backend, "GET", "/v1/models/versioned/versions/3")
    assert (gone.status, gone.json()) == (
        404,
        {"error": "Could not find version 3 of model versioned"},
    )
    unknown = call(rest_backend, "GET", "/v1/models/nope")
    assert (unknown.status, unknown.json()) == (
        404,
        {"error": "Could not find any versions of model nope"},
    )


def test_model_metadata(rest_backend: BackendProcess) -> None:
    reply = call(rest_backend, "GET", "/v1/models/rest_multi/metadata")
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert doc["model_spec"] == {"name": "rest_multi", "signature_name": "", "version": "1"}
    signatures = doc["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "halve", "pair", "__saved_model_init_op"} <= set(signatures)
    scores = signatures["serving_default"]["outputs"]["scores"]
    assert scores["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in scores["tensor_shape"]["dim"]] == ["-1", "3"]
    assert call(rest_backend, "GET", "/v1/models/nope/metadata").status == 404


# --- errors: texts and status codes ------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("POST", "/v1/models/nope:predict", b'{"instances": [1]}', 404,
         "Servable not found for request: Latest(nope)"),
        ("POST", "/v1/models/binary_mlp:predict", b"", 400,
         "JSON Parse error: The document is empty"),
        ("POST", "/v1/models/binary_mlp:predict", b'{"instances": [[1, 2]', 400,
         "JSON Parse error: Missing a comma or ']' after an array element. at offset: 21"),
        ("POST", "/v1/models/binary_mlp:predict", b"instances = [1, 2]", 400,
         "JSON Parse error: Invalid value. at offset: 0"),
        ("POST", "/v1/models/nope:predict", b"{", 400,  # the body is read before the model
         "JSON Parse error: Missing a name for object member. at offset: 1"),
        ("POST", "/v1/models/binary_mlp:predict", b'{"signature_name": "nope", "instances": [1]}',
         400, 'Serving signature name: "nope" not found in signature def'),
        ("POST", "/v1/models/binary_mlp:predict", b'{"signature_name": 5}', 400,
         "JSON Value: {\n    \"signature_name\": 5\n} not formatted correctly. "
         "'signature_name' key must be a string value."),
        ("POST", "/v1/models/binary_mlp:predict", b"[1]", 400, "JSON Value: [1] Is not object"),
        ("POST", "/v1/models/binary_mlp:predict", b"{}", 400,
         "Missing 'inputs' or 'instances' key"),
        ("POST", "/v1/models/binary_mlp:predict", b'{"instances": [["a"]]}', 400,
         "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: "
         'JSON Value: "a" Type: String is not of expected type: float'),
        ("POST", "/v1/models/rest_multi:predict",
         b'{"signature_name": "__saved_model_init_op", "instances": [1]}', 400,
         "Failed to get input map for signature: __saved_model_init_op"),
        ("GET", "/v1/models/binary_mlp:predict", None, 400,
         "Malformed request: GET /v1/models/binary_mlp:predict"),
        ("PUT", "/v1/models/binary_mlp", b"{}", 400,
         "Malformed request: PUT /v1/models/binary_mlp"),
        ("POST", "/v1/models/binary_mlp:predict?x=1", b'{"instances": [1]}', 400,
         "Malformed request: POST /v1/models/binary_mlp:predict?x=1"),
        ("GET", "/v1/models", None, 400, "Missing model name in request."),
        ("POST", "/v1/models/dtypes:predict", b'{"inputs": [[1, 2, 3]]}', 400,
         "Failed to write JSON value for tensor type: half"),
        ("POST", "/v1/models/dtypes:predict", b'{"instances": [[1, 2, 3]]}', 400,
         "Tensor name: total has no shape information "),
        ("POST", "/v1/models/binary_mlp:classify", b'{"examples": [{"x": 1}]}', 501,
         "Classify is not implemented by the guard's local backend, which serves Predict, "
         "GetModelMetadata and GetModelStatus only; use :predict, or TensorFlow Serving for "
         "tf.Example"),
    ],
)  # fmt: skip
def test_errors(
    rest_backend: BackendProcess,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    error: str,
) -> None:
    reply = call(rest_backend, method, path, body)
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"error": error}
    assert reply.body == ('{\n    "error": ' + json.dumps(error) + "\n}").encode()


def test_a_version_that_overflows_int64_gets_an_empty_400(rest_backend: BackendProcess) -> None:
    path = "/v1/models/binary_mlp/versions/99999999999999999999:predict"
    reply = call(rest_backend, "POST", path, b"{}")
    assert (reply.status, reply.body) == (400, b"")
    assert reply.headers["content-type"] == "application/json"


def test_paths_outside_v1_get_libevents_404_page(rest_backend: BackendProcess) -> None:
    reply = call(rest_backend, "GET", "/v2/models/binary_mlp")
    assert reply.status == 404
    assert reply.headers["content-type"] == "text/html"
    assert b"<TITLE>404 Not Found</TITLE>" in reply.body


def test_a_gzip_body_is_inflated(rest_backend: BackendProcess) -> None:
    body = gzip.compress(b'{"signature_name": "halve", "instances": [2.0]}')
    reply = call(rest_backend, "POST", "/v1/models/rest_multi:predict", body,
                 {"Content-Encoding": "gzip"})  # fmt: skip
    assert reply.json() == {"predictions": [1.0]}
    broken = call(rest_backend, "POST", "/v1/models/rest_multi:predict", b"not gzip",
                  {"Content-Encoding": "gzip"})  # fmt: skip
    assert broken.json() == {"error": "JSON Parse error: The document is empty"}


def test_a_dtype_json_cannot_fill_is_unimplemented(rest_backend: BackendProcess) -> None:
    message = "Conversion of JSON Value: 1.0 to type: half"
    columnar = {"signature_name": "halfin", "inputs": [1.0]}
    reply = call(rest_backend, "POST", "/v1/models/rest_multi:predict", columnar)
    assert (reply.status, reply.json()) == (501, {"error": message})
    # Row format wraps the same status in its own INVALID_ARGUMENT.
    row = {"signature_name": "halfin", "instances": [1.0]}
    reply = call(rest_backend, "POST", "/v1/models/rest_multi:predict", row)
    assert reply.status == 400
    assert reply.json() == {
        "error": "Failed to process element: 0 of 'instances' list. Error: UNIMPLEMENTED: "
        + message
    }


def test_curl_is_an_independent_client(rest_backend: BackendProcess) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is not installed: make apt installs it"
    url = f"{rest_backend.rest_url}/v1/models/rest_multi:predict"
    data = '{"signature_name": "halve", "instances": [1.0, 5.0]}'
    result = subprocess.run(
        [curl, "-sS", "-i", "-X", "POST", "-d", data, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.splitlines()[0] == "HTTP/1.1 200 OK"
    assert "content-type: application/json" in head.lower()
    assert json.loads(body) == {"predictions": [0.5, 2.5]}
    missing = subprocess.run(
        [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-d", data,
         f"{rest_backend.rest_url}/v1/models/nope:predict"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert missing.stdout == "404"


def test_a_long_prediction_does_not_hold_up_other_requests(rest_backend: BackendProcess) -> None:
    inputs = random_inputs("softmax_201", 1024, seed=5)
    big = json.dumps({"instances": rows(inputs)}).encode()
    done: list[str] = []

    def predict() -> None:
        reply = call(rest_backend, "POST", "/v1/models/softmax_201:predict", big)
        assert reply.status == 200
        done.append("predict")

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(predict)
        time.sleep(0.2)  # the body is on its way, or being read
        for _ in range(3):
            assert call(rest_backend, "GET", "/v1/models/binary_mlp").status == 200
            done.append("status")
        slow.result(timeout=300)
    assert done.index("predict") > 0, done  # a status call was answered first


def test_port_file_holds_both_ports(rest_backend: BackendProcess) -> None:
    assert set(rest_backend.ports) == {"grpc", "rest"}
    assert rest_backend.ports["grpc"] != rest_backend.ports["rest"]


def test_grpc_still_serves_next_to_rest(rest_backend: BackendProcess) -> None:
    assert rest_backend.rest_url is not None and rest_backend.rest_url.startswith("http://")
    out = grpc_predict(rest_backend, "binary_mlp", demo_inputs("binary_mlp"))
    assert out["probability"].shape == (10, 1)
