"""guard.server.arrivals: which calls receiving a request the watch refuses,
and when, read against a memory reading the test sets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

import guard.server.arrivals as arrivals_module
from guard.control.config import Config
from guard.server.arrivals import TICK_S, Arrivals
from guard.server.gate import Gate

MB = 1024 * 1024


class Memory:
    """RSS and heap in use, as the test says they are."""

    def __init__(self) -> None:
        self.rss = 100 * MB
        self.in_use = 20 * MB


def _arrivals(budget_mb: int = 64) -> tuple[Arrivals, Gate, Memory]:
    memory = Memory()
    gate = Gate(Config(max_inflight_mb=budget_mb))
    return Arrivals(gate, lambda: memory.rss, lambda: memory.in_use), gate, memory


async def _receiving(arrivals: Arrivals, n: int) -> list[asyncio.Task[Any]]:
    """``n`` tasks that wait as a read does, in the order they began."""
    tasks = [asyncio.create_task(asyncio.sleep(10)) for _ in range(n)]
    for task in tasks:
        arrivals.begin(task)
    return tasks


async def _shed(arrivals: Arrivals, tasks: list[asyncio.Task[Any]]) -> list[bool]:
    await asyncio.sleep(0)  # the cancellations are delivered
    return [task.cancelled() and arrivals.was_shed(task) for task in tasks]


async def test_past_the_bound_all_but_the_first_call_receiving_are_refused() -> None:
    arrivals, _gate, memory = _arrivals()
    tasks = await _receiving(arrivals, 3)
    assert arrivals.check() == 0
    memory.rss += 65 * MB
    memory.in_use += 65 * MB
    assert arrivals.check() == 2
    assert await _shed(arrivals, tasks) == [False, True, True]
    assert "max_inflight_mb (64 MiB)" in arrivals.problem()
    tasks[0].cancel()


async def test_what_the_gate_counts_is_not_held_against_arrivals() -> None:
    arrivals, gate, memory = _arrivals()
    tasks = await _receiving(arrivals, 2)
    gate.inflight_bytes = 40 * MB
    memory.rss += 100 * MB
    memory.in_use += 100 * MB
    assert arrivals.check() == 0  # 100 MB: 40 counted, 60 arriving
    memory.rss += 5 * MB
    memory.in_use += 5 * MB
    assert arrivals.check() == 1
    for task in tasks:
        task.cancel()


async def test_freed_memory_not_yet_handed_back_refuses_nothing() -> None:
    arrivals, _gate, memory = _arrivals()
    tasks = await _receiving(arrivals, 2)
    memory.rss += 300 * MB  # a burst's freed heap, until the trimmer runs
    assert arrivals.check() == 0
    assert arrivals.admit()
    memory.in_use += 65 * MB
    assert arrivals.check() == 1
    for task in tasks:
        task.cancel()


async def test_a_call_alone_is_never_refused() -> None:
    arrivals, _gate, memory = _arrivals()
    (task,) = await _receiving(arrivals, 1)
    memory.rss += 1000 * MB
    memory.in_use += 1000 * MB
    assert arrivals.check() == 0
    assert not task.cancelled()
    arrivals.end(task)
    assert arrivals.admit()  # nothing else receiving
    task.cancel()


async def test_while_past_the_bound_a_new_call_is_refused_before_it_reads() -> None:
    arrivals, _gate, memory = _arrivals()
    tasks = await _receiving(arrivals, 2)
    memory.rss += 65 * MB
    memory.in_use += 65 * MB
    arrivals.check()
    assert not arrivals.admit()
    memory.rss -= 65 * MB
    memory.in_use -= 65 * MB
    assert not arrivals.admit()  # the reading of this tick still holds
    await asyncio.sleep(2 * TICK_S)
    assert arrivals.admit()  # read again, not the last reading's verdict
    for task in tasks:
        task.cancel()


class _Counted(Memory):
    """Memory whose RSS readings are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.readings = 0

    def read_rss(self) -> int:
        self.readings += 1
        return self.rss


@contextlib.asynccontextmanager
async def _watching() -> AsyncIterator[tuple[Arrivals, _Counted]]:
    memory = _Counted()
    arrivals = Arrivals(Gate(Config()), memory.read_rss, lambda: memory.in_use)
    watch = asyncio.create_task(arrivals.run())
    try:
        yield arrivals, memory
    finally:
        watch.cancel()
        arrivals.close()


async def test_the_watch_reads_only_while_two_calls_receive() -> None:
    async with _watching() as (arrivals, memory):
        (first,) = await _receiving(arrivals, 1)
        await asyncio.sleep(0.05)
        assert memory.readings == 1  # the reading at start only
        (second,) = await _receiving(arrivals, 1)
        await asyncio.sleep(0.1)  # ticks of 5, 10, 20, 40 ms while RSS holds still
        assert memory.readings > 3
        arrivals.end(second)
        await asyncio.sleep(0.02)
        settled = memory.readings
        await asyncio.sleep(0.05)
        assert memory.readings == settled
        first.cancel()
        second.cancel()


async def test_the_watch_reads_less_often_while_memory_holds_still() -> None:
    async with _watching() as (arrivals, memory):
        tasks = await _receiving(arrivals, 2)
        await asyncio.sleep(0.5)
        quiet = memory.readings
        assert 3 < quiet <= 0.5 / TICK_S / 4, quiet  # 100 at a steady 5 ms
        for _ in range(10):  # memory moving: back to a reading every tick
            memory.rss += 2 << 20
            await asyncio.sleep(0.02)
        assert memory.readings - quiet >= 10, memory.readings - quiet
        for task in tasks:
            task.cancel()


async def test_memory_held_with_nothing_in_flight_becomes_the_resting_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gRPC may keep memory after calls end; past REST_S with nothing in
    flight, arrivals are bounded from that level, not refused for good."""
    monkeypatch.setattr(arrivals_module, "REST_S", 0.05)
    arrivals, gate, memory = _arrivals()
    watch = asyncio.create_task(arrivals.run())
    try:
        memory.rss += 200 * MB  # held by gRPC after a burst, past the 64 MiB bound
        memory.in_use += 200 * MB
        gate.inflight = 1  # a call in flight: not at rest
        await asyncio.sleep(0.2)
        tasks = await _receiving(arrivals, 2)
        assert arrivals.check() == 1  # still counted from the old level
        await _shed(arrivals, tasks)
        for task in tasks:
            task.cancel()
            arrivals.end(task)  # as a read's end does
        gate.inflight = 0
        await asyncio.sleep(0.2)
        tasks = await _receiving(arrivals, 2)
        assert arrivals.check() == 0  # at rest for REST_S: the new level
        memory.rss += 100 * MB
        memory.in_use += 100 * MB
        assert arrivals.check() == 1  # growth from there is bounded again
        await _shed(arrivals, tasks)
    finally:
        watch.cancel()
        arrivals.close()
