"""The raw-bytes Python gRPC passthrough: the floor of a Python hop.

No rules, no parsing, no metrics: every unary method is forwarded as bytes to the
upstream through ``channel.unary_unary(method)`` without serializers, with the
client's metadata and deadline; the upstream's status, details and trailing
metadata come back unchanged. Whatever the guard costs above this is its own.

    python -m bench.passthrough --upstream 127.0.0.1:8510 --listen 127.0.0.1:0 --port-file F

``--uvloop``, ``--sync`` and ``--server-option`` / ``--channel-option`` exist to
measure what lowers the cost of the hop itself; ``--stream-unary`` what the
guard's own way of receiving a request costs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent import futures
from typing import Any

import grpc

from bench._common import MESSAGE_OPTIONS, install_uvloop, serve_until_signal, write_port_file

logger = logging.getLogger("bench.passthrough")

Metadata = tuple[tuple[str, str | bytes], ...]

# Headers that gRPC itself sets on the outgoing call; forwarding them is refused
# or duplicated.
_HOP_HEADERS = frozenset({"user-agent", ":authority", "te", "content-type", "grpc-timeout"})


def forwardable(metadata: Sequence[tuple[str, str | bytes]] | None) -> Metadata:
    """Client metadata minus the transport's own headers."""
    if not metadata:
        return ()
    return tuple((k, v) for k, v in metadata if k not in _HOP_HEADERS)


class AsyncPassthrough(grpc.GenericRpcHandler):
    """grpc.aio generic handler forwarding every unary method as bytes.

    ``stream_unary`` serves each method as the guard does: a stream-unary
    handler that reads the one request message itself (``context.read()``,
    which the guard bounds by ``request_timeout_s``), so the cost of that
    read can be told apart from the guard's own."""

    def __init__(
        self, channel: grpc.aio.Channel, forward_trailers: bool = True, stream_unary: bool = False
    ) -> None:
        self._channel = channel
        self._forward_trailers = forward_trailers
        self._stream_unary = stream_unary
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            behaviour = self._behaviour(method)
            if self._stream_unary:
                handler = grpc.stream_unary_rpc_method_handler(_reading(behaviour))
            else:
                handler = grpc.unary_unary_rpc_method_handler(behaviour)
            self._handlers[method] = handler
        return handler

    def _behaviour(
        self, method: str
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        upstream = self._channel.unary_unary(method)
        forward_trailers = self._forward_trailers

        async def behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            call = upstream(
                request,
                metadata=forwardable(context.invocation_metadata()),
                timeout=context.time_remaining(),
            )
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as err:
                await context.abort(
                    err.code(), err.details() or "", tuple(err.trailing_metadata() or ())
                )
                raise
            if forward_trailers:
                trailing = await call.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(tuple(trailing))
            return response

        return behaviour


def _reading(
    behaviour: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]],
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[bytes]]:
    async def read_then_forward(_requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        request = await context.read()
        assert isinstance(request, bytes), "the benchmark's clients send one message"
        return await behaviour(request, context)

    return read_then_forward


class SyncPassthrough(grpc.GenericRpcHandler):
    """Thread-pool (sync API) variant, for comparison only."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._lock = threading.Lock()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        with self._lock:
            handler = self._handlers.get(method)
            if handler is None:
                handler = grpc.unary_unary_rpc_method_handler(self._behaviour(method))
                self._handlers[method] = handler
        return handler

    def _behaviour(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        upstream = self._channel.unary_unary(method)

        def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                response, call = upstream.with_call(
                    request,
                    metadata=forwardable(context.invocation_metadata()),
                    timeout=context.time_remaining(),
                )
            except grpc.RpcError as err:
                context.set_trailing_metadata(err.trailing_metadata() or ())  # type: ignore[attr-defined]
                context.abort(err.code(), err.details() or "")  # type: ignore[attr-defined]
                raise
            trailing = call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            return bytes(response)

        return behaviour


def _options(pairs: Sequence[str]) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = list(MESSAGE_OPTIONS)
    for pair in pairs:
        key, _, value = pair.partition("=")
        options.append((key, int(value) if value.lstrip("-").isdigit() else value))
    return options


async def start_async(
    upstream: str,
    listen: str,
    server_options: Sequence[str] = (),
    channel_options: Sequence[str] = (),
    forward_trailers: bool = True,
    stream_unary: bool = False,
) -> tuple[grpc.aio.Server, grpc.aio.Channel, int]:
    """Start the asyncio passthrough; return server, upstream channel and port."""
    channel = grpc.aio.insecure_channel(upstream, options=_options(channel_options))
    server = grpc.aio.server(options=_options(server_options))
    server.add_generic_rpc_handlers((AsyncPassthrough(channel, forward_trailers, stream_unary),))
    port = server.add_insecure_port(listen)
    await server.start()
    return server, channel, port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__)
    p.add_argument("--upstream", required=True)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--port-file", help='write {"grpc": PORT} here once serving')
    p.add_argument("--uvloop", action="store_true", help="run the asyncio server on uvloop")
    p.add_argument("--sync", action="store_true", help="use the thread-pool server instead")
    p.add_argument("--workers", type=int, default=8, help="threads of the --sync server")
    p.add_argument("--no-trailers", action="store_true", help="skip forwarding trailers")
    p.add_argument(
        "--stream-unary",
        action="store_true",
        help="serve each method stream-unary and read the request, as the guard does",
    )
    p.add_argument("--server-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--channel-option", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


async def _main_async(args: argparse.Namespace) -> None:
    server, channel, port = await start_async(
        args.upstream,
        args.listen,
        args.server_option,
        args.channel_option,
        forward_trailers=not args.no_trailers,
        stream_unary=args.stream_unary,
    )
    if args.port_file:
        write_port_file(args.port_file, {"grpc": port})
    logger.info("passthrough on port %d -> %s", port, args.upstream)

    async def stop() -> None:
        await server.stop(0)
        await channel.close()

    await serve_until_signal(stop)


def _main_sync(args: argparse.Namespace) -> None:
    channel = grpc.insecure_channel(args.upstream, options=_options(args.channel_option))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers),
        options=_options(args.server_option),
    )
    server.add_generic_rpc_handlers((SyncPassthrough(channel),))
    port = server.add_insecure_port(args.listen)
    server.start()
    if args.port_file:
        write_port_file(args.port_file, {"grpc": port})
    logger.info("sync passthrough on port %d -> %s", port, args.upstream)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(0)
    channel.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.sync:
        _main_sync(args)
        return
    if args.uvloop:
        install_uvloop()
    asyncio.run(_main_async(args))


if __name__ == "__main__":
    main()
