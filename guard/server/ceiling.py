"""A memory ceiling: the overload action of last resort.

Some floods grow the process where the guard cannot see them. grpcio 1.85
grows by about 150 MB a second while one connection sends PRIORITY frames,
and frees it only when that connection closes; gRPC's Python API shows no
connections, so the guard cannot close that one, and a server's shutdown
reaches a connection that floods only after seconds. Past the container's
memory limit the kernel would kill the process, closing every connection
and losing every call and counter. :class:`MemoryCeiling` reads RSS every
0.1 s and, once it is past ``max_memory_mb`` after a trim, calls
``on_breach``, which shuts down the sockets of every client connection on
the gRPC port (:func:`shut_client_sockets`): gRPC sees each end at once,
frees what it held, and clients reconnect, before the kernel acts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from guard.control.memory import rss_bytes, trim

__all__ = ["MemoryCeiling", "shut_client_sockets"]

logger = logging.getLogger("guard.proxy")

#: How often RSS is read: a flood at 150 MB/s passes the ceiling by ~15 MB
#: before it is seen.
POLL_S = 0.1


class MemoryCeiling:
    """Calls ``on_breach`` while RSS is past ``limit`` bytes (event loop only)."""

    def __init__(
        self,
        limit: int,
        on_breach: Callable[[int], Awaitable[None]],
        rss: Callable[[], int] = rss_bytes,
    ) -> None:
        self._limit = limit
        self._on_breach = on_breach
        self._rss = rss
        self.breaches = 0

    async def run(self) -> None:
        """Watch until cancelled."""
        while True:
            await asyncio.sleep(POLL_S)
            await self.check()

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
        await self._on_breach(rss)
        return True


_LISTEN = "0A"  # /proc/net/tcp's state of a listening socket


def _connection_inodes(port: int) -> set[str]:
    """Socket inodes of this network namespace's TCP connections whose local
    port is ``port``, listening sockets left out."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] != _LISTEN:
                inodes.add(fields[9])
    return inodes


def shut_client_sockets(port: int) -> int:
    """Shut down (both ways) every connected socket of this process whose
    local port is ``port``: its owner sees the connection end. The
    descriptors stay open, and are checked again just before (a descriptor
    closed and reused meanwhile is left alone). Returns how many."""
    inodes = _connection_inodes(port)
    shut = 0
    for name in os.listdir("/proc/self/fd") if inodes else ():
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            shut += _shut(int(name), port)
    return shut


def _shut(fd: int, port: int) -> int:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return 0
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return 0
        if sock.getsockname()[1] != port:
            return 0
        sock.shutdown(socket.SHUT_RDWR)
        return 1
    except OSError:
        return 0
    finally:
        sock.detach()  # the descriptor is gRPC's to close
