"""How long the event loop stayed busy: a ticker that sleeps a few
milliseconds at a time and records how late it woke."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class LoopLag:
    """The lateness of each wake-up, in seconds; :attr:`worst` is the longest
    the loop was held by anything else."""

    def __init__(self) -> None:
        self.lags = [0.0]

    @property
    def worst(self) -> float:
        return max(self.lags)


@contextlib.asynccontextmanager
async def loop_lag(tick_s: float = 0.005) -> AsyncIterator[LoopLag]:
    """Measure the running loop's lag for the duration of the block."""
    loop = asyncio.get_running_loop()
    lag = LoopLag()

    async def ticker() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(tick_s)
            lag.lags.append(loop.time() - before - tick_s)

    task = asyncio.create_task(ticker())
    try:
        yield lag
    finally:
        task.cancel()
