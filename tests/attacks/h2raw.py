"""A small raw HTTP/2 client for attack tests, built on the h2 project's framing
(``hyperframe``) and HPACK (``hpack``) layers.

h2's connection state machine is deliberately not used for sending: it refuses
exactly what the attacks need (header bytes that are not UTF-8, HEADERS that
are reset at once by the thousand, headers past the peer's advertised limit).
Frames are written as raw bytes; frames read back are parsed by hyperframe and
header blocks decoded by hpack, so whatever the server does (GOAWAY,
RST_STREAM, trailers-only answers, trailers) is reported faithfully.

Only loopback is expected. Every wait is bounded by a timeout.
"""

from __future__ import annotations

import gzip
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

__all__ = [
    "CANCEL",
    "GoAway",
    "H2Client",
    "Header",
    "StreamState",
    "grpc_message",
    "grpc_messages",
    "grpc_request_headers",
    "gzip_message",
    "literal_header_block",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types and flags (RFC 9113).
T_DATA, T_HEADERS, T_RST, T_SETTINGS, T_PING, T_GOAWAY, T_WINDOW, T_CONT = 0, 1, 3, 4, 6, 7, 8, 9
F_END_STREAM, F_ACK, F_END_HEADERS = 0x1, 0x1, 0x4
# Error codes.
NO_ERROR, PROTOCOL_ERROR, CANCEL, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0, 1, 8, 7, 11
# Settings identifiers.
S_HEADER_TABLE_SIZE, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE = 1, 3, 4
S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE, S_ENABLE_PUSH = 5, 6, 2

Header = tuple[bytes, bytes]
_HDR = struct.Struct(">I")
_BIG_WINDOW = 2**31 - 1


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One raw frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return _HDR.pack(len(payload))[1:] + bytes((ftype, flags)) + _HDR.pack(stream_id) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal_header_block(headers: Iterable[Header]) -> bytes:
    """An HPACK block of "literal header field without indexing, new name"
    entries, no Huffman: stateless, so any bytes go on the wire as given and
    the block can be reused on any stream and connection."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value
    return bytes(out)


def grpc_request_headers(
    path: bytes | str,
    *,
    authority: bytes = b"127.0.0.1",
    timeout: bytes | None = None,
    encoding: bytes | None = None,
    extra: Sequence[Header] = (),
) -> list[Header]:
    """The headers of a gRPC request, in the order gRPC clients send them."""
    if isinstance(path, str):
        path = path.encode()
    headers: list[Header] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", authority),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    if timeout is not None:
        headers.append((b"grpc-timeout", timeout))
    if encoding is not None:
        headers.append((b"grpc-encoding", encoding))
        headers.append((b"grpc-accept-encoding", b"identity,gzip"))
    headers.extend(extra)
    return headers


def grpc_message(payload: bytes, *, compressed: bool = False, declared: int | None = None) -> bytes:
    """A gRPC length-prefixed message. ``declared`` overrides the length field
    (a prefix longer than what follows)."""
    length = len(payload) if declared is None else declared
    return bytes((1 if compressed else 0,)) + _HDR.pack(length) + payload


def gzip_message(payload: bytes) -> bytes:
    """A gRPC message whose payload is gzip-compressed (flag 1)."""
    return grpc_message(gzip.compress(payload, compresslevel=9), compressed=True)


def grpc_messages(data: bytes) -> list[bytes]:
    """Split a stream's DATA into gRPC message payloads (uncompressed only)."""
    out = []
    pos = 0
    while pos + 5 <= len(data):
        (length,) = _HDR.unpack_from(data, pos + 1)
        out.append(data[pos + 5 : pos + 5 + length])
        pos += 5 + length
    return out


@dataclass
class StreamState:
    """What came back on one stream."""

    headers: list[tuple[str, str]] | None = None
    trailers: list[tuple[str, str]] | None = None
    data: bytearray = field(default_factory=bytearray)
    reset: int | None = None  # RST_STREAM error code
    remote_closed: bool = False

    @property
    def done(self) -> bool:
        return self.remote_closed or self.reset is not None

    def _status_source(self) -> list[tuple[str, str]]:
        if self.trailers is not None:
            return self.trailers
        return self.headers or []  # a trailers-only answer

    @property
    def grpc_status(self) -> int | None:
        for name, value in self._status_source():
            if name == "grpc-status":
                return int(value)
        return None

    @property
    def grpc_message(self) -> str | None:
        for name, value in self._status_source():
            if name == "grpc-message":
                return value
        return None

    def messages(self) -> list[bytes]:
        return grpc_messages(bytes(self.data))


@dataclass
class GoAway:
    last_stream_id: int
    error_code: int
    debug: bytes


class H2Client:
    """One HTTP/2 connection to a gRPC server, over a plain TCP socket.

    ``settings`` is what this client advertises (defaults: a large window so
    the server never waits on us, no push). ``auto_window`` sends
    WINDOW_UPDATEs for received DATA; ``ack_pings`` answers PINGs.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        settings: dict[int, int] | None = None,
        auto_window: bool = True,
        ack_pings: bool = True,
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.auto_window = auto_window
        self.ack_pings = ack_pings
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 30
        self.decoder.max_allowed_table_size = 1 << 16
        self.streams: dict[int, StreamState] = {}
        self.goaway: GoAway | None = None
        self.closed = False  # the peer closed the TCP connection
        self.peer_settings: dict[int, int] = {}
        self.frames_in: dict[str, int] = {}
        self.conn_send_window = 65535
        self.stream_send_window: dict[int, int] = {}
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self._buf = bytearray()
        self._pending_block: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self._next_id = 1
        mine = {S_ENABLE_PUSH: 0, S_INITIAL_WINDOW_SIZE: _BIG_WINDOW, S_MAX_FRAME_SIZE: 1 << 20}
        mine.update(settings or {})
        payload = b"".join(struct.pack(">HI", k, v) for k, v in mine.items())
        self.send_raw(
            PREFACE
            + frame(T_SETTINGS, 0, 0, payload)
            + frame(T_WINDOW, 0, 0, _HDR.pack(_BIG_WINDOW - 65535))
        )

    # ------------------------------------------------------------- plumbing

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def new_stream_id(self) -> int:
        sid = self._next_id
        self._next_id += 2
        return sid

    def send_raw(self, data: bytes) -> bool:
        """Write bytes; False if the peer has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def send_headers(
        self,
        stream_id: int,
        headers: Iterable[Header],
        *,
        end_stream: bool = False,
        block: bytes | None = None,
    ) -> bool:
        """HEADERS (+ CONTINUATION when the block exceeds the peer's frame size)."""
        if block is None:
            block = literal_header_block(headers)
        self.streams.setdefault(stream_id, StreamState())
        self.stream_send_window.setdefault(stream_id, self.peer_initial_window)
        size = self.peer_max_frame
        chunks = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
        out = bytearray()
        for i, chunk in enumerate(chunks):
            flags = F_END_HEADERS if i == len(chunks) - 1 else 0
            if i == 0:
                end = F_END_STREAM if end_stream else 0
                out += frame(T_HEADERS, flags | end, stream_id, chunk)
            else:
                out += frame(T_CONT, flags, stream_id, chunk)
        return self.send_raw(bytes(out))

    def send_data(
        self, stream_id: int, data: bytes, *, end_stream: bool = False, bound_s: float | None = None
    ) -> bool:
        """DATA within the peer's flow-control windows (reads frames while it
        waits). False if the connection or stream ended first, or ``bound_s``
        passed."""
        deadline = time.monotonic() + (self.timeout if bound_s is None else bound_s)
        view = memoryview(data)
        pos = 0
        while True:
            state = self.streams.setdefault(stream_id, StreamState())
            window = min(
                self.conn_send_window,
                self.stream_send_window.setdefault(stream_id, self.peer_initial_window),
            )
            n = min(window, self.peer_max_frame, len(view) - pos)
            last = pos + n == len(view)
            if n > 0 or (last and pos == len(view)):
                flags = F_END_STREAM if (last and end_stream) else 0
                if not self.send_raw(frame(T_DATA, flags, stream_id, bytes(view[pos : pos + n]))):
                    return False
                pos += n
                self.conn_send_window -= n
                self.stream_send_window[stream_id] -= n
                if last:
                    return True
                continue
            if self.closed or self.goaway is not None or state.done:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(left, 0.05))

    def send_rst(self, stream_id: int, code: int = CANCEL) -> bool:
        return self.send_raw(frame(T_RST, 0, stream_id, _HDR.pack(code)))

    def send_ping(self, opaque: bytes = b"attack!!") -> bool:
        return self.send_raw(frame(T_PING, 0, 0, opaque))

    # -------------------------------------------------------------- reading

    def pump(self, timeout: float) -> int:
        """Read and handle whatever arrives within ``timeout`` s (returns at the
        first read that gives data, or when the time is up). Returns bytes read."""
        if self.closed:
            return 0
        try:
            ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        except (OSError, ValueError):
            self.closed = True
            return 0
        if not ready:
            return 0
        try:
            chunk = self.sock.recv(1 << 20)
        except (BlockingIOError, TimeoutError):
            return 0
        except OSError:
            self.closed = True
            return 0
        if not chunk:
            self.closed = True
            return 0
        self._buf += chunk
        self._parse()
        return len(chunk)

    def drain(self, seconds: float = 0.0) -> None:
        """Handle everything already received, and what arrives within ``seconds``."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if not self.pump(max(left, 0.0)) and left <= 0:
                return
            if self.closed:
                return

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Read until ``predicate()`` holds, the connection ends or ``timeout`` passes."""
        end = time.monotonic() + timeout
        while not predicate():
            left = end - time.monotonic()
            if left <= 0 or self.closed:
                return predicate()
            self.pump(min(left, 0.1))
        return True

    def wait_stream(self, stream_id: int, timeout: float) -> StreamState:
        """Read until ``stream_id`` ends (or the connection does)."""
        state = self.streams.setdefault(stream_id, StreamState())

        def ended() -> bool:
            gone = self.goaway is not None and stream_id > self.goaway.last_stream_id
            return state.done or gone

        self.wait(ended, timeout)
        return state

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 9:
            head, length = Frame.parse_frame_header(memoryview(buf)[pos : pos + 9])
            if len(buf) - pos - 9 < length:
                break
            head.parse_body(memoryview(buf)[pos + 9 : pos + 9 + length])
            pos += 9 + length
            self._handle(head)
        del buf[:pos]

    def _count(self, name: str) -> None:
        self.frames_in[name] = self.frames_in.get(name, 0) + 1

    def _handle(self, f: Frame) -> None:
        self._count(type(f).__name__)
        if isinstance(f, SettingsFrame):
            if "ACK" not in f.flags:
                for k, v in f.settings.items():
                    self.peer_settings[k] = v
                    if k == S_INITIAL_WINDOW_SIZE:
                        delta = v - self.peer_initial_window
                        self.peer_initial_window = v
                        for sid in self.stream_send_window:
                            self.stream_send_window[sid] += delta
                    elif k == S_MAX_FRAME_SIZE:
                        self.peer_max_frame = v
                self.send_raw(frame(T_SETTINGS, F_ACK, 0))
        elif isinstance(f, PingFrame):
            if "ACK" not in f.flags and self.ack_pings:
                self.send_raw(frame(T_PING, F_ACK, 0, bytes(f.opaque_data)))
        elif isinstance(f, WindowUpdateFrame):
            if f.stream_id == 0:
                self.conn_send_window += f.window_increment
            else:
                self.stream_send_window[f.stream_id] = (
                    self.stream_send_window.get(f.stream_id, self.peer_initial_window)
                    + f.window_increment
                )
        elif isinstance(f, GoAwayFrame):
            self.goaway = GoAway(f.last_stream_id, f.error_code, bytes(f.additional_data))
        elif isinstance(f, RstStreamFrame):
            self.streams.setdefault(f.stream_id, StreamState()).reset = f.error_code
        elif isinstance(f, DataFrame):
            state = self.streams.setdefault(f.stream_id, StreamState())
            state.data += f.data
            if "END_STREAM" in f.flags:
                state.remote_closed = True
            n = f.flow_controlled_length
            if self.auto_window and n:
                increment = _HDR.pack(n)
                self.send_raw(
                    frame(T_WINDOW, 0, 0, increment) + frame(T_WINDOW, 0, f.stream_id, increment)
                )
        elif isinstance(f, HeadersFrame):
            flags = (F_END_STREAM if "END_STREAM" in f.flags else 0) | (
                F_END_HEADERS if "END_HEADERS" in f.flags else 0
            )
            self._pending_block = (f.stream_id, flags, bytearray(f.data))
            if flags & F_END_HEADERS:
                self._finish_block()
        elif isinstance(f, ContinuationFrame):
            if self._pending_block is not None:
                self._pending_block[2].extend(f.data)
                if "END_HEADERS" in f.flags:
                    self._finish_block()

    def _finish_block(self) -> None:
        assert self._pending_block is not None
        sid, flags, block = self._pending_block
        self._pending_block = None
        decoded = self.decoder.decode(bytes(block), raw=True)
        headers = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in decoded]
        state = self.streams.setdefault(sid, StreamState())
        if state.headers is None:
            state.headers = headers
        else:
            state.trailers = headers
        if flags & F_END_STREAM:
            state.remote_closed = True

    # ---------------------------------------------------------- conveniences

    def unary(
        self,
        path: bytes | str,
        payload: bytes,
        *,
        extra: Sequence[Header] = (),
        encoding: bytes | None = None,
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> StreamState:
        """One complete gRPC call: HEADERS, one DATA (``body`` overrides the
        framed ``payload``) with END_STREAM, then wait for the answer."""
        sid = self.new_stream_id()
        headers = grpc_request_headers(path, encoding=encoding, extra=extra)
        self.send_headers(sid, headers)
        self.send_data(sid, grpc_message(payload) if body is None else body, end_stream=True)
        return self.wait_stream(sid, self.timeout if timeout is None else timeout)
