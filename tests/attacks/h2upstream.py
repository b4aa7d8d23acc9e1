"""A raw HTTP/2 gRPC upstream (``h2``) that records how each stream of
``/raw.Upload/...`` ended on the wire: a client's half-close (END_STREAM) or a
reset (RST_STREAM). A grpc.aio upstream cannot tell them apart: its reader
ends cleanly either way. After a half-close it takes the upload for whole and
answers OK with one message, ``committed``; other paths are answered
UNIMPLEMENTED. One thread per connection; stopped with the process."""

from __future__ import annotations

import socket
import struct
import threading

import h2.config
import h2.connection
import h2.events

PREFIX = "/raw.Upload/"


class H2Upstream:
    """Listens on 127.0.0.1:0; :attr:`ends` maps each upload's path to how it
    ended: ``"end_stream"`` or ``"rst_stream"``."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.ends: dict[str, str] = {}
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        paths: dict[int, str] = {}
        with sock:
            try:
                sock.sendall(conn.data_to_send())
                while data := sock.recv(65536):
                    for event in conn.receive_data(data):
                        self._on(conn, event, paths)
                    sock.sendall(conn.data_to_send())
            except OSError:
                return

    def _on(self, conn: h2.connection.H2Connection, event: object, paths: dict[int, str]) -> None:
        if isinstance(event, h2.events.RequestReceived):
            paths[event.stream_id] = dict(event.headers)[b":path"].decode()
        elif isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self._record(paths.pop(event.stream_id, ""), "rst_stream")
        elif isinstance(event, h2.events.StreamEnded):
            path = paths.pop(event.stream_id, "")
            self._record(path, "end_stream")
            self._answer(conn, event.stream_id, path.startswith(PREFIX))

    def _record(self, path: str, end: str) -> None:
        if path.startswith(PREFIX):
            self.ends[path] = end

    @staticmethod
    def _answer(conn: h2.connection.H2Connection, stream_id: int, upload: bool) -> None:
        head = [(":status", "200"), ("content-type", "application/grpc")]
        if not upload:
            conn.send_headers(stream_id, [*head, ("grpc-status", "12")], end_stream=True)
            return
        conn.send_headers(stream_id, head)
        conn.send_data(stream_id, b"\x00" + struct.pack(">I", 9) + b"committed")
        conn.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
