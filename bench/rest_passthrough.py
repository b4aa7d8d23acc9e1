"""The raw aiohttp HTTP passthrough: the floor of a Python REST hop.

Same library as the guard's REST front-end (aiohttp server and a keep-alive client
session), no rules, no JSON, no metrics: each request is read whole, sent to the
upstream with its method, path, query, headers and body, and the upstream's status,
headers and body come back unchanged. Whatever the guard costs above this is its own.

    python -m bench.rest_passthrough --upstream 127.0.0.1:8511 --listen 127.0.0.1:0 --port-file F

``--client guard`` sends on the guard's own upstream client
(:mod:`guard.server.rest.client`: aiohttp's protocol and parser without
``ClientSession``) instead: the floor of a hop built as the guard's is, to
tell the guard's own work from what its client saves.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from bench._common import serve_until_signal, write_port_file
from guard.server.deadlines import Deadlines
from guard.server.rest.client import UpstreamClient, read_limited

# Connection-level headers (RFC 9110, 7.6.1) and those aiohttp sets itself.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def forwardable(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The end-to-end headers of a request or response (repeated headers kept)."""
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP_HEADERS)


class Passthrough:
    """Forwards every request to ``upstream`` over one keep-alive session."""

    def __init__(self, upstream: str) -> None:
        self._base = f"http://{upstream}"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=600)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        async with self._session.request(
            request.method,
            self._base + request.raw_path,
            headers=forwardable(request.headers),
            data=body,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            return web.Response(
                status=upstream.status, headers=forwardable(upstream.headers), body=payload
            )


class GuardClientPassthrough(Passthrough):
    """The same, sending on the guard's upstream client."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._client = UpstreamClient(upstream, Deadlines(), 600.0, max_idle=1024)
        self._address = upstream

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._client.close()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = forwardable(request.headers)
        headers["Host"] = self._address
        headers["Content-Length"] = str(len(body))
        answer = await self._client.request(request.method, request.raw_path, headers, body)
        try:
            payload = await read_limited(answer, 1 << 30)
        finally:
            answer.release()
        return web.Response(status=answer.status, headers=forwardable(answer.headers), body=payload)


async def _serve(upstream: str, listen: str, port_file: str, client: str) -> None:
    proxy = GuardClientPassthrough(upstream) if client == "guard" else Passthrough(upstream)
    await proxy.start()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host, int(port)).start()
    write_port_file(port_file, {"http": runner.addresses[0][1]})

    async def stop() -> None:
        await runner.cleanup()
        await proxy.close()

    await serve_until_signal(stop)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--client", choices=("session", "guard"), default="session")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.upstream, args.listen, args.port_file, args.client))


if __name__ == "__main__":
    main()
