"""A client stream that ends abnormally must reach the upstream as a reset,
never as the end of the upload (a red-team pass): gRPC hands the relay EOF
for a cancelled call as for a half-close, and the relay passed it on as
END_STREAM, so the upstream took an upload cut short for complete and
committed it (8 of 8 cancels and messages over max_request_mb)."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.attacks import _harness as H
from tests.attacks.h2upstream import PREFIX, H2Upstream


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[H2Upstream, H.Proc]]:
    upstream = H2Upstream()
    with tempfile.TemporaryDirectory(prefix="attack-half-close-") as tmp:
        guard = H.start_guard(Path(tmp), upstream.address, "max_request_mb: 1\nmodels: []\n")
        try:
            yield upstream, guard
        finally:
            guard.stop()
            upstream.close()


def _upload(address: str, path: str, how: str) -> str:
    """Three messages, then: ``done`` (half-close), ``cancel``, or ``big``
    (a message over max_request_mb); the code the client saw."""
    stop = threading.Event()

    def messages() -> Iterator[bytes]:
        for i in range(3):
            yield b"part %d" % i
            time.sleep(0.05)
        if how == "big":
            yield b"B" * (2 << 20)
        if how != "done":
            stop.wait(5)

    with H.channel(address) as channel:
        future = channel.stream_unary(path).future(messages(), timeout=5)
        if how == "cancel":
            time.sleep(0.5)
            future.cancel()
        try:
            assert future.result() == b"committed"
            code = "OK"
        except grpc.FutureCancelledError:
            code = "CANCELLED"
        except grpc.RpcError as exc:
            code = exc.code().name
        stop.set()
    return code


@pytest.mark.parametrize(
    ("how", "client_code", "upstream_end"),
    [("done", "OK", "end_stream"), ("cancel", "CANCELLED", "rst_stream"),
     ("big", "RESOURCE_EXHAUSTED", "rst_stream")],
)  # fmt: skip
def test_an_upload_cut_short_reaches_the_upstream_as_a_reset(
    stack: tuple[H2Upstream, H.Proc], how: str, client_code: str, upstream_end: str
) -> None:
    upstream, guard = stack
    for attempt in range(2):  # before the fix, every attempt ended with END_STREAM
        path = f"{PREFIX}{how}-{attempt}"
        assert _upload(guard.address, path, how) == client_code
        deadline = time.monotonic() + 5
        while path not in upstream.ends and time.monotonic() < deadline:
            time.sleep(0.01)
        assert upstream.ends.get(path) == upstream_end, (attempt, upstream.ends)
