"""End-to-end fixtures: the seed models behind the local backend, with real
``guard serve`` processes in front, one backend per response encoding.

Everything is session-scoped and started lazily, because every start costs
seconds on a small machine (the backend imports TensorFlow):

- ``seed_models``: the four SavedModels, built once into ``.cache/models`` (or
  ``$GUARD_TEST_MODELS_DIR``); a second session reuses them (cached by content).
- ``backends(encoding)``: the backend serving the seed models, ``typed`` (TF
  Serving's default ``*_val`` fields) or ``content`` (``--tensor-content``). The
  first call starts both at once, since every test runs on both.
- ``guards(encoding, scenario)``: a ``python -m guard serve`` child process in
  front of that backend, with the config of one :data:`SCENARIOS` entry. The
  first call for an encoding starts every scenario's guard for it in parallel.
- ``encoding``: parametrises a test over both encodings (ids ``typed``, ``content``).
- ``reference``: the models run in this process (the SavedModel's signature and
  the tf_keras model's ``predict``), to compare the guarded answers with.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from guard.dev.backend import BackendProcess, start_backend
from guard.dev.models import VERSION, build_models, keras_model, saved_model_predict
from tests.support.guard import GuardProcess, start_guard, stop_all

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO_ROOT / "examples" / "guard.yaml"
ENCODINGS = ("typed", "content")
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]
RPC_TIMEOUT_S = 60.0


def _wide_deep_only(on_violation: str) -> dict[str, Any]:
    """A config with one rule, for wide_deep's output_1; every other model has none."""
    return {
        "health_check_interval_s": 0.5,
        "models": [
            {
                "name": "wide_deep",
                "outputs": [
                    {"name": "output_1", "valid_range": [0.0, 1.0], "on_violation": on_violation}
                ],
            }
        ],
    }


#: A logits-output variant of softmax_201 (its last Dense without the softmax),
#: exported by the test session, for calibration at serving time.
LOGITS_MODEL = "softmax_201_logits"
TEMPERATURE = 2.5


def _calibrated() -> dict[str, Any]:
    """Temperature scaling of the logits model, with abstention."""
    return {
        "health_check_interval_s": 0.5,
        "models": [
            {
                "name": LOGITS_MODEL,
                "outputs": [
                    {
                        "name": "logits",
                        "activation": "softmax",
                        "temperature": TEMPERATURE,
                        "check_sum": True,
                        "argmax": True,
                        "min_confidence": 0.3,
                    }
                ],
            }
        ],
    }


SCENARIOS: dict[str, dict[str, Any] | Path] = {
    "observe": _wide_deep_only("observe"),
    "clamp": _wide_deep_only("clamp"),
    "reject": _wide_deep_only("reject"),
    # The demo rule set, used as shipped (labels_file resolves next to it).
    "examples": EXAMPLE_CONFIG,
    "calibrated": _calibrated(),
}
"""Guard configs by scenario name: a dict is written to a file, a Path is used as is."""


@pytest.fixture(scope="session")
def seed_models() -> dict[str, Path]:
    """The four seed models, built (or reused from the content-addressed cache)."""
    out_dir = Path(os.environ.get("GUARD_TEST_MODELS_DIR", REPO_ROOT / ".cache" / "models"))
    return build_models(out_dir)


def logits_keras_model() -> Any:
    """softmax_201's tf_keras model with its last layer's softmax left out."""
    import tf_keras

    probs = keras_model("softmax_201")
    head = probs.layers[-1]
    logits = tf_keras.layers.Dense(head.units, activation=None, name="logits")
    out = logits(probs.layers[-2].output)
    logits.set_weights(head.get_weights())
    return tf_keras.Model(probs.inputs, out, name=LOGITS_MODEL)


def _export_logits_model(base: Path) -> Path:
    import tensorflow as tf

    model = logits_keras_model()
    module = tf.Module()
    module.model_variables = list(model.weights)
    spec = tf.TensorSpec((None, 16, 16, 1), tf.float32, name="image")
    module.serve = tf.function(lambda image: {"logits": model(image, training=False)}, [spec])
    signature = module.serve.get_concrete_function()
    tf.saved_model.save(module, str(base / str(VERSION)), signatures={"serving_default": signature})
    return base


