"""The ``/metrics`` endpoint: prometheus_client's WSGI app on a bounded server.

prometheus_client's own ``start_http_server`` gives every connection a thread
and never times one out: a client that opens connections and sends nothing
kept one thread each, for good (50 such connections, 50 more threads). Here
at most ``MAX_CONNECTIONS`` are served at once (a new one ends the one open
longest) and each gets ``CONNECTION_TIMEOUT_S`` from its accept to its last byte, a
scrape's request and answer together; one reaper thread enforces it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["CONNECTION_TIMEOUT_S", "MAX_CONNECTIONS", "MetricsServer", "start_metrics_server"]

logger = logging.getLogger("guard.metrics")

# Prometheus scrapes with one connection per target; a handful of people with
# curl, a second Prometheus and the workers' supervisor fit easily.
MAX_CONNECTIONS = 32
# Prometheus's own scrape timeout defaults to 10 s.
CONNECTION_TIMEOUT_S = 15.0
_REAP_EVERY_S = 1.0


class _Handler(WSGIRequestHandler):
    # A socket timeout as well: a read that waits this long ends the
    # connection without the reaper.
    timeout = CONNECTION_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Scrapes are not logged."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, a bounded number of them, each for a bounded time."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    connection_timeout_s = CONNECTION_TIMEOUT_S
    open: dict[socket.socket, float]

    def server_activate(self) -> None:
        self.open, self._lock = {}, threading.Lock()
        super().server_activate()
        reaper = threading.Thread(target=self._reap, name="guard-metrics-reaper", daemon=True)
        reaper.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            oldest = min(self.open, key=self.open.__getitem__) if self.open else None
            if oldest is not None and len(self.open) >= MAX_CONNECTIONS:
                del self.open[oldest]
            else:
                oldest = None
            self.open[request] = time.monotonic() + self.connection_timeout_s
        if oldest is not None:
            # A scrape takes milliseconds: the connection open longest is the
            # likeliest to be one that sends nothing, and a new scrape gets in.
            logger.debug(
                "metrics endpoint: %d connections open, closing the oldest", len(self.open)
            )
            _cut(oldest)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self.open.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away, or was cut: not worth a traceback."""
        logger.debug("metrics endpoint: a connection from %s failed", client_address[0])

    def _reap(self) -> None:
        while True:
            time.sleep(_REAP_EVERY_S)
            now = time.monotonic()
            with self._lock:
                late = [s for s, deadline in self.open.items() if deadline < now]
            for sock in late:
                _cut(sock)


def _cut(sock: socket.socket) -> None:
    """End a connection; its thread sees the end and closes the socket."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _at_metrics_only(app: Any) -> Any:
    """``app`` at ``/metrics``, and 404 elsewhere: prometheus_client's app
    answers every path with the whole exposition, so a probe or a typo of
    any path read as a scrape."""

    def serve(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"guard: the metrics are at /metrics\n"]

    return serve


def start_metrics_server(
    host: str,
    port: int,
    registry: CollectorRegistry,
    connection_timeout_s: float = CONNECTION_TIMEOUT_S,
) -> tuple[MetricsServer, threading.Thread]:
    """Serve ``registry`` on ``host:port`` from a daemon thread; no
    connection lives past ``connection_timeout_s``."""
    family, *_, sockaddr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
    server_class = type(
        "MetricsServer",
        (MetricsServer,),
        {"address_family": family, "connection_timeout_s": connection_timeout_s},
    )
    handler_class = type("Handler", (_Handler,), {"timeout": connection_timeout_s})
    app = _at_metrics_only(make_wsgi_app(registry))
    httpd: MetricsServer = make_server(
        str(sockaddr[0]), port, app, server_class, handler_class=handler_class
    )
    thread = threading.Thread(target=httpd.serve_forever, name="guard-metrics", daemon=True)
    thread.start()
    return httpd, thread
