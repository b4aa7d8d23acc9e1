"""Shared fixtures: a fake TF Serving upstream built on the official stubs, and
the guard running in-process in front of it. Everything binds port 0.

TensorFlow (through its protos) is imported only when a test asks for the
``upstream`` fixture, so tests of the pure modules run without it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from guard.control.config import Config, parse_config
from tests.support.guard import RunningGuard, start_in_process

if TYPE_CHECKING:
    from tests.support.upstream import FakeUpstream

GuardFactory = Callable[..., Awaitable[RunningGuard]]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A running fake upstream; configure answers with ``.reply``/``.fail``."""
    from tests.support.upstream import FakeUpstream, start_upstream

    fake = await start_upstream(FakeUpstream())
    yield fake
    assert fake.server is not None
    await fake.server.stop(0)


@pytest.fixture
async def make_guard(upstream: FakeUpstream) -> AsyncIterator[GuardFactory]:
    """Start guards in front of ``upstream``: ``await make_guard(yaml_text_or_dict)``."""
    started: list[RunningGuard] = []

    async def factory(config: str | dict[str, Any] | Config = "", **overrides: Any) -> RunningGuard:
        if isinstance(config, Config):
            cfg = config
        else:
            data = yaml.safe_load(config) if isinstance(config, str) else dict(config)
            data = data or {}
            data.setdefault("upstream", upstream.address)
            data.setdefault("listen", "127.0.0.1:0")
            data.setdefault("health_check_interval_s", 0.2)
            data.update(overrides)
            cfg = parse_config(data, source="test.yaml", base_dir=Path.cwd())
        running = await start_in_process(cfg)
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.stop()
