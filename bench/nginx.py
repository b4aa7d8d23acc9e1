"""nginx ``grpc_pass`` (gRPC) or ``proxy_pass`` with upstream keepalive (REST) in front of
the upstream: the anchor a plain proxy sets.

One process (``master_process off``), so /proc/<pid> of the process we start is
the whole proxy, like the single-process Python paths. Every path nginx writes
(pid, temp dirs, logs) lives under a private directory, so it runs as non-root.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")

# A very high request cap per connection: nginx closes HTTP/2 connections after
# keepalive_requests (1000 by default), which shows up as errors and reconnects
# under h2load, and its upstream keepalive pool would churn the same way.
KEEPALIVE_REQUESTS = 10_000_000


def find_nginx() -> str:
    """Path of the nginx binary, or raise with a hint how to install it."""
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise FileNotFoundError("nginx not found; install it (Debian: apt-get install nginx)")


def _locations(protocol: str) -> str:
    if protocol == "grpc":
        return """\
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://tf_serving;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
            grpc_buffer_size 1m;
        }}"""
    # HTTP/1.1 with an empty Connection header: the upstream keepalive pool is used.
    return """\
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://tf_serving;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Request bodies in memory: past the 16k default nginx spools them to a
            # file and sends them on from there, and each call then waits out
            # delayed ACKs (~40 ms for a 40 KB predict body).
            client_body_buffer_size 64m;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            proxy_buffer_size 64k;
            proxy_buffers 64 64k;
            proxy_busy_buffers_size 128k;
        }}"""


def render_config(workdir: Path, upstream: str, listen_port: int, protocol: str = "grpc") -> str:
    """The nginx.conf text for a hop from ``listen_port`` to ``upstream``.

    ``protocol``: ``grpc`` (``grpc_pass``) or ``http`` (``proxy_pass`` over HTTP/1.1
    with upstream keepalive, the usual way to front TF Serving's REST API).
    """
    w = workdir
    server = _locations(protocol).format(port=listen_port)
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {w}/client_body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;

    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 600s;
    client_max_body_size 0;
    http2_max_concurrent_streams 1024;

    upstream tf_serving {{
        server {upstream};
        keepalive 64;
        keepalive_requests {KEEPALIVE_REQUESTS};
        keepalive_timeout 600s;
    }}

    server {{
{server}
    }}
}}
"""


def write_config(workdir: Path, upstream: str, listen_port: int, protocol: str = "grpc") -> Path:
    """Write nginx.conf (and its temp dirs) under ``workdir``; return its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(render_config(workdir.resolve(), upstream, listen_port, protocol))
    return conf


def command(conf: Path) -> list[str]:
    """The command line that runs nginx in the foreground with ``conf``."""
    return [
        find_nginx(),
        "-c",
        str(conf.resolve()),
        "-p",
        str(conf.parent.resolve()),
        "-e",
        str((conf.parent / "error.log").resolve()),
    ]


def check_config(conf: Path) -> None:
    """Run ``nginx -t`` on ``conf``; raise with nginx's message if it is invalid."""
    proc = subprocess.run([*command(conf), "-t", "-q"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nginx rejected {conf}: {proc.stderr.strip()}")
