"""Row 15: sixteen REST requests of 31 MB sent at once. Each body used to be
read whole before any of it was counted in ``max_inflight_mb``: the guard
went from 65 to 690 MB before refusing most of them. A body is now counted
as it arrives, and refused (429, naming the setting) once the budget would
pass: every client gets an answer, and the peak stays near the budget."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.attacks._harness import hwm_kb
from tests.support.guard import guard_process
from tests.support.rest_upstream import FakeRestUpstream

BUDGET_MB = 64
CLIENTS = 16
BODY = b'{"instances": [' + b"1," * (15 * 1024 * 1024) + b"1]}"  # 31 MB


@pytest.fixture
async def fake() -> AsyncIterator[FakeRestUpstream]:
    upstream = FakeRestUpstream()
    await upstream.start()
    upstream.predict("x", b'{"predictions": [[0.5]]}', delay_s=0.5)
    yield upstream
    await upstream.stop()


async def test_bodies_arriving_together_are_counted_as_they_come(
    fake: FakeRestUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "guard.yaml"
    config.write_text(f"models: []\nmax_inflight_mb: {BUDGET_MB}\n")
    flags = ("--upstream", "127.0.0.1:9", "--rest-listen", "127.0.0.1:0")
    async with guard_process(config, tmp_path, *flags, "--rest-upstream", fake.address) as guard:
        before_kb = hwm_kb(guard.process.pid)
        async with aiohttp.ClientSession() as session:

            async def predict() -> tuple[int, bytes]:
                url = f"{guard.rest_url}/v1/models/x:predict"
                async with session.post(url, data=io.BytesIO(BODY)) as response:
                    return response.status, await response.read()

            answers = await asyncio.gather(*(predict() for _ in range(CLIENTS)))
        peak_mb = (hwm_kb(guard.process.pid) - before_kb) / 1024
        refused = guard.sample("guard_refused_requests_total", reason="inflight_bytes")
    statuses = sorted(status for status, _ in answers)
    assert set(statuses) == {200, 429}, statuses
    errors = {json.loads(body)["error"] for status, body in answers if status == 429}
    assert all("max_inflight_mb (64 MiB)" in e for e in errors), errors
    assert refused == statuses.count(429)
    assert [s.method for s in fake.seen].count("POST") == statuses.count(200)
    assert peak_mb < 4 * BUDGET_MB, f"the guard's peak grew {peak_mb:.0f} MB"
