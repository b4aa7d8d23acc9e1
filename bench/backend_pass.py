"""One extra pass of the paths in front of the real local backend and a real model.

Builds the seed SavedModels (``python -m guard.dev.models build DIR``), serves
``softmax_201`` with ``python -m guard.dev.backend``, and measures the same paths
for one round. Skipped, with the reason in the report, while those modules do
not exist yet in the checkout.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench import payloads
from bench._common import MESSAGE_OPTIONS, read_port_file

logger = logging.getLogger("bench.backend_pass")

MODEL = "softmax_201"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models-build"


def missing() -> str | None:
    """Why the pass cannot run, or None when it can."""
    for module in ("guard.dev.backend.__main__", "guard.dev.models.__main__", "guard.cli"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"`{module}` does not exist yet"
        except ModuleNotFoundError:
            return f"`{module}` does not exist yet"
    return None


def _metadata(target: str) -> Any:
    pb = payloads.official_protos()
    request = pb.get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = MODEL
    request.metadata_field.append("signature_def")
    with grpc.insecure_channel(target, options=MESSAGE_OPTIONS) as channel:
        raw = channel.unary_unary(payloads.METADATA_METHOD)(request.SerializeToString(), timeout=5)
    response = pb.get_model_metadata_pb2.GetModelMetadataResponse.FromString(raw)
    sig_map = pb.get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_map)
    return sig_map.signature_def[payloads.CannedModel().signature]


def _wait_metadata(target_fn: Any, proc: subprocess.Popen[bytes], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode}")
        target = target_fn()
        if target:
            try:
                return _metadata(target)
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"backend did not answer GetModelMetadata within {timeout_s}s")


def _request(signature: Any, batch: int) -> bytes:
    import numpy as np

    pb = payloads.official_protos()
    request = pb.predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = payloads.CannedModel().signature
    rng = np.random.default_rng(7)
    for alias, info in signature.inputs.items():
        dims = [d.size for d in info.tensor_shape.dim]
        shape = [batch if i == 0 or size < 0 else size for i, size in enumerate(dims)]
        array = rng.normal(size=shape).astype(np.float32)
        request.inputs[alias].CopyFrom(payloads.float_tensor(pb, array, "float_val"))
    return bytes(request.SerializeToString())


def _guard_config(workdir: Path, output: str, classes: int) -> Path:
    labels = workdir / "backend-labels.txt"
    labels.write_text("\n".join(payloads.labels(classes)) + "\n")
    config = workdir / "backend-guard.yaml"
    config.write_text(
        f"models:\n  - name: {MODEL}\n    outputs:\n      - name: {output}\n"
        "        check_sum: true\n        on_violation: observe\n        argmax: true\n"
        f"        top_k: 5\n        labels_file: {labels.name}\n"
    )
    return config


def run(workdir: Path, settings: Any, quick: bool = False) -> dict[str, Any]:
    """Run the pass; returns results shaped like bench.run's, or a reason it did not run."""
    reason = missing()
    if reason:
        logger.warning("real-backend pass skipped: %s", reason)
        return {"status": "todo", "reason": reason}
    from bench import run as bench_run
    from bench.paths import DEFAULT_PATHS, Setup

    build = subprocess.run(
        [sys.executable, "-m", "guard.dev.models", "build", str(MODELS_DIR)],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    if build.returncode != 0:
        return {"status": "failed", "reason": "model build failed: " + build.stderr[-500:]}
    port_file = workdir / "backend.ports.json"
    log = workdir / "backend.log"
    cmd = [sys.executable, "-m", "guard.dev.backend", "--model", f"{MODEL}={MODELS_DIR / MODEL}",
           "--listen", "127.0.0.1:0", "--port-file", str(port_file)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:

        def target() -> str | None:
            ports = read_port_file(port_file)
            return f"127.0.0.1:{ports['grpc']}" if ports else None

        try:
            signature = _wait_metadata(target, proc, timeout_s=120)
        except (RuntimeError, TimeoutError) as err:
            tail = log.read_text(errors="replace")[-500:]
            return {"status": "failed", "reason": f"{err}: {tail}"}
        address = target()
        assert address is not None
        output, info = next(iter(signature.outputs.items()))
        classes = info.tensor_shape.dim[-1].size
        request = _request(signature, batch=8)
        data_file = workdir / "backend-predict.grpc"
        data_file.write_bytes(payloads.grpc_frame(request))
        setup = Setup(address, workdir, _guard_config(workdir, output, classes))
        one_round = dataclasses.replace(settings, rounds=1)
        names = list(DEFAULT_PATHS)
        rounds = bench_run.run_rounds(names, setup, request, data_file, one_round)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        "status": "ran",
        "description": (
            f"`python -m guard.dev.backend` serving the seed model `{MODEL}` (a real SavedModel; "
            f"output `{output}`, {classes} classes), batch 8, one round. The guard applies "
            "the same rules (check_sum, argmax, top_k 5, labels)."
        ),
        "paths": names,
        "rounds": rounds,
        "summary": bench_run.summarise(rounds, names),
        "ratios": bench_run.ratios(rounds),
    }
