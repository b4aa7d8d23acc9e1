"""A call's slots are given back before its client has the answer."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from guard.metrics.guard_metrics import GuardMetrics
from guard.server.handler import Call


async def test_a_failed_call_is_timed_and_gives_back_its_slots_before_its_client_sees_it() -> None:
    """grpc.aio sends the status from within ``abort``, ahead of the
    handler's ``finally``: a slot given back there was still held, in the
    gauges too, when the client had its answer (a scrape saw a relayed
    stream that its client had seen end), and the call's timing was not
    yet in ``guard_overhead_seconds``."""
    held = [True]
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)

    def seen() -> tuple[float | None, float | None]:
        labels = {"protocol": "grpc", "method": "m"}
        return (
            registry.get_sample_value("guard_overhead_seconds_count", labels),
            registry.get_sample_value("guard_upstream_duration_seconds_count", labels),
        )

    async def handler(_request: bytes, context: Any) -> bytes:
        call = Call(metrics, "m")
        call.hold(lambda: held.__setitem__(0, False))
        try:
            await call.fail(context, grpc.StatusCode.UNIMPLEMENTED, "not here")
        finally:
            await asyncio.sleep(0.3)  # the handler goes on after the status is sent
            call.finish()

    server = grpc.aio.server()
    methods = {"m": grpc.unary_unary_rpc_method_handler(handler)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("s", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                await channel.unary_unary("/s/m")(b"")
                raise AssertionError("the call did not fail")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
                assert held == [False]
                assert seen() == (1.0, 1.0)
            await asyncio.sleep(0.5)  # the handler's finish has run: timed once, not twice
            assert seen() == (1.0, 1.0)
    finally:
        await server.stop(None)


def test_a_call_gives_back_each_slot_once() -> None:
    counts = [0, 0]
    call = Call(GuardMetrics(CollectorRegistry()), "m")
    call.hold(lambda: counts.__setitem__(0, counts[0] + 1))
    call.hold(lambda: counts.__setitem__(1, counts[1] + 1))
    call.answered()
    call.finish()
    assert counts == [1, 1]
