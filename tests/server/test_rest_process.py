"""``guard serve`` with REST on, as a real process: flags and environment
variables, the port file, and SIGTERM draining a REST call in flight."""

from __future__ import annotations

import asyncio
import os
import signal
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
