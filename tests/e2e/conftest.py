"""End-to-end fixtures: the seed models behind the local backend, with real
``guard serve`` processes in front, one backend per response encoding.

Everything is session-scoped and started lazily, because every start costs
seconds on a small machine (the backend imports TensorFlow):

- ``seed_models``: the three SavedModels, built once into ``.cache/models`` (or
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
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from guard.dev.backend import BackendProcess, start_backend
from guard.dev.models import VERSION, build_models, keras_model, saved_model_predict
from tests.conftest import scrape

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO_ROOT / "examples" / "guard.yaml"
ENCODINGS = ("typed", "content")
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]
RPC_TIMEOUT_S = 60.0
_GUARD_START_TIMEOUT_S = 60.0


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


SCENARIOS: dict[str, dict[str, Any] | Path] = {
    "observe": _wide_deep_only("observe"),
    "clamp": _wide_deep_only("clamp"),
    "reject": _wide_deep_only("reject"),
    # The demo rule set, used as shipped (labels_file resolves next to it).
    "examples": EXAMPLE_CONFIG,
}
"""Guard configs by scenario name: a dict is written to a file, a Path is used as is."""


@dataclass
class GuardProcess:
    """One ``guard serve`` child process and how to reach it."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log_path: Path
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the guard's gRPC listener."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """The guard's Prometheus endpoint."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def channel(self) -> grpc.Channel:
        """A channel to the guard, shared by the tests (opened on first use)."""
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        return self._channel

    def sample(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics whose labels include ``labels`` (0 if absent)."""
        total = 0.0
        for family in scrape(self.metrics_url):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += float(s.value)
        return total

    def log_text(self) -> str:
        """Everything the guard has logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited in 15 s."""
        if self._channel is not None:
            self._channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _spawn_guard(
    config: Path, upstream: str, workdir: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    port_file = workdir / "ports.json"
    log_path = workdir / "guard.log"
    argv = [sys.executable, "-m", "guard", "serve", "--config", str(config),
            "--upstream", upstream, "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--port-file", str(port_file)]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, log_path


def _wait_for_guard(
    process: subprocess.Popen[bytes], workdir: Path, log_path: Path
) -> GuardProcess:
    port_file = workdir / "ports.json"
    deadline = time.monotonic() + _GUARD_START_TIMEOUT_S
    while not port_file.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
            process.wait()
            log = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"guard did not start (exit {process.returncode}):\n{log}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    return GuardProcess(process, int(ports["grpc"]), int(ports["metrics"]), log_path)


@pytest.fixture(scope="session")
def seed_models() -> dict[str, Path]:
    """The three seed models, built (or reused from the content-addressed cache)."""
    out_dir = Path(os.environ.get("GUARD_TEST_MODELS_DIR", REPO_ROOT / ".cache" / "models"))
    return build_models(out_dir)


BackendFactory = Callable[[str], BackendProcess]
GuardFactory = Callable[[str, str], GuardProcess]


@pytest.fixture(scope="session")
def backends(seed_models: dict[str, Path]) -> Iterator[BackendFactory]:
    """``backends(encoding)``: the backend for ``typed`` or ``content`` responses."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(ENCODINGS))
    futures: dict[str, concurrent.futures.Future[BackendProcess]] = {}

    def get(encoding: str) -> BackendProcess:
        if not futures:
            # Both TensorFlow imports overlap; the suite needs both backends anyway.
            for enc in ENCODINGS:
                futures[enc] = pool.submit(
                    start_backend, seed_models, tensor_content=enc == "content"
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
            spawned = {}
            for name, config in configs.items():
                workdir = tmp_path_factory.mktemp(f"guard-{encoding}-{name}")
                spawned[name] = (*_spawn_guard(config, upstream, workdir), workdir)
            try:
                for name, (process, log_path, workdir) in spawned.items():
                    running[(encoding, name)] = _wait_for_guard(process, workdir, log_path)
            finally:
                for name, (process, _, _) in spawned.items():
                    if (encoding, name) not in running and process.poll() is None:
                        process.kill()
                        process.wait()
        return running[(encoding, scenario)]

    yield get
    for guard in running.values():  # signal all first, so they shut down in parallel
        guard.process.terminate()
    for guard in running.values():
        guard.stop()


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
