"""The Python time of one unary call through ``CallHandler``, gRPC left out.

The handler runs as grpc.aio would call it, against fake gRPC objects: a
context whose request is there after one loop turn, an upstream that answers
after one, no network. What remains is the guard's own per-call work
(admission, read deadline, metadata, forwarding, guarding a 1x1 response
under a clamp + argmax rule, accounting), in µs per call, the best of 7 runs:

    PYTHONPATH=<checkout> python bench/percall.py [--calls 5000]

``<checkout>`` (``.`` for this one) supplies ``guard`` and ``bench``; only
``bench.payloads`` and ``bench.upstream`` are used, so older checkouts work.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from bench import payloads
from bench.upstream import model_from_args, parse_args
from guard.control.config import Config, load_config
from guard.dataplane.book import RuleBook
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.arrivals import Arrivals
from guard.server.gate import Gate
from guard.server.handler import CallHandler
from guard.server.methods import ProxyHandler

_MODEL = model_from_args(parse_args(["--batch=1", "--classes=1"]))
_REQUEST = payloads.predict_request(_MODEL)
_RESPONSE = payloads.predict_response(_MODEL)
_METADATA = (("user-agent", "grpc-python"), ("x-request-id", "abc"))
_RULES = f"""\
upstream: 127.0.0.1:1
models:
  - name: {_MODEL.name}
    signature: "*"
    outputs:
      - name: {_MODEL.output_name}
        activation: none
        valid_range: [0.0, 1.0]
        on_violation: clamp
        argmax: true
"""


class _Context:
    """A servicer context whose request arrives after one loop turn."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return _METADATA

    def time_remaining(self) -> float:
        return 10.0

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def __init__(self) -> None:
        self._read = False
        self._callbacks: list[Callable[[Any], None]] = []

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    def done(self) -> bool:
        return False

    def end(self) -> None:
        """The call is over (its answer taken): what grpc.aio then calls back."""
        for callback in self._callbacks:
            callback(self)

    async def read(self) -> Any:
        """The request, after a loop turn; then the end of the stream."""
        if self._read:
            return grpc.aio.EOF
        self._read = True
        await asyncio.sleep(0)
        return _REQUEST

    def set_trailing_metadata(self, trailers: Any) -> None:
        pass

    async def send_initial_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, *args: Any) -> None:
        raise RuntimeError(f"the call was aborted: {args}")


class _UpstreamCall:
    """An upstream call that answers after one loop turn, without metadata."""

    def __await__(self) -> Generator[Any, None, bytes]:
        yield from asyncio.sleep(0).__await__()
        return _RESPONSE

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()


class _Upstream:
    def unary(self, method: str) -> Callable[..., _UpstreamCall]:
        return lambda request, timeout, metadata: _UpstreamCall()


class _Server:
    """The ServerState a CallHandler needs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = GuardMetrics(CollectorRegistry(), config.model_names())
        self.upstream = _Upstream()
        self.gate = Gate(config)
        self.arrivals = Arrivals(self.gate)
        self.cut_off = None
        self.rules = RuleBook(config.models, config.max_message_bytes)

    def cut_connection(self, context: Any, why: str) -> None:
        raise RuntimeError(f"a connection was cut: {why}")

    def was_cut(self, peer: str, began: float) -> bool:
        return False


class _Details:
    method = payloads.PREDICT_METHOD


async def _call(unary: Callable[..., Awaitable[Any]]) -> Any:
    context = _Context()
    response = await unary(None, context)
    context.end()
    return response


async def _best_us(calls: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "guard.yaml"
        path.write_text(_RULES)
        config = load_config(path)
    handler = CallHandler(_Server(config))  # type: ignore[arg-type]
    method = ProxyHandler(handler.unary, handler.unary).service(_Details())
    assert method is not None
    unary = method.stream_unary
    if not await _call(unary):
        raise RuntimeError("the handler returned no response")
    best = float("inf")
    for _ in range(7):
        start = time.process_time()
        for _ in range(calls):
            await _call(unary)
        best = min(best, (time.process_time() - start) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=5000)
    args = p.parse_args(argv)
    print(f"{asyncio.run(_best_us(args.calls)):.1f} µs per call")


if __name__ == "__main__":
    main()
