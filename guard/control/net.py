"""Addresses: ``host:port`` strings, split and joined, and whether one can be bound."""

from __future__ import annotations

import errno
import socket
from functools import partial

__all__ = ["bind_problem", "join_address", "overlap", "share_problem", "split_address"]


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
    family: int,
    kind: int,
    proto: int,
    sockaddr: tuple[object, ...],
    reuse_port: bool,
    dual_stack: bool = False,
) -> None:
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if dual_stack and family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)


_WILDCARDS = frozenset({"0.0.0.0", "::"})


def overlap(a: str, b: str) -> bool:
    """Whether two ``host:port`` listen addresses would take the same port on
    a common address: the same port (not 0) and hosts that share an address,
    or either a wildcard (gRPC binds ``0.0.0.0`` as ``[::]``, both families)."""
    try:
        (host_a, port_a), (host_b, port_b) = split_address(a), split_address(b)
    except ValueError:
        return False
    if port_a != port_b or port_a == 0:
        return False
    found_a, found_b = _addresses(host_a), _addresses(host_b)
    return bool(found_a & found_b) or bool((found_a | found_b) & _WILDCARDS)


def _addresses(host: str) -> set[str]:
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError, ValueError):
        return {host}
    return {str(sockaddr[0]) for *_, sockaddr in found}


def share_problem(address: str) -> str | None:
    """Why a ``SO_REUSEPORT`` listener should not take ``address``: another
    socket listens on its port, on an address that overlaps it. gRPC and
    aiohttp would bind all the same, and the kernel would hand new
    connections to either (a share to each socket, or all to an IPv4-only
    one). ``None`` when no other socket listens there (or ``address`` is
    port 0, unparsable or does not resolve: left to :func:`bind_problem`).
    A wildcard host is also probed as ``[::]``, dual-stack, as gRPC binds
    it; a socket in TIME_WAIT does not count."""
    try:
        host, port = split_address(address)
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError, ValueError):
        return None
    targets = [(family, sockaddr) for family, _, _, _, sockaddr in found if port]
    if port and host in ("0.0.0.0", "::") and socket.has_ipv6:
        targets.append((socket.AF_INET6, ("::", port)))
    if not any(_shared(family, sockaddr) for family, sockaddr in targets):
        return None
    return (
        f"another process already listens on port {port} (with SO_REUSEPORT both would "
        "listen, and new connections would reach either); stop it, or give another port"
    )


def _shared(family: int, sockaddr: tuple[object, ...]) -> bool:
    """A plain bind (with ``SO_REUSEADDR``, as the servers set, which a socket
    in TIME_WAIT does not refuse) fails where one with ``SO_REUSEPORT`` too
    succeeds: another socket listens there, and lets the port be shared."""
    if not hasattr(socket, "SO_REUSEPORT"):
        return False
    probe = partial(_try_bind, family, socket.SOCK_STREAM, 0, sockaddr, dual_stack=True)
    try:
        probe(reuse_port=False)
        return False
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return False
    try:
        probe(reuse_port=True)
    except OSError:
        return False  # not shareable either: bind_problem's to report
    return True


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
