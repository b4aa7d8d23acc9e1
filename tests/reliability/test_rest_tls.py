"""TLS on the REST listener: the same ``tls`` files as the gRPC side, mTLS
with ``ca_file``, and a renewed certificate used without a restart."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from guard.control.config import parse_config
from tests.reliability._certs import CA, Issued, serial_of
from tests.support.guard import RunningGuard, start_in_process
from tests.support.rest_upstream import FakeRestUpstream, Reply

STATUS = b'{"model_version_status": []}'


@pytest.fixture
async def fake() -> AsyncIterator[FakeRestUpstream]:
    upstream = FakeRestUpstream()
    await upstream.start()
    upstream.reply("GET", "/v1/models/m", Reply(body=STATUS))
    yield upstream
    await upstream.stop()


async def _guard(fake: FakeRestUpstream, tls: dict[str, str]) -> RunningGuard:
    data = {
        "listen": "127.0.0.1:0", "upstream": "127.0.0.1:9", "rest_listen": "127.0.0.1:0",
        "rest_upstream": fake.address, "models": [], "tls": tls,
    }  # fmt: skip
    return await start_in_process(parse_config(data, "test.yaml", Path.cwd()))


async def _get(port: int, ca: CA, client: Issued | None = None, where: Path | None = None) -> str:
    """GET over TLS; the body, or the error's class name."""
    context = ssl.create_default_context(cadata=ca.pem.decode())
    if client is not None:
        assert where is not None
        cert, key = client.write(where, f"client-{client.serial}")
        context.load_cert_chain(cert, key)
    url = f"https://127.0.0.1:{port}/v1/models/m"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url, ssl=context, server_hostname="localhost") as response:
                return (await response.read()).decode()
    except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
        return type(exc).__name__


def _serial(port: int, ca: CA) -> int:
    context = ssl.create_default_context(cadata=ca.pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as conn:
            der = conn.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(der)


async def test_rest_over_tls_and_mtls(fake: FakeRestUpstream, tmp_path: Path) -> None:
    ca = CA()
    cert, key = ca.issue("guard", server=True).write(tmp_path, "server")
    plain = await _guard(fake, {"cert_file": str(cert), "key_file": str(key)})
    mutual = await _guard(
        fake, {"cert_file": str(cert), "key_file": str(key), "ca_file": str(ca.write(tmp_path))}
    )
    try:
        assert plain.rest is not None and mutual.rest is not None
        assert await _get(plain.rest.port, ca) == STATUS.decode()
        assert await _get(plain.rest.port, CA("stranger")) != STATUS.decode()
        assert await _get(mutual.rest.port, ca) != STATUS.decode()  # no client certificate
        client = ca.issue("client", server=False)
        assert await _get(mutual.rest.port, ca, client, tmp_path) == STATUS.decode()
        stranger = CA("stranger").issue("client", server=False)
        assert await _get(mutual.rest.port, ca, stranger, tmp_path) != STATUS.decode()
    finally:
        await plain.stop()
        await mutual.stop()


async def test_a_renewed_certificate_is_used_by_new_connections(
    fake: FakeRestUpstream, tmp_path: Path
) -> None:
    ca = CA()
    first = ca.issue("guard", server=True)
    cert, key = first.write(tmp_path, "server")
    guard = await _guard(fake, {"cert_file": str(cert), "key_file": str(key)})
    try:
        assert guard.rest is not None
        port = guard.rest.port
        assert await asyncio.to_thread(_serial, port, ca) == first.serial
        second = ca.issue("guard", server=True)
        second.write(tmp_path, "server")
        assert await asyncio.to_thread(_serial, port, ca) == second.serial
        assert await _get(port, ca) == STATUS.decode()
    finally:
        await guard.stop()
