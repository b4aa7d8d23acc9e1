"""How long the event loop stayed busy: a ticker that sleeps a few
milliseconds at a time and records how late it woke."""

from __future__ import annotations

import asyncio
import contextlib
import gc
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
    """Measure the running loop's lag for the duration of the block.

    The objects alive before it (the whole test session's, TensorFlow's
    among them where a test imported it) are kept out of the collector's
    reach meanwhile: a full collection over them is the test process's
    cost, not the guard's (0.12 s with TensorFlow and two test modules
    imported; a rotation measured 0.313 s once in CI, 0.002 s alone)."""
    loop = asyncio.get_running_loop()
    lag = LoopLag()
    gc.freeze()

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
        gc.unfreeze()
