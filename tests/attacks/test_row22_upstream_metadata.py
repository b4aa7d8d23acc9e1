"""Row 22: what a hostile upstream puts around its answer. Metadata gRPC
cannot send on (a value that is not UTF-8 or holds control characters, an
upper-case key) is dropped and the answer delivered; an OK with no message is
INTERNAL naming the cause; the upstream's ``x-guard-*`` entries never reach
the client beside the guard's own; a call past its client's deadline is
counted DEADLINE_EXCEEDED. Each counted with the code its client saw, with no
traceback in the guard's log.

The upstream is a raw HTTP/2 server (h2 with its header checks off), in this
process, so it can send what a gRPC server library would refuse. Its
behaviour is picked by the Predict request's model name, or by the method
name for other methods (which the guard relays as streams)."""

from __future__ import annotations

import asyncio
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from tests.attacks import _harness as H
from tests.attacks import h2raw, protos

RULES = "models:\n  - name: '*'\n    outputs: [{name: p, argmax: true, labels: [a, b]}]\n"
RELAY = "/row22.Relay/"
SLOW_S = 3.0
Headers = list[tuple[bytes, bytes]]
HEAD: Headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
OK: Headers = [(b"grpc-status", b"0")]
UNSENDABLE_TRAILERS: Headers = [
    (b"x-bad", b"\xff\xfe\x80"),  # not UTF-8
    (b"x-ctl", b"a\r\nb\x00c"),  # control characters
    (b"x-keep", b"kept"),
]
# (initial metadata after HEAD, trailers, or None for a trailers-only answer)
MODES: dict[str, tuple[Headers, Headers | None]] = {
    "badtrail": ([], OK + UNSENDABLE_TRAILERS),
    "badinit": ([(b"x-bad", b"\xff\xfe\x80"), (b"x-keep-init", b"yes")], OK),
    "upperinit": ([(b"X-Upper", b"v"), (b"x sp", b"v")], OK),
    "xguard": (
        [(b"x-guard-action", b"rejected"), (b"x-up-init", b"1")],
        OK + [(b"x-guard-action", b"rejected"), (b"x-guard-violations", b"7")],
    ),
    "empty": ([], None),
}


