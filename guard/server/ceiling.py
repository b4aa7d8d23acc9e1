"""A memory ceiling: the overload action of last resort.

Some floods grow the process where the guard cannot see them. grpcio 1.85
grows by 150 MB a second or more, in some runs, while one connection sends
PRIORITY or WINDOW_UPDATE frames, and frees it when that connection
closes; gRPC's Python API shows no connections, so the guard cannot close
that one, and a server's shutdown reaches a connection that floods only
after seconds. Past the container's
memory limit the kernel would kill the process, closing every connection
and losing every call and counter. :class:`MemoryCeiling` reads RSS every
0.1 s and, once it is past ``max_memory_mb`` after a trim, calls
``on_breach``, which shuts down the sockets of every client connection on
the gRPC port (:func:`guard.server.sockets.shut_client_sockets`): gRPC sees
each end at once, frees what it held, and clients reconnect, before the
kernel acts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from guard.control.memory import Statm, trim

__all__ = ["MemoryCeiling"]

logger = logging.getLogger("guard.proxy")

#: How often RSS is read: a flood at 150 MB/s passes the ceiling by ~15 MB
#: before it is seen.
POLL_S = 0.1


class MemoryCeiling:
    """Calls ``on_breach`` while RSS is past ``limit`` bytes (event loop only)."""

    def __init__(
        self,
        limit: int,
        on_breach: Callable[[], Awaitable[None]],
        rss: Callable[[], int] | None = None,
    ) -> None:
        self._limit = limit
        self._on_breach = on_breach
        self._statm: Statm | None = None
        if rss is None:
            rss = self._statm = Statm()
        self._rss = rss
        self.breaches = 0

    async def run(self) -> None:
        """Watch until cancelled."""
        self._warn_if_past_at_start()
        try:
            while True:
                await asyncio.sleep(POLL_S)
                await self.check()
        finally:
            if self._statm is not None:
                self._statm.close()

    def _warn_if_past_at_start(self) -> None:
        """A ceiling under what the guard holds idle (a unit slip: 1 meant as
        1 GiB) closes every connection at every reading, to no end."""
        rss = self._rss()
        if rss > self._limit:
            logger.error(
                "max_memory_mb (%.0f MB) is below what this guard holds at start (RSS %.0f MB): "
                "every gRPC client connection will be closed as soon as it opens; set it a "
                "little under the container's memory limit",
                self._limit / 2**20, rss / 2**20,
            )  # fmt: skip

    async def check(self) -> bool:
        """Act if RSS is past the limit once freed heap is handed back;
        whether it acted."""
        if self._rss() <= self._limit:
            return False
        await asyncio.to_thread(trim)
        rss = self._rss()
        if rss <= self._limit:
            return False
        self.breaches += 1
        logger.error(
            "RSS %.0f MB is past max_memory_mb (%.0f MB): closing every gRPC client "
            "connection to free what they hold (clients reconnect)",
            rss / 2**20, self._limit / 2**20,
        )  # fmt: skip
        await self._on_breach()
        return True
