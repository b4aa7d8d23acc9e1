"""A fake TF Serving REST upstream: a real aiohttp server on an ephemeral port.

Each path answers what the test set with :meth:`FakeRestUpstream.reply`
(status, body, headers, an optional delay); every request is recorded as it
arrived, so tests can check that the guard forwarded it unchanged.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeRestUpstream", "Reply", "Seen", "metadata_body"]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay_s: float = 0.0
    chunked: bool = False
    """Sent with ``Transfer-Encoding: chunked``, no length."""


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def metadata_body(
    name: str, outputs: dict[str, tuple[str, list[int]]], version: int = 1, signature: str = ""
) -> bytes:
    """TF Serving's GetModelMetadata JSON for one signature (``serving_default`` by default)."""
    sig = {
        "inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}]}}},
        "outputs": {
            alias: {
                "dtype": dtype,
                "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                                 "unknown_rank": False},
                "name": f"{alias}:0",
            }
            for alias, (dtype, dims) in outputs.items()
        },
        "method_name": "tensorflow/serving/predict",
    }  # fmt: skip
    doc = {
        "model_spec": {"name": name, "signature_name": "", "version": str(version)},
        "metadata": {"signature_def": {"signature_def": {signature or "serving_default": sig}}},
    }
    return json.dumps(doc, indent=1).encode()


class FakeRestUpstream:
    """``await start()``; ``address`` is ``127.0.0.1:PORT``."""

    def __init__(self) -> None:
        self.replies: dict[tuple[str, str], Reply] = {}
        self.seen: list[Seen] = []
        self.address = ""
        self._runner: web.AppRunner | None = None

    def reply(self, method: str, path: str, reply: Reply) -> None:
        self.replies[(method, path)] = reply

    def predict(self, model: str, body: bytes | str, **kwargs: Any) -> None:
        """Answer ``POST /v1/models/MODEL:predict`` with ``body``."""
        data = body.encode() if isinstance(body, str) else body
        self.reply("POST", f"/v1/models/{model}:predict", Reply(body=data, **kwargs))

    def metadata(self, model: str, outputs: dict[str, tuple[str, list[int]]], **kw: Any) -> None:
        body = metadata_body(model, outputs, **kw)
        self.reply("GET", f"/v1/models/{model}/metadata", Reply(body=body))

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        reply = self.replies.get((request.method, request.path))
        if reply is None:
            return web.Response(
                status=404, body=b'{ "error": "no such path in the fake" }',
                content_type="application/json",
            )  # fmt: skip
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if not reply.chunked:
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(reply.body)
        await response.write_eof()
        return response
