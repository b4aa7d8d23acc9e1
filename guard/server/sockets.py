"""Ending gRPC client connections from outside gRPC.

gRPC's Python API shows no connections, and a server call whose answer waits
on a client that never opens its flow-control window cannot be ended from
Python: its status would queue behind the answer. Shutting the socket down
(``shutdown(2)``, both ways) is seen by gRPC at once; it ends the calls on
that connection and frees what they held, and the client may reconnect.
The sockets are found through /proc (Linux only): the connection's inode in
/proc/net/tcp{,6}, then the descriptor of this process that points at it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import urllib.parse

__all__ = ["parse_peer", "shut_client_sockets"]

_LISTEN = "0A"  # /proc/net/tcp's state of a listening socket

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def parse_peer(peer: str) -> Address | None:
    """The address and port in gRPC's ``context.peer()`` (``ipv4:1.2.3.4:5``,
    ``ipv6:%5B::1%5D:5``), or ``None`` for any other kind of peer."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isdigit():
        return None
    try:
        return _plain(ipaddress.ip_address(host.strip("[]"))), int(port)
    except ValueError:
        return None


def shut_client_sockets(port: int, remote: Address | None = None) -> int:
    """Shut down (both ways) every connected socket of this process whose
    local port is ``port`` (and, given ``remote``, whose peer is that one):
    its owner sees the connection end. The descriptors stay open, and are
    checked again just before (a descriptor closed and reused meanwhile is
    left alone). Returns how many."""
    inodes = _connection_inodes(port, remote)
    shut = 0
    for name in os.listdir("/proc/self/fd") if inodes else ():
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            shut += _shut(int(name), port)
    return shut


def _connection_inodes(port: int, remote: Address | None) -> set[str]:
    """Socket inodes of this network namespace's TCP connections whose local
    port is ``port`` (and peer ``remote``), listening sockets left out."""
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
            if local_port != port or fields[3] == _LISTEN:
                continue
            if remote is None or _proc_address(fields[2]) == remote:
                inodes.add(fields[9])
    return inodes


def _proc_address(field: str) -> Address:
    """/proc/net/tcp's ``0100007F:D431``: the address as 32-bit words in the
    kernel's byte order, the port in hex."""
    host, port = field.split(":")
    raw = bytes.fromhex(host)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return _plain(ipaddress.ip_address(raw)), int(port, 16)


def _plain(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 client of a dual-stack listener as IPv4 (gRPC names it so)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


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
