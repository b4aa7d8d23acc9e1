"""Addresses: ``host:port`` strings, split and joined, and whether one can be bound."""

from __future__ import annotations

import errno
import socket

__all__ = ["bind_problem", "join_address", "split_address"]


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; an empty host is ``0.0.0.0``."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def join_address(host: str, port: int) -> str:
    """``(host, port)`` -> ``"host:port"``, bracketing an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_problem(address: str, *, reuse_port: bool, first_only: bool = False) -> str | None:
    """Why a listener could not bind ``address`` now, and what to do about it;
    ``None`` when it can (or when ``address`` is not ``HOST:PORT``, which is
    left to the server). The host is resolved as the servers resolve it, and
    each of its addresses is bound (not listened on) with the options the
    server sets (``SO_REUSEADDR``, and ``SO_REUSEPORT`` with ``reuse_port``);
    one that binds is enough, or only the first with ``first_only`` (the
    metrics endpoint binds only that one). Never stricter than the servers:
    a port another process shares with ``SO_REUSEPORT`` passes."""
    try:
        host, port = split_address(address)
    except ValueError:
        return None
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError, ValueError) as exc:  # UnicodeError: IDNA refused the name
        reason = exc.strerror if isinstance(exc, OSError) else None
        reason = reason or "not a valid host name"
        return (
            f"cannot resolve host '{host}' ({reason}); give an IP address of this machine, "
            "0.0.0.0 for all of them, or a host name that resolves to one"
        )
    first: OSError | None = None
    for family, kind, proto, _, sockaddr in found[:1] if first_only else found:
        try:
            _try_bind(family, kind, proto, sockaddr, reuse_port)
        except OSError as exc:
            first = first or exc
            continue
        return None
    return _why(first, host, port) if first else f"host '{host}' resolves to no address"


def _try_bind(
    family: int, kind: int, proto: int, sockaddr: tuple[object, ...], reuse_port: bool
) -> None:
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)


def _why(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"address already in use; stop what holds port {port}, or give another port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"cannot bind: {host} is not an address of this machine; give one of its "
            "addresses, 0.0.0.0 for all of them, or 127.0.0.1"
        )
    if exc.errno == errno.EACCES:
        return f"cannot bind port {port}: permission denied (ports below 1024 need privileges)"
    return f"cannot bind: {exc.strerror or exc}; give another address"
