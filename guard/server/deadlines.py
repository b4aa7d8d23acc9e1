"""Time limits for many short waits, with one loop timer per tick instead of
one per wait (:class:`Deadlines`), or one for all when they share a limit
(:class:`Overdue`).

``asyncio.timeout`` schedules and cancels a timer handle for every call; on a
1x1 call through the guard that was about a tenth of the handler's Python
time. Here a wait joins the bucket of the tick its deadline falls in (never
earlier, at most one tick later), and the bucket's one timer cancels whatever
is still waiting when it fires.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

__all__ = ["Deadlines", "Overdue"]

logger = logging.getLogger("guard.proxy")

#: How late a limit may fire, in seconds: a short fraction of the shortest
#: limit anyone would set, and few enough timers under load.
TICK_S = 0.01

T = TypeVar("T")

#: One wait: its deadline (loop time), then the order it began in.
Token = tuple[float, int]


class Deadlines:
    """Cancels tasks still waiting when their deadline passes (event loop only)."""

    def __init__(self, tick_s: float = TICK_S) -> None:
        self._tick_s = tick_s
        self._buckets: dict[int, dict[Token, asyncio.Task[Any]]] = {}
        # The task a deadline cancelled, and that wait's token: a wait nested
        # in another on the same task must not take the outer's cancellation
        # for its own, even where both deadlines fall in one tick.
        self._expired: dict[asyncio.Task[Any], Token] = {}
        self._order = itertools.count()

    async def wait(self, awaitable: Awaitable[T], timeout_s: float) -> T:
        """``await awaitable``, or raise :class:`TimeoutError` once
        ``timeout_s`` seconds have passed, as ``asyncio.timeout`` would (a
        cancellation from elsewhere still propagates)."""
        task = asyncio.current_task()
        assert task is not None
        handle = self.start(task, timeout_s)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.stop(handle, task):
                raise TimeoutError from None
            raise
        finally:
            self.stop(handle, task)

    def start(self, task: asyncio.Task[Any], timeout_s: float) -> tuple[int, Token]:
        """Cancel ``task`` once ``timeout_s`` seconds have passed, unless
        :meth:`stop` comes first; returns what :meth:`stop` takes."""
        loop = task.get_loop()
        due = loop.time() + timeout_s
        key = math.ceil(due / self._tick_s)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            loop.call_at(key * self._tick_s, self._fire, key)
        token = (due, next(self._order))
        bucket[token] = task
        return key, token

    def stop(self, handle: tuple[int, Token], task: asyncio.Task[Any]) -> bool:
        """Stop timing ``task``; True if its deadline cancelled it. As with
        ``asyncio.timeout``, a cancellation from elsewhere as well still
        propagates: True only when this was the one cancellation pending."""
        key, token = handle
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.pop(token, None)
        if self._expired.get(task) != token:
            return False
        del self._expired[task]
        return task.uncancel() == 0

    def _fire(self, key: int) -> None:
        bucket = self._buckets.pop(key, None)
        if not bucket:
            return
        # A task waiting twice here (nested waits) is cancelled once, for the
        # deadline that came first: on a tie, the wait that began first (the outer).
        for token in sorted(bucket):
            task = bucket[token]
            if not task.done() and task not in self._expired:
                self._expired[task] = token
                task.cancel()


class Overdue:
    """Things that should be gone within ``limit_s`` of being added, and
    ``on_overdue`` for each that is not. One limit for all, so they fall due
    in the order they came: one loop timer, set for the oldest (event loop
    only)."""

    def __init__(self, limit_s: float, on_overdue: Callable[[Any], None]) -> None:
        self._limit_s = limit_s
        self._on_overdue = on_overdue
        self._due: dict[Hashable, float] = {}  # in the order added
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, item: Hashable) -> None:
        """Start timing ``item``."""
        loop = asyncio.get_running_loop()
        self._due[item] = due = loop.time() + self._limit_s
        if self._timer is None:
            self._timer = loop.call_at(due, self._fire)

    def discard(self, item: Hashable) -> None:
        """``item`` is gone in time (or was never added)."""
        self._due.pop(item, None)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._due:
            item, due = next(iter(self._due.items()))
            if due > now:
                self._timer = loop.call_at(due, self._fire)
                return
            del self._due[item]
            try:
                self._on_overdue(item)
            except Exception:  # the others still fall due, and the timer is set again
                logger.exception("handling an overdue item failed")
