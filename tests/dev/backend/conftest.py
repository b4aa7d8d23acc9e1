"""Fixtures for the local backend and the seed models.

Reusable from other test packages (the demo and end-to-end tests): the work is
done by ``guard.dev.models.build_models`` and ``guard.dev.backend.start_backend``; these
fixtures only cache the results for the session.

- ``seed_models``: name -> base path of the four seed models, built once into
  ``.cache/models`` (or ``$GUARD_TEST_MODELS_DIR``) and reused across runs.
- ``extra_models``: ``versioned`` (versions 1 and 7) and ``dtypes`` (one output per
  dtype, a scalar output) for the backend's own tests.
- ``backend_factory(tensor_content)``: one backend process per encoding, started
  on first use, serving ``seed_models`` and ``extra_models``; stopped at the end.
- ``backend``: parametrised over both encodings (ids ``typed`` and ``content``).
- ``reference_predict(name_or_dir, inputs)``: the SavedModel run in this process.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from guard.dev.backend import BackendProcess, start_backend  # noqa: E402
from guard.dev.models import VERSION, build_models, saved_model_predict  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[3]
ENCODINGS = {"typed": False, "content": True}
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]

BackendFactory = Callable[[bool], BackendProcess]
ReferencePredict = Callable[[str | Path, dict[str, np.ndarray]], dict[str, np.ndarray]]


@pytest.fixture(scope="session")
def seed_models() -> dict[str, Path]:
    """The four seed models, built (or reused from the content-addressed cache)."""
    out_dir = Path(os.environ.get("GUARD_TEST_MODELS_DIR", REPO_ROOT / ".cache" / "models"))
    return build_models(out_dir)


class _DtypesModel(tf.Module):
    """One output per dtype the backend must encode, plus a scalar."""

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {
            "float": x + 1.0,
            "double": tf.cast(x, tf.float64) * 2.0,
            "half": tf.cast(x, tf.float16),
            "int64": tf.cast(x * 10.0, tf.int64),
            "int32": tf.cast(x * 10.0, tf.int32),
            "uint8": tf.cast(x * 100.0, tf.uint8),
            "bool": x > 0.5,
            "string": tf.strings.as_string(x, precision=2),
            "total": tf.reduce_sum(x),
        }


@pytest.fixture(scope="session")
def extra_models(
    seed_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """``versioned``: v1 = binary_mlp, v7 = softmax_201, plus a non-version dir to ignore;
    ``dtypes``: the multi-dtype model."""
    root = tmp_path_factory.mktemp("extra-models")
    versioned = root / "versioned"
    shutil.copytree(seed_models["binary_mlp"] / str(VERSION), versioned / "1")
    shutil.copytree(seed_models["softmax_201"] / str(VERSION), versioned / "7")
    (versioned / "not-a-version").mkdir()
    dtypes = root / "dtypes"
    module = _DtypesModel()
    tf.saved_model.save(
        module,
        str(dtypes / "1"),
        signatures={"serving_default": module.serve.get_concrete_function()},
    )
    return {"versioned": versioned, "dtypes": dtypes}


@pytest.fixture(scope="session")
def backend_factory(
    seed_models: dict[str, Path], extra_models: dict[str, Path]
) -> Iterator[BackendFactory]:
    """Start (once per encoding) a backend serving all seed and extra models."""
    running: dict[bool, BackendProcess] = {}

    def get(tensor_content: bool) -> BackendProcess:
        if tensor_content not in running:
            running[tensor_content] = start_backend(
                {**seed_models, **extra_models}, tensor_content=tensor_content
            )
        return running[tensor_content]

    yield get
    for process in running.values():
        process.stop()


@pytest.fixture(scope="session", params=list(ENCODINGS), ids=list(ENCODINGS))
def backend(request: pytest.FixtureRequest, backend_factory: BackendFactory) -> BackendProcess:
    """The backend in each response encoding (``typed`` *_val fields, ``content``)."""
    return backend_factory(ENCODINGS[request.param])


@pytest.fixture
def channel(backend: BackendProcess) -> Iterator[grpc.Channel]:
    """A channel with the message limits the guard uses (256 MiB), not gRPC's 4 MiB."""
    with grpc.insecure_channel(backend.address, options=CHANNEL_OPTIONS) as ch:
        yield ch


@pytest.fixture
def prediction_stub(channel: grpc.Channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture
def model_stub(channel: grpc.Channel) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="session")
def reference_predict(
    seed_models: dict[str, Path], extra_models: dict[str, Path]
) -> ReferencePredict:
    """Run a model's serving_default in this process: a seed/extra model name or a
    version directory."""

    def predict(model: str | Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(model, Path):
            version_dir = model
        else:
            bases = {**seed_models, **extra_models}
            version_dir = bases[model] / str(VERSION)
        return saved_model_predict(version_dir, inputs)

    return predict
