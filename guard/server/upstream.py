"""The upstream: one channel to TF Serving, rebuilt when its TLS files
change, and a probe that follows whether it answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from guard.control.config import Config
from guard.control.files import FileWatcher
from guard.dataplane.cache import BoundedCache
from guard.server import tls

__all__ = ["Upstream", "channel_options", "upstream_channel_args", "window_options"]

logger = logging.getLogger("guard.upstream")

_PROBE = "/tensorflow.serving.ModelService/GetModelStatus"
_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Clients choose method names: the per-method callables are a bounded cache.
_METHODS_MAX = 256
_METHOD_NAME_MAX_BYTES = 1024


def channel_options(config: Config) -> list[tuple[str, Any]]:
    """Options for the channel to the upstream: requests as large as the
    guard takes from clients, responses as large as it returns."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_request_bytes),
        # Reconnect within about a second of the upstream coming back, not
        # after gRPC's default back-off of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 0),
    ]


def window_options(config: Config) -> list[tuple[str, Any]]:
    """gRPC options for a fixed HTTP/2 stream window of ``stream_window_kb``.

    gRPC sizes its windows from its bandwidth estimate, tens of MB per stream
    on a fast path, and takes in what arrives unread: 100 unary calls on one
    connection whose client kept sending after its request took the guard
    4.8 GB in 15 s, and 45 relayed streams whose client took nothing held
    817 MB of the upstream's messages. Fixed, a stream holds at most its
    window; the price is paid by large messages over long paths (16 MB with
    10 ms each way: 98 ms with gRPC's sizing, 265 ms with 1 MiB)."""
    if not config.stream_window_bytes:
        return []
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", config.stream_window_bytes)]


def upstream_channel_args(
    config: Config,
) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """The options and (with ``upstream_tls``) credentials of a channel to the
    upstream; the files are read now (raises OSError while one is missing,
    ValueError while one does not load)."""
    options = channel_options(config)
    upstream_tls = config.upstream_tls
    if upstream_tls is None:
        return options, None
    if upstream_tls.server_name:
        options.append(("grpc.ssl_target_name_override", upstream_tls.server_name))
    return options, tls.channel_credentials(upstream_tls)


class _Channel:
    """The channels (unary calls; relayed streams) and their per-method
    callables. Replaced whole when the TLS files change, so no call mixes
    two generations."""

    def __init__(self, channel: grpc.aio.Channel, relay: grpc.aio.Channel) -> None:
        self.channel = channel
        self.relay = relay
        self._calls: dict[str, BoundedCache[str, Any]] = {
            kind: BoundedCache(_METHODS_MAX, max_key_bytes=_METHOD_NAME_MAX_BYTES, weigh=len)
            for kind in ("unary_unary", "stream_unary", "stream_stream")
        }

    def callable(self, kind: str, method: str) -> Any:
        """The raw-bytes ``kind`` callable for ``method`` (no (de)serializers);
        bidirectional ones on the relay channel."""
        channel = self.relay if kind == "stream_stream" else self.channel
        return self._calls[kind].get_or_make(method, getattr(channel, kind), method)

    async def close(self, grace: float | None = None) -> None:
        await asyncio.gather(self.channel.close(grace), self.relay.close(grace))


