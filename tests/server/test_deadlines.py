"""guard.server.deadlines: shared timers for the request read limit, and
for answers that must be taken within the idle limit."""

from __future__ import annotations

import asyncio
import time

import pytest

from guard.server.deadlines import Deadlines, Overdue

TICK_S = 0.01


async def _wait(deadlines: Deadlines, timeout_s: float, wait_s: float) -> str:
    try:
        await deadlines.wait(asyncio.sleep(wait_s), timeout_s)
        return "done"
    except TimeoutError:
        return "timed out"


async def test_a_wait_past_its_limit_times_out_never_early() -> None:
    deadlines = Deadlines(TICK_S)
    start = time.monotonic()
    assert await _wait(deadlines, 0.05, 10) == "timed out"
    elapsed = time.monotonic() - start
    assert 0.05 <= elapsed < 0.5


async def test_a_wait_within_its_limit_is_left_alone() -> None:
    deadlines = Deadlines(TICK_S)
    assert await _wait(deadlines, 0.05, 0) == "done"
    await asyncio.sleep(0.1)  # the bucket's timer fires with nothing left to cancel
    assert await _wait(deadlines, 0.05, 0) == "done"


async def test_many_waits_share_a_timer_and_each_times_out() -> None:
    deadlines = Deadlines(TICK_S)
    results = await asyncio.gather(*(_wait(deadlines, 0.03, 10) for _ in range(20)))
    assert results == ["timed out"] * 20


async def _inner_wait(deadlines: Deadlines, timeout_s: float, saw: list[str]) -> None:
    """A wait of ``timeout_s`` on a sleep that outlasts it, nested in the
    caller's; ``saw`` gets how it ended: "timed out" or "cancelled"."""
    try:
        await deadlines.wait(asyncio.sleep(10), timeout_s)
    except TimeoutError:
        saw.append("timed out")
        raise
    except asyncio.CancelledError:
        saw.append("cancelled")
        raise


async def test_a_nested_wait_leaves_the_outer_deadline_to_the_outer_wait() -> None:
    """A wait inside another on the same task (a metadata fetch, with the
    upstream client's own limit, within what is left of the call's): the
    shorter outer deadline is the outer wait's timeout, never the inner's."""
    deadlines = Deadlines(TICK_S)
    inner_saw: list[str] = []
    with pytest.raises(TimeoutError):
        await deadlines.wait(_inner_wait(deadlines, 5.0, inner_saw), 0.03)
    assert inner_saw == ["cancelled"]
    # The inner's own, shorter, deadline is the inner's.
    with pytest.raises(TimeoutError):
        await deadlines.wait(deadlines.wait(asyncio.sleep(10), 0.03), 5.0)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_nested_waits_due_in_one_tick_leave_the_timeout_to_the_outer() -> None:
    """Red team: a predict answered at once, then a metadata fetch that
    hangs: the call's deadline (outer) and the fetch's own (inner) fell in
    one 10 ms tick, and the inner took the outer's timeout (a 500 "metadata
    request timed out" where the call's 504 was due) 99 times in 100."""
    deadlines = Deadlines(TICK_S)
    for _ in range(50):
        inner_saw: list[str] = []
        with pytest.raises(TimeoutError):
            await deadlines.wait(_inner_wait(deadlines, 0.0301, inner_saw), 0.03)
        assert inner_saw == ["cancelled"]


async def test_a_cancellation_from_elsewhere_still_propagates() -> None:
    deadlines = Deadlines(TICK_S)
    task = asyncio.ensure_future(_wait(deadlines, 10, 10))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_racing_the_deadline_propagates() -> None:
    deadlines = Deadlines(TICK_S)
    loop = asyncio.get_running_loop()

    async def waiter() -> None:
        task = asyncio.current_task()
        assert task is not None
        handle = deadlines.start(task, 0.02)
        key, _ = handle
        loop.call_at(key * TICK_S, task.cancel)  # due with the deadline's own timer
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            assert not deadlines.stop(handle, task)  # two cancellations: not only a timeout
            raise

    with pytest.raises(asyncio.CancelledError):
        await asyncio.ensure_future(waiter())


async def test_overdue_things_are_reported_in_order_and_only_those() -> None:
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, float]] = []
    began = loop.time()
    overdue = Overdue(0.1, lambda item: seen.append((item, loop.time() - began)))
    overdue.add("a")
    overdue.add("b")
    await asyncio.sleep(0.05)
    overdue.add("c")  # due 0.05 s after a and b
    overdue.discard("b")  # gone in time
    overdue.discard("never added")
    await asyncio.sleep(0.2)
    assert [item for item, _ in seen] == ["a", "c"]
    assert seen[0][1] >= 0.1 and seen[1][1] >= 0.15, seen  # never early
    assert len(overdue) == 0
    overdue.add("d")  # the timer is set again once all are gone
    await asyncio.sleep(0.15)
    assert [item for item, _ in seen] == ["a", "c", "d"]


async def test_an_overdue_handler_that_fails_stops_nothing_else() -> None:
    seen: list[str] = []

    def handle(item: str) -> None:
        if item == "bad":
            raise RuntimeError("the handler failed")
        seen.append(item)

    overdue = Overdue(0.02, handle)
    for item in ("a", "bad", "b"):
        overdue.add(item)
    await asyncio.sleep(0.1)
    assert seen == ["a", "b"] and len(overdue) == 0
