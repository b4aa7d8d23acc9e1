"""``guard serve`` with REST on, as a real process: flags and environment
variables, the port file, and SIGTERM draining a REST call in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from guard.control.config import overrides_from, resolve
from tests.support.guard import start_guard
from tests.support.rest_upstream import FakeRestUpstream, Reply


@pytest.fixture
async def fake() -> AsyncIterator[FakeRestUpstream]:
    upstream = FakeRestUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


def test_rest_settings_come_from_file_env_and_flags_in_that_order(tmp_path: Path) -> None:
    config = tmp_path / "guard.yaml"
    config.write_text('rest_upstream: "10.0.0.1:8511"\nmodels: []\n')
    assert resolve(config, {}).rest_upstream == "10.0.0.1:8511"
    assert resolve(config, {}).rest_listen == "0.0.0.0:8501"
    env = {"GUARD_REST_UPSTREAM": "10.0.0.2:8511", "GUARD_REST_LISTEN": "127.0.0.1:7000"}
    from_env = resolve(config, overrides_from(env, {}))
    assert (from_env.rest_upstream, from_env.rest_listen) == ("10.0.0.2:8511", "127.0.0.1:7000")
    flags = {"rest_upstream": "10.0.0.3:8511"}
    assert resolve(config, overrides_from(env, flags)).rest_upstream == "10.0.0.3:8511"
    with pytest.raises(Exception, match="guard.yaml: field 'rest_upstream'"):
        config.write_text("rest_upstream: nowhere\nmodels: []\n")
        resolve(config, {})


async def test_sigterm_drains_a_rest_call_in_flight(fake: FakeRestUpstream, tmp_path: Path) -> None:
    fake.reply("GET", "/v1/models/m", Reply(body=b'{"slow": true}', delay_s=1.0))
    config = tmp_path / "guard.yaml"
    config.write_text("models: []\nshutdown_grace_s: 5\n")
    env = {**os.environ, "GUARD_REST_UPSTREAM": fake.address}
    guard = await asyncio.to_thread(
        start_guard, config, "--rest-listen", "127.0.0.1:0", upstream="127.0.0.1:9", env=env
    )
    try:
        assert set(guard.ports) == {"grpc", "metrics", "rest"}
        async with aiohttp.ClientSession() as session:
            url = f"{guard.rest_url}/v1/models/m"
            async with session.get(url) as response:
                assert (response.status, await response.read()) == (200, b'{"slow": true}')
            call = asyncio.create_task(_get(session, url))
            await asyncio.sleep(0.3)
            guard.signal(signal.SIGTERM)
            assert await call == (200, b'{"slow": true}')
        assert await guard.wait(15) == 0
        assert "serving REST on port" in guard.log()
    finally:
        guard.stop()


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


def test_the_port_file_names_the_rest_port_only_when_served(tmp_path: Path) -> None:
    config = tmp_path / "guard.yaml"
    config.write_text("models: []\n")
    guard = start_guard(config, upstream="127.0.0.1:9")
    try:
        assert set(guard.ports) == {"grpc", "metrics"}
    finally:
        guard.stop()


_IMPORT_REST = """
import ssl, sys
import guard.server.proxy
def anon_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])
before = anon_kb()
import guard.server.rest
import aiohttp.connector as connector
grown = anon_kb() - before
contexts = (connector._SSL_CONTEXT_VERIFIED, connector._SSL_CONTEXT_UNVERIFIED)
print(grown, *(c.cert_store_stats()["x509_ca"] for c in contexts),
      connector._SSL_CONTEXT_VERIFIED.verify_mode == ssl.CERT_REQUIRED,
      ssl.create_default_context().cert_store_stats()["x509_ca"])
"""


def test_rest_imports_aiohttp_without_the_ca_certificates_it_never_uses() -> None:
    # The guard's REST client speaks plain HTTP: aiohttp's import-time client
    # contexts would hold the system's CA bundle (2 MB) for nothing. They stay
    # verifying (an https call through them fails closed), and contexts made
    # afterwards load the certificates as usual.
    # Bytecode compiled as an installed guard has it: compiling the sources
    # on import would leave the compiler's memory in the figure.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-c", _IMPORT_REST], capture_output=True, text=True, env=env
        )
        assert run.returncode == 0, run.stderr
    out = run.stdout.split()
    grown_kb, verified_cas, unverified_cas, verifying, later_cas = out
    assert (verified_cas, unverified_cas, verifying) == ("0", "0", "True")
    assert int(later_cas) > 0, "the system's CA bundle is installed (ca-certificates)"
    # The budget for REST is 10 MB of idle RSS. The import's anonymous
    # part was 9.2 MB with the certificates, and is 7.6 MB without.
    assert int(grown_kb) < 8 * 1024, f"importing the REST front-end took {grown_kb} KiB"
