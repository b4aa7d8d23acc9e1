"""A tiny TF-Serving-like upstream plus an interop test service, in its own
process, with raw-bytes generic handlers (no TensorFlow, no guard import)::

    python -m tests.attacks.upstream --port-file PF

Predict answers by model name (the request's ModelSpec is echoed back):

- ``fill:N``: output ``p`` of shape [N] carrying one float_val (TF's fill
  convention: the last value repeats), about 40 bytes on the wire;
- ``big:N``: output ``p`` of N floats in tensor_content, all 0.7;
- ``hot``: ``p`` = [[1.5, 0.2]] (above the default valid range);
- ``slow:S``: the default answer after S seconds;
- anything else: ``p`` = [[0.1, 0.9]].

``/attack.Control/Stats`` returns JSON with what the upstream saw (calls per
method, the largest metadata block, the longest model name).

The interop service ``/attack.Interop/...`` (raw bytes both ways):

- ``Unary``: returns ``b"echo:" + request``;
- ``Collect`` (client streaming): JSON {"n", "sizes", "sha256"} of every message;
- ``Fanout`` (server streaming): request JSON {"n", "size"}; n messages, message
  i is ``b"%d:" % i`` padded with ``b"x"`` to ``size``; n = 0 sends none, OK;
- ``Echo`` (bidi): one ``b"echo:" + m`` per message, sent as soon as m arrives;
- ``Greet`` (bidi): empty initial metadata at once, then as ``Echo``;
- ``Refuse`` (unary): initial metadata ``x-up-initial: yes``, then
  FAILED_PRECONDITION "upstream refuses" with trailer ``x-up-trailer: t``;
- ``Nothing`` (unary request, zero responses): ends OK with no message.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import struct
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from tests.attacks import protos

PREDICT = "/tensorflow.serving.PredictionService/Predict"
STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
STATS = "/attack.Control/Stats"
INTEROP = "/attack.Interop/"
OPTIONS = [
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.max_send_message_length", 1 << 30),
    # Large enough that whatever the guard forwards arrives, so the tests can
    # tell what the guard let through.
    ("grpc.max_metadata_size", 4 << 20),
    ("grpc.absolute_max_metadata_size", 4 << 20),
]


class State:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.max_metadata_bytes = 0
        self.max_metadata_keys = 0
        self.max_name_len = 0

    def note(self, method: str, context: Any) -> None:
        self.calls[method] += 1
        md = context.invocation_metadata() or ()
        size = sum(len(k) + len(v) for k, v in md)
        self.max_metadata_bytes = max(self.max_metadata_bytes, size)
        self.max_metadata_keys = max(self.max_metadata_keys, len(md))

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "calls": dict(self.calls),
                "max_metadata_bytes": self.max_metadata_bytes,
                "max_metadata_keys": self.max_metadata_keys,
                "max_name_len": self.max_name_len,
            }
        ).encode()


STATE = State()


def answer(request: bytes) -> tuple[bytes, float]:
    """The Predict response for ``request``, and a delay before it."""
    # Bounded: hidden-spec attacks put megabytes before the spec; the upstream
    # answers those with the default response instead of scanning them.
    spec = protos.first(request, 1, limit=64 * 1024) or protos.model_spec("")
    spec_name = protos.first(spec, 1) or b""
    name = spec_name.decode("utf-8", "replace")
    STATE.max_name_len = max(STATE.max_name_len, len(spec_name))
    # The echoed spec gets a version, as TF Serving's answers do.
    out_spec = protos.model_spec(spec_name, version=1)
    delay = 0.0
    kind, _, arg = name.partition(":")
    if kind == "fill":
        tensor = protos.float_tensor([int(arg)], [0.7])
    elif kind == "big":
        n = int(arg)
        tensor = protos.float_tensor([n], content=struct.pack("<f", 0.7) * n)
    elif kind == "hot":
        tensor = protos.float_tensor([1, 2], [1.5, 0.2])
    else:
        if kind == "slow":
            delay = float(arg)
        tensor = protos.float_tensor([1, 2], [0.1, 0.9])
    return protos.predict_response({"p": tensor}, out_spec), delay


async def predict(request: bytes, context: Any) -> bytes:
    STATE.note("Predict", context)
    body, delay = answer(request)
    if delay:
        await asyncio.sleep(delay)
    return body


async def status(request: bytes, context: Any) -> bytes:
    STATE.note("GetModelStatus", context)
    return b""


async def stats(request: bytes, context: Any) -> bytes:
    return STATE.as_json()


async def unary(request: bytes, context: Any) -> bytes:
    STATE.note("Unary", context)
    return b"echo:" + request


async def collect(requests: AsyncIterator[bytes], context: Any) -> bytes:
    STATE.note("Collect", context)
    sizes = []
    digest = hashlib.sha256()
    async for message in requests:
        sizes.append(len(message))
        digest.update(message)
    return json.dumps({"n": len(sizes), "sizes": sizes, "sha256": digest.hexdigest()}).encode()


async def fanout(request: bytes, context: Any) -> AsyncIterator[bytes]:
    STATE.note("Fanout", context)
    spec = json.loads(request)
    for i in range(int(spec["n"])):
        head = b"%d:" % i
        yield head + b"x" * max(int(spec.get("size", 0)) - len(head), 0)


async def echo(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    STATE.note("Echo", context)
    async for message in requests:
        yield b"echo:" + message


async def greet(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    STATE.note("Greet", context)
    await context.send_initial_metadata(())
    async for message in requests:
        yield b"echo:" + message


async def refuse(request: bytes, context: Any) -> bytes:
    STATE.note("Refuse", context)
    await context.send_initial_metadata((("x-up-initial", "yes"),))
    await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION, "upstream refuses", (("x-up-trailer", "t"),)
    )
    raise AssertionError("abort returned")


async def nothing(request: bytes, context: Any) -> AsyncIterator[bytes]:
    STATE.note("Nothing", context)
    return
    yield b""  # pragma: no cover - makes this an async generator


HANDLERS: dict[str, grpc.RpcMethodHandler] = {
    PREDICT: grpc.unary_unary_rpc_method_handler(predict),
    STATUS: grpc.unary_unary_rpc_method_handler(status),
    STATS: grpc.unary_unary_rpc_method_handler(stats),
    INTEROP + "Unary": grpc.unary_unary_rpc_method_handler(unary),
    INTEROP + "Collect": grpc.stream_unary_rpc_method_handler(collect),
    INTEROP + "Fanout": grpc.unary_stream_rpc_method_handler(fanout),
    INTEROP + "Echo": grpc.stream_stream_rpc_method_handler(echo),
    INTEROP + "Greet": grpc.stream_stream_rpc_method_handler(greet),
    INTEROP + "Refuse": grpc.unary_unary_rpc_method_handler(refuse),
    INTEROP + "Nothing": grpc.unary_stream_rpc_method_handler(nothing),
}


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return HANDLERS.get(details.method)


async def serve(port_file: Path, port: int) -> None:
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((_Handler(),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(json.dumps({"grpc": bound}))
    os.replace(tmp, port_file)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port-file", required=True, type=Path)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    asyncio.run(serve(args.port_file, args.port))


if __name__ == "__main__":
    main()
