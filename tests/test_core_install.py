"""The sidecar image's exact install, exercised without Docker.

The Dockerfile's runtime stage runs ``pip install .`` with no extras into a
fresh virtualenv. This test does the same, then runs that install's ``guard
serve`` in front of the fake upstream: it must proxy and guard with no
TensorFlow anywhere in its environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

from tests.support.protos import predict_request, predict_response
from tests.support.upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[1]
RULES = (
    "models:\n  - name: wide_deep\n    outputs:\n"
    "      - {name: '*', on_violation: clamp, threshold: 0.5, labels: [NO, YES]}\n"
)


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv holding ``pip install .`` and nothing else."""
    venv = tmp_path_factory.mktemp("core") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    src = tmp_path_factory.mktemp("src")
    # Build from a copy of what the Dockerfile copies, so a stale build/ or an
    # egg-info in the checkout cannot leak into the install.
    for name in ("pyproject.toml", "setup.py", "README.md"):
        (src / name).write_bytes((REPO / name).read_bytes())
    # .dockerignore leaves out compiled files: the install must build guard.dataplane._rank itself.
    shutil.copytree(
        REPO / "guard", src / "guard", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(src)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    yield venv


def test_core_install_has_no_tensorflow(core_venv: Path) -> None:
    out = subprocess.run(
        [str(core_venv / "bin" / "python"), "-c",
         "import importlib.util as u; print([m for m in ('tensorflow', 'tensorflow_serving', "
         "'tf_keras') if u.find_spec(m)])"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_core_install_builds_the_native_modules(core_venv: Path) -> None:
    # The Dockerfile's build stage asserts the same imports.
    out = subprocess.run(
        [str(core_venv / "bin" / "python"), "-c",
         "import guard.dataplane._rank as r, guard.dataplane._walk as w; "
         "from guard.dataplane import kernels; "
         "print(kernels.default().name, r.__file__, w.__file__)"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    name, *paths = out.stdout.split()
    assert name == "native"
    for path in paths:
        assert path.startswith(str(core_venv)) and path.endswith(".so")


async def test_core_install_serves_and_guards(
    core_venv: Path, upstream: FakeUpstream, tmp_path: Path
) -> None:
    seed = np.array([[1.00285], [0.000463]], dtype=np.float32)
    upstream.reply("wide_deep", predict_response("wide_deep", {"output_1": seed}))
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(RULES)
    port_file = tmp_path / "ports.json"
    env = {"PATH": "/usr/bin:/bin", "GUARD_CONFIG": str(cfg), "GUARD_UPSTREAM": upstream.address,
           "GUARD_LISTEN": "127.0.0.1:0", "GUARD_METRICS_LISTEN": "127.0.0.1:0"}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        str(core_venv / "bin" / "guard"), "serve", "--port-file", str(port_file),
        env=env, cwd="/",
    )  # fmt: skip
    try:
        for _ in range(300):  # bounded
            if port_file.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        ports = json.loads(port_file.read_text())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            resp = await stub.Predict(predict_request("wide_deep"), timeout=10)
            np.testing.assert_array_equal(
                tf.make_ndarray(resp.outputs["output_1"]), np.clip(seed, 0, 1)
            )
            assert tf.make_ndarray(resp.outputs["output_1_label"]).ravel().tolist() == [
                b"YES",
                b"NO",
            ]
            req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            req.model_spec.name = "wide_deep"
            method = "/tensorflow.serving.PredictionService/GetModelMetadata"
            via_guard = await channel.unary_unary(method)(req.SerializeToString(), timeout=10)
        async with grpc.aio.insecure_channel(upstream.address) as direct:
            assert via_guard == await direct.unary_unary(method)(req.SerializeToString())
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
