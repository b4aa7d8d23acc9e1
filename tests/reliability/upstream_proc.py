"""A minimal upstream in its own process, so a test can SIGKILL it.

It answers Predict with fixed bytes (built by the test with the official
protos) and GetModelStatus with an empty response; calls for ``--slow-model``
wait ``--slow-s`` first. It imports neither TensorFlow nor the test suite, so
it starts in well under a second::

    python tests/reliability/upstream_proc.py --response-file R --port-file P [--port N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from guard.dataplane.codec.request import peek_model_spec  # noqa: E402 - after the path fix above

PREDICT = "/tensorflow.serving.PredictionService/Predict"
STATUS = "/tensorflow.serving.ModelService/GetModelStatus"


def main() -> None:
    """Serve until killed."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", required=True)
    p.add_argument("--response-file", required=True)
    p.add_argument("--slow-model", default="")
    p.add_argument("--slow-s", type=float, default=0.0)
    args = p.parse_args()
    response = Path(args.response_file).read_bytes()

    async def predict(request: bytes, context: Any) -> bytes:
        spec = peek_model_spec(request)
        if spec is not None and spec.name == args.slow_model:
            await asyncio.sleep(args.slow_s)
        return response

    async def status(request: bytes, context: Any) -> bytes:
        return b""

    handlers = {
        PREDICT: grpc.unary_unary_rpc_method_handler(predict),
        STATUS: grpc.unary_unary_rpc_method_handler(status),
    }

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            return handlers.get(details.method)

    async def serve() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Handler(),))
        port = server.add_insecure_port(f"127.0.0.1:{args.port}")
        if not port:
            raise SystemExit(f"cannot bind 127.0.0.1:{args.port}")
        await server.start()
        tmp = args.port_file + ".tmp"
        Path(tmp).write_text(json.dumps({"grpc": port}))
        os.replace(tmp, args.port_file)
        await server.wait_for_termination()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