class Upstream:
    """TF Serving, as the guard reaches it."""

    def __init__(self, config: Config, on_state: Callable[[bool], None]) -> None:
        if config.upstream is None:
            raise ValueError("config.upstream must be set before the server starts")
        self.config = config
        self._on_state = on_state
        self.up: bool | None = None
        self._current = self._new_channels(*upstream_channel_args(config))
        self._tasks: list[asyncio.Task[None]] = []
        self._suspected: asyncio.Task[None] | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel new calls go on."""
        return self._current.channel

    def reachable(self) -> bool:
        """Whether a channel to the upstream is connected now. gRPC's words for
        a channel that cannot connect may also be the upstream's own details
        (a proxy behind it): while a channel is connected, they are."""
        ready = grpc.ChannelConnectivity.READY
        return any(
            channel.get_state() is ready for channel in (self._current.channel, self._current.relay)
        )

    def unary(self, method: str) -> Any:
        """The raw-bytes unary callable for ``method`` on the current channel."""
        return self._current.callable("unary_unary", method)

    def stream_unary(self, method: str) -> Any:
        """The raw-bytes client-streaming callable for ``method``."""
        return self._current.callable("stream_unary", method)

    def stream_stream(self, method: str) -> Any:
        """The raw-bytes bidirectional callable for ``method``."""
        return self._current.callable("stream_stream", method)

    def _new_channels(
        self, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
    ) -> _Channel:
        # Unary answers are read as they come: their channel keeps gRPC's
        # window sizing. A relayed stream's are read as its client takes them.
        relay_options = [*options, *window_options(self.config)]
        return _Channel(self._open(options, credentials), self._open(relay_options, credentials))

    def _open(
        self, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
    ) -> grpc.aio.Channel:
        assert self.config.upstream is not None
        if credentials is None:
            return grpc.aio.insecure_channel(self.config.upstream, options)
        return grpc.aio.secure_channel(self.config.upstream, credentials, options)

    async def start(self) -> None:
        """Probe once, then keep probing (and watching the TLS files)."""
        await self.probe()
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="guard-upstream-probe"))
        upstream_tls = self.config.upstream_tls
        if upstream_tls is not None:
            paths = (upstream_tls.ca_file, upstream_tls.cert_file, upstream_tls.key_file)
            watcher = FileWatcher(paths, self._rotate)
            self._tasks.append(asyncio.create_task(watcher.run(), name="guard-upstream-tls"))

    def stop_watching(self) -> None:
        """Stop the probe and the TLS watcher."""
        for task in (*self._tasks, self._suspected):
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        """Close the channels: calls still on them end."""
        await self._current.close()

    async def _rotate(self) -> bool:
        """Rebuild the channel with the new certificates, read and checked
        on a worker thread: a large CA bundle would hold every call."""
        try:
            args = await asyncio.to_thread(upstream_channel_args, self.config)
        except OSError as exc:  # a file mid-rotation: try again on the next tick
            logger.warning("upstream TLS files changed but cannot be read yet: %s", exc)
            return False
        except ValueError as exc:  # damaged: read and checked again once they change
            logger.error(
                "upstream TLS files changed but do not load, keeping the current channel: %s", exc
            )
            return True
        old, self._current = self._current, self._new_channels(*args)
        logger.info("upstream TLS files changed: reconnecting with the new certificates")
        # Calls already on the old channel finish (their deadline bounds them).
        asyncio.create_task(old.close(grace=self.config.default_timeout_s))
        return True

    # ---------------------------------------------------------------- health

    async def probe(self) -> None:
        """Ask the upstream once whether it answers."""
        timeout = max(self.config.health_check_interval_s, 0.5)
        try:
            await self.unary(_PROBE)(b"", timeout=timeout)
            up = True
        except grpc.aio.AioRpcError as exc:
            # Any answer, even an error about the empty request, means it is up.
            up = exc.code() not in _UNAVAILABLE_CODES
        self._set_up(up)

    def suspect(self) -> None:
        """A call ended ``UNAVAILABLE``: probe now, not at the next interval.
        Only the probe decides: an upstream's own ``UNAVAILABLE`` (a relayed
        stream's, or a model's) marked an upstream that answers down, and
        its pod unready, until the next probe."""
        if self._suspected is None or self._suspected.done():
            self._suspected = asyncio.create_task(self._probe_once(), name="guard-upstream-suspect")

    def _set_up(self, up: bool) -> None:
        """Record the probe's verdict: whether the upstream answers."""
        if up == self.up:
            return
        self.up = up
        self._on_state(up)
        level = logging.INFO if up else logging.WARNING
        logger.log(level, "upstream %s is %s", self.config.upstream, "up" if up else "DOWN")

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval_s)
            await self._probe_once()

    async def _probe_once(self) -> None:
        try:
            await self.probe()
        except Exception:  # never let the probe die silently
            logger.exception("upstream probe failed")
