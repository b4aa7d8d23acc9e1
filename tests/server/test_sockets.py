"""guard.server.sockets: shutting down client connections of this process,
all of a port's or one peer's, on real sockets (IPv4, IPv6, dual-stack)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from guard.server.sockets import parse_peer, shut_client_sockets


def _pair(listener: socket.socket, host: str | None = None) -> tuple[socket.socket, socket.socket]:
    port = listener.getsockname()[1]
    client = socket.create_connection((host or listener.getsockname()[0], port))
    accepted, _ = listener.accept()
    client.settimeout(5)
    return client, accepted


def _works(client: socket.socket, accepted: socket.socket) -> bool:
    accepted.sendall(b"x")
    return client.recv(1) == b"x"


def _ended(client: socket.socket) -> bool:
    return client.recv(1) == b""


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
            assert _ended(client)  # the peer sees the connection end
            assert _works(other_client, other_accepted)  # another port's: untouched
            again, again_accepted = _pair(listener)  # the listener still takes new ones
            assert _works(again, again_accepted)
            again.close()
            again_accepted.close()
        finally:
            for s in (client, accepted, other_client, other_accepted):
                s.close()


@pytest.mark.parametrize(
    ("family", "bind", "connect"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1"),
        (socket.AF_INET6, "::", "127.0.0.1"),  # dual-stack: an IPv4 client, mapped
    ],
)
def test_only_the_connection_of_one_peer_is_shut(family: int, bind: str, connect: str) -> None:
    with socket.create_server((bind, 0), family=family, dualstack_ipv6=bind == "::") as listener:
        port = listener.getsockname()[1]
        first, first_accepted = _pair(listener, connect)
        second, second_accepted = _pair(listener, connect)
        try:
            host, client_port = first.getsockname()[:2]
            kind = "ipv6" if ":" in host else "ipv4"
            peer = (
                f"{kind}:%5B{host}%5D:{client_port}"
                if kind == "ipv6"
                else f"ipv4:{host}:{client_port}"
            )
            assert shut_client_sockets(port, parse_peer(peer)) == 1
            assert _ended(first)
            assert _works(second, second_accepted)
        finally:
            for s in (first, first_accepted, second, second_accepted):
                s.close()


def test_a_peer_that_is_not_connected_shuts_nothing() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client, accepted = _pair(listener)
        try:
            stranger = (ipaddress.ip_address("127.0.0.1"), 1)
            assert shut_client_sockets(listener.getsockname()[1], stranger) == 0
            assert _works(client, accepted)
        finally:
            client.close()
            accepted.close()


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:127.0.0.1:40616", ("127.0.0.1", 40616)),
        ("ipv6:%5B::1%5D:34232", ("::1", 34232)),
        ("ipv6:[::1]:34232", ("::1", 34232)),
        ("ipv6:%5B::ffff:10.1.2.3%5D:5", ("10.1.2.3", 5)),
        ("unix:/tmp/guard.sock", None),
        ("ipv4:not-an-address:1", None),
        ("ipv4:127.0.0.1:port", None),
        ("", None),
    ],
)
def test_peer_names_are_read_as_grpc_writes_them(
    peer: str, expected: tuple[str, int] | None
) -> None:
    got = parse_peer(peer)
    assert got == (None if expected is None else (ipaddress.ip_address(expected[0]), expected[1]))
