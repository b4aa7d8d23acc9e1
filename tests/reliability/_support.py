"""Helpers for the reliability suite: a recording upstream built on the
official stubs, a separately killable upstream process, and ``guard serve``
run as a real process. Everything binds port 0 on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
)

PREDICT = "/tensorflow.serving.PredictionService/Predict"
MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", 1024 * 1024 * 1024),
    ("grpc.max_send_message_length", 1024 * 1024 * 1024),
]
REPO = Path(__file__).resolve().parents[2]

Answer = Callable[[predict_pb2.PredictRequest], "predict_pb2.PredictResponse | bytes"]


@dataclass
class Upstream:
    """A TF-Serving-like upstream that records what happens to every call.

    ``answers`` maps a model name to a function of the request returning a
    PredictResponse or raw bytes (for hostile-bytes tests). ``gate``, when set,
    holds every Predict until it is opened; ``delay_s`` delays every Predict;
    ``only`` limits both to one model name.
    """

    answers: dict[str, Answer] = field(default_factory=dict)
    delay_s: float = 0.0
    gate: asyncio.Event | None = None
    only: str | None = None
    address: str = ""
    started: int = 0
    finished: int = 0
    cancelled: int = 0
    active: int = 0
    peak: int = 0
    time_remaining: list[float | None] = field(default_factory=list)
    server: grpc.aio.Server | None = None

    def reply(self, model: str, response: predict_pb2.PredictResponse | bytes) -> None:
        """Answer every Predict for ``model`` with ``response``."""
        self.answers[model] = lambda request: response

    async def wait_for(self, what: str, n: int, bound_s: float = 10.0) -> None:
        """Wait (bounded) until ``self.<what>`` reaches ``n``."""
        for _ in range(int(bound_s / 0.01)):
            if getattr(self, what) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"upstream {what}={getattr(self, what)}, expected >= {n}")

    async def _predict(self, request: predict_pb2.PredictRequest, context: Any) -> Any:
        self.started += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.time_remaining.append(context.time_remaining())
        try:
            if self.only is None or request.model_spec.name == self.only:
                if self.gate is not None:
                    await self.gate.wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
        answer = self.answers.get(request.model_spec.name)
        if answer is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({request.model_spec.name})",
            )
        self.finished += 1
        return answer(request)


class _PredictHandler(grpc.GenericRpcHandler):
    """Predict with an official request type and a response that may be raw bytes."""

    def __init__(self, upstream: Upstream) -> None:
        self._handler = grpc.unary_unary_rpc_method_handler(
            upstream._predict,
            request_deserializer=predict_pb2.PredictRequest.FromString,
            response_serializer=lambda r: r if isinstance(r, bytes) else r.SerializeToString(),
        )

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handler if details.method == PREDICT else None


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    async def GetModelStatus(self, request: Any, context: Any) -> Any:  # noqa: N802 - proto
        resp = get_model_status_pb2.GetModelStatusResponse()
        version = resp.model_version_status.add()
        version.version = 1
        version.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return resp


async def start_upstream(
    upstream: Upstream,
    credentials: grpc.ServerCredentials | None = None,
    address: str = "127.0.0.1:0",
) -> Upstream:
    """Start ``upstream`` on loopback (optionally with TLS); sets ``.address``."""
    server = grpc.aio.server(options=MESSAGE_OPTIONS)
    server.add_generic_rpc_handlers((_PredictHandler(upstream),))
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(), server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    upstream.address = f"127.0.0.1:{port}"
    upstream.server = server
    await server.start()
    return upstream


async def wait_for_file(path: Path, proc: asyncio.subprocess.Process, bound_s: float = 60) -> None:
    """Wait (bounded) until ``path`` exists, failing early if ``proc`` exits."""
    for _ in range(int(bound_s / 0.05)):
        if path.exists():
            return
        if proc.returncode is not None:
            raise AssertionError(f"process exited with {proc.returncode} before writing {path}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {bound_s} s")


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc`` if it still runs, and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@dataclass
class GuardProcess:
    """``python -m guard serve`` as a real process."""

    proc: asyncio.subprocess.Process
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def guard_process(
    config: Path, tmp: Path, *extra: str, log_level: str = "info"
) -> AsyncIterator[GuardProcess]:
    """Run ``guard serve --config CONFIG`` on ephemeral loopback ports."""
    port_file = tmp / f"ports-{os.urandom(4).hex()}.json"
    log_path = tmp / f"guard-{os.urandom(4).hex()}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "guard", "serve", "--config", str(config),
            "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            "--port-file", str(port_file), "--log-level", log_level, *extra,
            stderr=log, stdout=log, cwd=REPO,
        )  # fmt: skip
    try:
        await wait_for_file(port_file, proc)
        ports = json.loads(port_file.read_text())
        yield GuardProcess(proc, ports["grpc"], ports["metrics"], log_path)
    finally:
        await stop_process(proc)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s content in one step, as editors and kubectl do."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
