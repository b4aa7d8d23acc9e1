"""A fast canned TF-Serving-like upstream for benchmarks.

Every answer is serialized once at startup with the official message classes; a
call costs only gRPC's own work, so the proxies in front of it dominate the
measurement. Raw bytes in and out: the handlers have no (de)serializers.

    python -m bench.upstream --listen 127.0.0.1:0 --port-file F \
        --model softmax_201 --batch 8 --classes 201
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from bench import payloads
from bench._common import MESSAGE_OPTIONS, install_uvloop, serve_until_signal, write_port_file

logger = logging.getLogger("bench.upstream")

Behaviour = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


def _answer(payload: bytes) -> Behaviour:
    async def behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return payload

    return behaviour


async def _unimplemented(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED, "canned upstream: only Predict and metadata are served"
    )
    raise AssertionError("abort returns only by raising")


class CannedHandler(grpc.GenericRpcHandler):
    """Answers each known method with fixed bytes; anything else is UNIMPLEMENTED."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        self._handlers = {
            method: grpc.unary_unary_rpc_method_handler(_answer(payload))
            for method, payload in answers.items()
        }
        self._fallback = grpc.unary_unary_rpc_method_handler(_unimplemented)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._handlers.get(handler_call_details.method, self._fallback)


def canned_answers(model: payloads.CannedModel) -> dict[str, bytes]:
    """The fixed answers, per full method name."""
    return {
        payloads.PREDICT_METHOD: payloads.predict_response(model),
        payloads.METADATA_METHOD: payloads.model_metadata_response(model),
        payloads.STATUS_METHOD: payloads.model_status_response(model),
        # ReloadConfigResponse with an OK status is the empty message.
        "/tensorflow.serving.ModelService/HandleReloadConfigRequest": b"",
        # HealthCheckResponse{status: SERVING}: the upstream is always up.
        payloads.HEALTH_CHECK_METHOD: b"\x08\x01",
    }


async def start(model: payloads.CannedModel, listen: str) -> tuple[grpc.aio.Server, int]:
    """Start the canned upstream on ``listen``; return the server and its port."""
    server = grpc.aio.server(options=MESSAGE_OPTIONS)
    server.add_generic_rpc_handlers((CannedHandler(canned_answers(model)),))
    port = server.add_insecure_port(listen)
    await server.start()
    return server, port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    defaults = payloads.CannedModel()
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--port-file", help='write {"grpc": PORT} here once serving')
    p.add_argument("--model", default=defaults.name)
    p.add_argument("--version", type=int, default=defaults.version)
    p.add_argument("--signature", default=defaults.signature)
    p.add_argument("--output", default=defaults.output_name, help="output alias")
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--classes", type=int, default=defaults.classes)
    p.add_argument("--encoding", choices=payloads.ENCODINGS, default=defaults.encoding)
    p.add_argument("--values", choices=("softmax", "uniform"), default=defaults.values)
    p.add_argument("--above", type=float, default=defaults.above, help="fraction above 1.0")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    return p.parse_args(argv)


def model_from_args(args: argparse.Namespace) -> payloads.CannedModel:
    """The canned model the arguments describe."""
    return payloads.CannedModel(
        name=args.model,
        version=args.version,
        signature=args.signature,
        output_name=args.output,
        batch=args.batch,
        classes=args.classes,
        encoding=args.encoding,
        values=args.values,
        above=args.above,
    )


async def _main(args: argparse.Namespace) -> None:
    server, port = await start(model_from_args(args), args.listen)
    if args.port_file:
        write_port_file(args.port_file, {"grpc": port})
    logger.info("canned upstream serving %s on port %d", args.model, port)
    await serve_until_signal(lambda: server.stop(0))


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.uvloop:
        install_uvloop()
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