@pytest.fixture(scope="session")
def served_models(
    seed_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The seed models and the logits model, as the backends serve them."""
    logits = _export_logits_model(tmp_path_factory.mktemp("logits") / LOGITS_MODEL)
    return {**seed_models, LOGITS_MODEL: logits}


BackendFactory = Callable[[str], BackendProcess]
GuardFactory = Callable[[str, str], GuardProcess]


@pytest.fixture(scope="session")
def backends(served_models: dict[str, Path]) -> Iterator[BackendFactory]:
    """``backends(encoding)``: the backend for ``typed`` or ``content`` responses."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(ENCODINGS))
    futures: dict[str, concurrent.futures.Future[BackendProcess]] = {}

    def get(encoding: str) -> BackendProcess:
        if not futures:
            # Both TensorFlow imports overlap; the suite needs both backends anyway.
            for enc in ENCODINGS:
                futures[enc] = pool.submit(
                    start_backend, served_models, tensor_content=enc == "content"
                )
        return futures[encoding].result()

    yield get
    pool.shutdown(wait=True)
    started = [f.result() for f in futures.values() if f.exception() is None]
    for backend in started:  # signal all first, so they shut down in parallel
        backend.process.terminate()
    for backend in started:
        backend.stop()


@pytest.fixture(scope="session")
def guards(
    backends: BackendFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GuardFactory]:
    """``guards(encoding, scenario)``: a guard process in front of that backend."""
    running: dict[tuple[str, str], GuardProcess] = {}
    config_dir = tmp_path_factory.mktemp("guard-configs")
    configs: dict[str, Path] = {}
    for name, config in SCENARIOS.items():
        if isinstance(config, Path):
            configs[name] = config
        else:
            configs[name] = config_dir / f"{name}.yaml"
            configs[name].write_text(yaml.safe_dump(config))

    def get(encoding: str, scenario: str) -> GuardProcess:
        if (encoding, scenario) not in running:
            upstream = backends(encoding).address
            for name, config in configs.items():
                running[(encoding, name)] = start_guard(config, upstream=upstream)
        return running[(encoding, scenario)]

    yield get
    stop_all(list(running.values()))


@pytest.fixture(scope="session", params=ENCODINGS)
def encoding(request: pytest.FixtureRequest) -> str:
    """The backend's response encoding: ``typed`` (``*_val``) or ``content``."""
    return str(request.param)


class Reference:
    """The seed models run in this process, for comparison with what the guard returns."""

    def __init__(self, seed_models: dict[str, Path]) -> None:
        self._seed_models = seed_models
        self._keras: dict[str, Any] = {}

    def saved_model(self, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The served SavedModel's ``serving_default``, in-process: its one output."""
        outputs = saved_model_predict(self._seed_models[name] / str(VERSION), inputs)
        (values,) = outputs.values()
        return np.asarray(values)

    def keras_predict(self, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """``model.predict`` of the tf_keras model behind the seed model (built once)."""
        from guard.dev.models import MODELS

        if name not in self._keras:
            self._keras[name] = keras_model(name)
        ordered = [inputs[t.name] for t in MODELS[name].inputs]
        arg: Any = ordered if len(ordered) > 1 else ordered[0]
        return np.asarray(self._keras[name].predict(arg, verbose=0))


@pytest.fixture(scope="session")
def reference(seed_models: dict[str, Path]) -> Reference:
    """In-process predictions of the seed models."""
    return Reference(seed_models)


@pytest.fixture(scope="session")
def backend_channel(encoding: str, backends: BackendFactory) -> Iterator[grpc.Channel]:
    """A channel straight to the backend of this encoding (no guard in between)."""
    with grpc.insecure_channel(backends(encoding).address, options=CHANNEL_OPTIONS) as channel:
        yield channel


@pytest.fixture(scope="session")
def guard(encoding: str, guards: GuardFactory) -> Callable[[str], GuardProcess]:
    """``guard(scenario)``: the guard process of that scenario for this encoding."""
    return lambda scenario: guards(encoding, scenario)
