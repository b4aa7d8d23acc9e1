"""Streaming methods and status relay through the guard: every call shape is
relayed exactly, message for message, with the upstream's metadata.

The upstream is tests/attacks/upstream.py's ``/attack.Interop`` service (raw
bytes both ways); each test first makes the same call directly to the upstream,
then through the guard, and compares."""

from __future__ import annotations

import json
import queue
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.attacks import _harness as H

SVC = H.INTEROP
TIMEOUT = 3.0


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[H.Proc, H.Proc]]:
    with tempfile.TemporaryDirectory(prefix="attack-streaming-") as tmp:
        with H.guarded(Path(tmp)) as pair:
            yield pair


@pytest.fixture(params=["direct", "guard"])
def channel(request: pytest.FixtureRequest, stack: tuple[H.Proc, H.Proc]) -> Iterator[grpc.Channel]:
    upstream, guard = stack
    target = upstream.address if request.param == "direct" else guard.address
    with H.channel(target) as ch:
        yield ch


def test_client_streaming(channel: grpc.Channel) -> None:
    messages = [b"a", b"", b"ccc" * 1000, b"\x00\x01\x02", b"e" * 70_000]
    answer = channel.stream_unary(SVC + "Collect")(iter(messages), timeout=TIMEOUT)
    got = json.loads(answer)
    assert got["n"] == len(messages) and got["sizes"] == [len(m) for m in messages], got


def test_server_streaming(channel: grpc.Channel) -> None:
    request = json.dumps({"n": 5, "size": 10}).encode()
    got = list(channel.unary_stream(SVC + "Fanout")(request, timeout=TIMEOUT))
    assert got == [b"%d:" % i + b"x" * 8 for i in range(5)], got


def test_bidi_ping_pong(channel: grpc.Channel) -> None:
    """Each message is sent only after the echo of the previous one came back:
    a relay that waits for the whole request stream deadlocks here."""
    echoes: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        for i in range(3):
            yield b"m%d" % i
            if echoes.get(timeout=TIMEOUT) is None:
                return

    got = []
    call = channel.stream_stream(SVC + "Echo")(requests(), timeout=TIMEOUT)
    try:
        for message in call:
            got.append(message)
            echoes.put(message)
    finally:
        echoes.put(None)
    assert got == [b"echo:m0", b"echo:m1", b"echo:m2"], got


def test_headers_sent_before_any_message_reach_a_client_waiting_for_them(
    channel: grpc.Channel,
) -> None:
    """Found (red team): the relay held the upstream's headers back until its
    first message when they carried no metadata; a client that waits for
    them before it sends waited until stream_idle_timeout_s."""
    go = threading.Event()

    def requests() -> Iterator[bytes]:
        go.wait(TIMEOUT)
        yield b"hello"

    call = channel.stream_stream(SVC + "Greet")(requests(), timeout=TIMEOUT)
    call.initial_metadata()  # blocks until the headers come (or the deadline passes)
    go.set()
    assert list(call) == [b"echo:hello"]
    assert call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("method,request_body", [
    ("Nothing", b"q"),
    ("Fanout", json.dumps({"n": 0}).encode()),
])  # fmt: skip
def test_zero_messages_stay_zero(channel: grpc.Channel, method: str, request_body: bytes) -> None:
    call = channel.unary_stream(SVC + method)(request_body, timeout=TIMEOUT)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK


def test_error_keeps_upstream_initial_metadata(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(SVC + "Refuse")(b"x", timeout=TIMEOUT)
    err = caught.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "upstream refuses"
    initial = dict(err.initial_metadata())
    trailing = dict(err.trailing_metadata())
    assert initial.get("x-up-initial") == "yes", f"initial metadata {initial}"
    assert trailing.get("x-up-trailer") == "t", f"trailing metadata {trailing}"


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("kind", ["unary_unary", "unary_stream", "stream_stream"])
def test_a_method_the_upstream_does_not_serve_is_unimplemented_every_time(
    channel: grpc.Channel, kind: str
) -> None:
    """Found (red team): where the relay's write of the request failed because
    the upstream had just answered UNIMPLEMENTED, grpc.aio set INTERNAL
    'Internal error from Core' over that status: 15 of 50 such calls through
    the guard got it (grpcurl asking for reflection among them)."""
    method = getattr(channel, kind)(SVC + "NoSuchMethod")
    if kind == "unary_unary":
        codes = [_code(lambda: method(b"q", timeout=TIMEOUT)) for _ in range(60)]
    elif kind == "unary_stream":
        codes = [_code(lambda: list(method(b"q", timeout=TIMEOUT))) for _ in range(60)]
    else:
        codes = [_code(lambda: list(method(iter([b"q"]), timeout=TIMEOUT))) for _ in range(60)]
    assert Counter(codes) == {grpc.StatusCode.UNIMPLEMENTED: 60}


def test_unary_still_relayed(channel: grpc.Channel) -> None:
    assert channel.unary_unary(SVC + "Unary")(b"hi", timeout=TIMEOUT) == b"echo:hi"


def test_a_relayed_message_over_max_message_mb_names_the_setting(tmp_path: Path) -> None:
    """Found (red team): the client got gRPC's own words, 'CLIENT: Received
    message larger than max', where CLIENT is the guard's upstream channel."""
    with H.guarded(tmp_path, "max_message_mb: 1\nmodels: []\n") as (_, guard):
        with H.channel(guard.address) as channel:
            request = json.dumps({"n": 2, "size": 2 << 20}).encode()
            with pytest.raises(grpc.RpcError) as caught:
                list(channel.unary_stream(SVC + "Fanout")(request, timeout=TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = caught.value.details() or ""
    assert "larger than max_message_mb=1" in details and "raise max_message_mb" in details
