"""guard.server.ceiling: the memory ceiling, past which every gRPC client
connection is shut down (what gRPC then frees), on real sockets and a real
guard process."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from guard.server.ceiling import MemoryCeiling, shut_client_sockets
from tests.attacks import _harness as H
from tests.attacks import h2raw


def _pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    return client, accepted


def test_only_the_connections_of_the_port_are_shut() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_server(("127.0.0.1", 0)) as other,
    ):
        port = listener.getsockname()[1]
        client, accepted = _pair(listener)
        other_client, other_accepted = _pair(other)
        try:
            assert shut_client_sockets(port) == 1
            client.settimeout(5)
            assert client.recv(1) == b""  # the peer sees the connection end
            other_accepted.sendall(b"x")
            assert other_client.recv(1) == b"x"  # another port's connection: untouched
            again, again_accepted = _pair(listener)  # the listener still takes new ones
            again_accepted.sendall(b"y")
            assert again.recv(1) == b"y"
            again.close()
            again_accepted.close()
        finally:
            for s in (client, accepted, other_client, other_accepted):
                s.close()


async def test_the_ceiling_acts_only_past_its_limit() -> None:
    rss = 100
    breaches: list[int] = []

    async def on_breach(seen: int) -> None:
        breaches.append(seen)

    ceiling = MemoryCeiling(200, on_breach, lambda: rss)
    assert not await ceiling.check()
    rss = 300
    assert await ceiling.check()
    assert breaches == [300] and ceiling.breaches == 1


def test_a_guard_past_max_memory_mb_closes_its_grpc_connections(tmp_path: Path) -> None:
    # 1 MiB: always past it. Every connection is shut within a reading or two.
    with H.guarded(tmp_path, "max_memory_mb: 1\n" + H.BASE_RULES) as (_up, guard):
        with h2raw.H2Client("127.0.0.1", guard.port, timeout=5) as client:
            start = time.monotonic()
            while not client.closed and time.monotonic() - start < 10:
                client.drain(0.1)
                client.send_ping()
            closed_after_s = time.monotonic() - start
        resets = H.sample(guard.metrics(), "guard_memory_resets_total")
        log = guard.log()
    assert client.closed and closed_after_s < 3, closed_after_s
    assert resets >= 1
    assert "is past max_memory_mb (1 MB)" in log and "closed 1 gRPC client connections" in log
