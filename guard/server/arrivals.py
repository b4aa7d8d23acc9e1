"""gRPC requests still arriving, bounded by what the process holds.

gRPC reads a request message whole before the guard's handler gets it, and
says nothing of its size until then, so :class:`~guard.server.gate.Gate`
counts a request only once it has arrived. Sixteen requests of 31 MB sent
together grew the guard by 816 MB against a ``max_inflight_mb`` of 64, and
a pod at its memory limit is killed.

While two or more calls are receiving, :class:`Arrivals` reads the process's
RSS every tick. Once its growth over the lowest it has been passes what the
gate counts plus ``max_inflight_mb``, the calls that began receiving last are
refused: gRPC then ends their streams and frees what it had received of
them. The call that began first goes on (a call alone is never refused).
RSS, not the allocator's count, is what a memory limit holds the process to:
heap that is free but not yet returned counts too, until the trimmer hands
it back (:class:`guard.control.memory.Trimmer`).
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from guard.control.memory import Statm
from guard.server.gate import Gate

__all__ = ["Arrivals"]

#: How often RSS is read while calls are receiving. gRPC took 16 requests
#: of 31 MB in about a second on loopback: some 5 MB a tick may pass unseen.
TICK_S = 0.005
#: While RSS holds still (relayed streams waiting for their client's next
#: message count as receiving), the tick doubles up to this: four idle
#: relayed streams cost 26 ms of CPU a second at 5 ms, about 3 at 80.
QUIET_TICK_S = 0.08
_QUIET_BYTES = 1 << 20  # RSS moving less than this between readings is still
#: How often, with nothing in flight, the resting memory is read again.
REST_S = 1.0


class Arrivals:
    """The calls receiving their request, and the watch that refuses the last
    ones when the process holds too much (event loop only)."""

    def __init__(
        self,
        gate: Gate,
        rss: Callable[[], int] | None = None,
        in_use: Callable[[], int] | None = None,
    ) -> None:
        self._gate = gate
        self._statm = Statm()
        self._rss = rss or self._statm
        self._heap = _HeapInUse(in_use)
        self._low = self._rss()
        self._receiving: dict[asyncio.Task[Any], None] = {}  # in the order they began
        # Weak: a task whose read ended before the cancellation landed may
        # never ask (was_shed); it must not be kept, with what it holds.
        self._shed: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._wake = asyncio.Event()
        self.grown = 0
        """RSS over its low-water mark at the last reading, in bytes."""
        self.over = False
        """Whether that was past the bound."""
        self._read_at = 0.0

    def begin(self, task: asyncio.Task[Any]) -> None:
        """``task`` starts receiving a request."""
        self._receiving[task] = None
        if len(self._receiving) == 2:
            self._wake.set()

    def end(self, task: asyncio.Task[Any]) -> None:
        """``task`` has its request, or stopped waiting for it."""
        self._receiving.pop(task, None)

    def was_shed(self, task: asyncio.Task[Any]) -> bool:
        """Whether a cancellation ``task`` received came from the watch (and no
        other is pending); the caller then refuses the call."""
        if task not in self._shed:
            return False
        self._shed.discard(task)
        return task.uncancel() == 0

    def problem(self) -> str:
        """What a refused call's client is told."""
        budget = self._gate.config.max_inflight_mb
        return (
            f"guard: requests still arriving took the guard {self.grown} bytes over its "
            f"resting memory, past max_inflight_mb ({budget} MiB) beside the "
            f"{self._gate.inflight_bytes} bytes counted for calls in flight; retry with "
            "backoff, send smaller requests, or raise max_inflight_mb in the guard config"
        )

    def admit(self) -> bool:
        """Whether a call may start receiving: alone, or while the process is
        within bounds. A reading that said it was not is taken again once a
        tick old (at most one a tick: the heap's costs up to 0.25 ms)."""
        if not self.over or not self._receiving:
            return True
        if time.monotonic() - self._read_at >= TICK_S:
            self.check()
        return not self.over

    async def run(self) -> None:
        """Watch while calls are receiving, until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), REST_S)
            except TimeoutError:
                self._rest()
                continue
            tick, last = TICK_S, self.grown
            while len(self._receiving) >= 2:
                self.check()
                still = abs(self.grown - last) < _QUIET_BYTES and not self.over
                tick = min(tick * 2, QUIET_TICK_S) if still else TICK_S
                last = self.grown
                await asyncio.sleep(tick)
            self._wake.clear()

    def _rest(self) -> None:
        """With no call in flight or arriving, what the process holds is its
        resting memory: the bound counts growth from there. gRPC may keep
        memory after calls end (a burst of 48 relayed 31 MB messages left
        100-260 MB in use for good), which would otherwise refuse every pair
        of calls arriving together after it; ``max_memory_mb`` bounds that."""
        gate = self._gate
        if self._receiving or gate.inflight or gate.pending or gate.inflight_bytes:
            return
        self._low = self._rss()
        self._heap.rest()
        self.over = False

    def check(self) -> int:
        """Read RSS once; refuse all but the first call receiving if it is
        past the bound. Returns how many were refused."""
        self._read_at = time.monotonic()
        rss = self._rss()
        self._low = min(self._low, rss)
        self.grown = rss - self._low
        allowed = self._gate.inflight_bytes + self._gate.config.max_inflight_bytes
        if self.grown > allowed:
            # Freed heap the trimmer has not handed back yet counts in RSS, and
            # new arrivals reuse it: only what is in use is held against them.
            self.grown = min(self.grown, self._heap.grown())
        self.over = self.grown > allowed
        if not self.over or len(self._receiving) < 2:
            return 0
        later = list(self._receiving)[1:]
        for task in later:
            if task not in self._shed and not task.done():
                self._shed.add(task)
                task.cancel()
        return len(later)

    def close(self) -> None:
        """Let go of what reading RSS holds open."""
        self._statm.close()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


class _HeapInUse:
    """How far the heap in use (glibc's ``mallinfo2``: allocated chunks and
    mappings) has grown over the least it has been. It walks the arenas'
    free lists (0.05-0.25 ms), so it is read only when RSS says the bound
    is past. Where there is no ``mallinfo2``, growth is unbounded: RSS
    alone decides."""

    def __init__(self, in_use: Callable[[], int] | None = None) -> None:
        self._in_use = in_use or _mallinfo2_in_use()
        self._low = self._in_use() if self._in_use is not None else 0

    def rest(self) -> None:
        """What is in use now is the least from here on."""
        if self._in_use is not None:
            self._low = self._in_use()

    def grown(self) -> int:
        if self._in_use is None:
            return sys.maxsize
        in_use = self._in_use()
        self._low = min(self._low, in_use)
        return in_use - self._low


def _mallinfo2_in_use() -> Callable[[], int] | None:
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use