def _message(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


def _answer(name: str) -> bytes:
    tensor = protos.float_tensor([1, 2], [0.1, 0.9])
    return protos.predict_response({"p": tensor}, protos.model_spec(name, version=1))


class _Conn(asyncio.Protocol):
    """One HTTP/2 connection of the hostile upstream."""

    open: set[_Conn] = set()
    """Every connection not yet lost, and each one's calls being answered:
    closed at the end."""
    seen: dict[str, Headers] = {}
    """The request headers of the last call of each mode."""

    def __init__(self) -> None:
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self.requests: dict[int, Headers] = {}
        self.bodies: dict[int, bytes] = {}
        self.transport: Any = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _Conn.open.add(self)
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        _Conn.open.discard(self)
        for task in self.tasks:
            task.cancel()

    def flush(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.requests[event.stream_id] = list(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                sid = event.stream_id
                self.bodies[sid] = self.bodies.get(sid, b"") + event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.StreamEnded):
                task = asyncio.ensure_future(self.answer(event.stream_id))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        self.flush()

    async def answer(self, sid: int) -> None:
        headers = self.requests.pop(sid, [])
        path = dict(headers).get(b":path", b"").decode()
        body = self.bodies.pop(sid, b"")
        if path == H.PREDICT:
            spec = protos.first(body[5:], 1) or b""
            mode = (protos.first(spec, 1) or b"").decode()
            payload = _answer(mode)
        else:  # the guard's health probe, or a relayed method
            mode = path.removeprefix(RELAY) if path.startswith(RELAY) else ""
            payload = b"relayed"
        _Conn.seen[mode] = headers
        if mode == "slow":
            await asyncio.sleep(SLOW_S)
        initial, trailers = MODES.get(mode, ([], OK))
        try:
            if trailers is None:
                self.h2.send_headers(sid, HEAD + initial + OK, end_stream=True)
            else:
                self.h2.send_headers(sid, HEAD + initial)
                self.h2.send_data(sid, _message(payload))
                self.h2.send_headers(sid, trailers, end_stream=True)
        except h2.exceptions.H2Error:
            return  # the guard cancelled the call, or closed the connection
        self.flush()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_Conn, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def close() -> None:
        server.close()
        for conn in list(_Conn.open):
            conn.transport.close()
        await asyncio.sleep(0.1)  # connection_lost, then the cancelled answers end
        loop.stop()

    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(close(), loop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def guard(upstream: str) -> Iterator[H.Proc]:
    with tempfile.TemporaryDirectory(prefix="row22-") as tmp:
        proc = H.start_guard(Path(tmp), upstream, RULES)
        try:
            yield proc
        finally:
            proc.stop()


def _codes(guard: H.Proc, method: str) -> dict[str, float]:
    counted = {}
    for key, value in guard.metrics().items():
        if key.startswith("guard_requests_total{") and f'method="{method}"' in key:
            counted[key.split('code="')[1].split('"')[0]] = value
    return counted


def _counted_as(
    guard: H.Proc, method: str, call: Callable[[], Any], calls: int = 1
) -> tuple[Any, dict[str, float]]:
    """``call()``'s result, and what the guard counted meanwhile, waiting up
    to 5 s for ``calls`` counts: a client's own deadline or cancellation is
    counted once the guard hears of it."""
    before = _codes(guard, method)
    result = call()
    deadline = time.monotonic() + 5
    while True:
        after = _codes(guard, method)
        new = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        if sum(new.values()) >= calls or time.monotonic() > deadline:
            return result, new
        time.sleep(0.05)


def _predict(ch: grpc.Channel, mode: str, timeout: float = 5.0) -> Any:
    try:
        response, call = ch.unary_unary(H.PREDICT).with_call(
            protos.predict_request(mode), timeout=timeout
        )
        return "OK", response, dict(call.initial_metadata()), list(call.trailing_metadata())
    except grpc.RpcError as exc:
        return exc.code().name, exc.details(), dict(exc.initial_metadata() or ()), []


def _no_traceback(guard: H.Proc) -> None:
    log = guard.log()
    # The guard's filter words gRPC's ExecuteBatchError as this line.
    refused = ("Traceback", "ExecuteBatchError", "could not send the answer")
    assert not [word for word in refused if word in log], log[-3000:]


def test_unsendable_trailers_are_dropped_and_the_answer_delivered(guard: H.Proc) -> None:
    with H.channel(guard.address) as ch:
        (code, body, _, trailers), counted = _counted_as(
            guard, "Predict", lambda: _predict(ch, "badtrail")
        )
    assert code == "OK", (code, body)
    assert "p_class" in protos.output_names(body), "the answer was not guarded"
    keys = [k for k, _ in trailers]
    assert "x-bad" not in keys and "x-ctl" not in keys and ("x-keep", "kept") in trailers
    assert counted == {"OK": 1}, counted
    assert "gRPC cannot send on (keys 'x-bad', 'x-ctl')" in guard.log()
    _no_traceback(guard)


def test_unsendable_initial_metadata_is_dropped(guard: H.Proc) -> None:
    with H.channel(guard.address) as ch:
        (code, body, initial, _), counted = _counted_as(
            guard, "Predict", lambda: _predict(ch, "badinit")
        )
    assert code == "OK", (code, body)
    assert initial.get("x-keep-init") == "yes" and "x-bad" not in initial, initial
    assert counted == {"OK": 1}, counted
    _no_traceback(guard)


def test_an_upper_case_key_fails_as_it_would_direct(guard: H.Proc, upstream: str) -> None:
    """gRPC's client refuses the upstream's answer: the guard ends the call as
    a direct client's ends, counted with that code."""
    with H.channel(upstream) as ch:
        direct = _predict(ch, "upperinit")
    with H.channel(guard.address) as ch:
        (code, details, initial, _), counted = _counted_as(
            guard, "Predict", lambda: _predict(ch, "upperinit")
        )
    assert (code, details) == direct[:2] == ("INTERNAL", direct[1]), (code, details, direct)
    assert "X-Upper" in details and "X-Upper" not in initial and "x sp" not in initial
    assert counted == {"INTERNAL": 1}, counted
    _no_traceback(guard)


def test_ok_without_a_message_is_internal(guard: H.Proc) -> None:
    with H.channel(guard.address) as ch:
        (code, details, _, _), counted = _counted_as(
            guard, "Predict", lambda: _predict(ch, "empty")
        )
    assert code == "INTERNAL", (code, details)
    assert details.startswith("guard: the upstream answered OK without a response message")
    assert "TypeError" not in details
    assert counted == {"INTERNAL": 1}, counted
    _no_traceback(guard)


def test_only_the_guards_own_x_guard_entries_reach_the_client(guard: H.Proc) -> None:
    with H.channel(guard.address) as ch:
        (code, body, initial, trailers), counted = _counted_as(
            guard, "Predict", lambda: _predict(ch, "xguard")
        )
    assert code == "OK", (code, body)
    assert "x-guard-action" not in initial and initial.get("x-up-init") == "1", initial
    ours = [(k, v) for k, v in trailers if k.startswith("x-guard-")]
    assert sorted(ours) == [("x-guard-action", "clean"), ("x-guard-violations", "0")], trailers
    assert counted == {"OK": 1}, counted


def _relayed(ch: grpc.Channel, mode: str, timeout: float = 5.0) -> Any:
    try:
        response, call = ch.unary_unary(RELAY + mode).with_call(b"x", timeout=timeout)
        return "OK", response, dict(call.initial_metadata()), list(call.trailing_metadata())
    except grpc.RpcError as exc:
        return exc.code().name, exc.details(), {}, []


def test_the_relay_drops_unsendable_metadata_too(guard: H.Proc) -> None:
    with H.channel(guard.address) as ch:
        (code, body, _, trailers), counted = _counted_as(
            guard, "__other__", lambda: _relayed(ch, "badtrail")
        )
        (init_code, _, initial, _) = _relayed(ch, "badinit")
    assert (code, body) == ("OK", b"relayed"), (code, body)
    assert [k for k, _ in trailers if k.startswith("x-")] == ["x-keep"], trailers
    assert init_code == "OK" and initial.get("x-keep-init") == "yes" and "x-bad" not in initial
    assert counted == {"OK": 1}, counted
    _no_traceback(guard)


@pytest.mark.parametrize("method", ["Predict", "__other__"])
def test_calls_past_their_deadline_are_counted_deadline_exceeded(
    guard: H.Proc, method: str
) -> None:
    """Clients cancel at their deadline with a few ms still left by the
    guard's clock (it starts when the headers arrive): counted as what the
    clients saw, not CANCELLED."""
    deadlines = [1.0, 1.0, 1.2345, 1.2345, 2.0, 2.0]
    call = _predict if method == "Predict" else _relayed

    def all_at_once() -> list[str]:
        with H.channel(guard.address) as ch, ThreadPoolExecutor(len(deadlines)) as pool:
            return [r[0] for r in pool.map(lambda d: call(ch, "slow", d), deadlines)]

    seen, counted = _counted_as(guard, method, all_at_once, len(deadlines))
    assert seen == ["DEADLINE_EXCEEDED"] * len(deadlines), seen
    assert counted == {"DEADLINE_EXCEEDED": len(deadlines)}, counted


def test_a_cancelled_call_is_still_counted_cancelled(guard: H.Proc) -> None:
    def cancel_early() -> str:
        with H.channel(guard.address) as ch:
            future = ch.unary_unary(H.PREDICT).future(protos.predict_request("slow"), timeout=10)
            time.sleep(0.5)
            future.cancel()
            return "CANCELLED" if future.cancelled() else "not cancelled"

    seen, counted = _counted_as(guard, "Predict", cancel_early)
    assert seen == "CANCELLED"
    assert counted == {"CANCELLED": 1}, counted


def test_client_metadata_grpc_cannot_send_on_is_dropped(guard: H.Proc) -> None:
    """gRPC takes such a value from a client, but would not send it upstream."""
    extra = [(b"x-bad", b"\xff\xfe\x80"), (b"x-ctl", b"a\x01b"), (b"x-keep", b"kept")]
    with h2raw.H2Client("127.0.0.1", guard.port) as client:
        state, counted = _counted_as(
            guard,
            "Predict",
            lambda: client.unary(H.PREDICT, protos.predict_request("clientmeta"), extra=extra),
        )
    assert state.grpc_status == 0, (state.grpc_status, state.grpc_message)
    assert "p_class" in protos.output_names(state.messages()[0])
    forwarded = dict(_Conn.seen["clientmeta"])
    assert forwarded.get(b"x-keep") == b"kept" and b"x-bad" not in forwarded
    assert b"x-ctl" not in forwarded, forwarded
    assert counted == {"OK": 1}, counted
    _no_traceback(guard)


def test_a_deadline_centuries_away_is_no_deadline(tmp_path: Path) -> None:
    """Found: a grpc-timeout of 2562047H (Go's largest Duration) was passed on
    as it came, overflowed gRPC's int64 nanoseconds, and the call ended
    DEADLINE_EXCEEDED at once, never forwarded; the upstream answers it OK."""
    with H.guarded(tmp_path) as (_up, guard):
        codes = []
        for timeout in (b"2562047H", b"5000000H", b"99999999H"):
            with h2raw.H2Client("127.0.0.1", guard.port, timeout=5) as client:
                sid = client.new_stream_id()
                client.send_headers(sid, h2raw.grpc_request_headers(H.PREDICT, timeout=timeout))
                client.send_data(sid, h2raw.grpc_message(H.LEGIT_REQUEST), end_stream=True)
                codes.append(client.wait_stream(sid, 4).grpc_status)
    assert codes == [0, 0, 0], codes
