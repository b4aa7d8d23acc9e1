"""nginx ``grpc_pass`` in front of the upstream: the anchor a plain proxy sets.

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


def render_config(workdir: Path, upstream: str, listen_port: int) -> str:
    """The nginx.conf text for a grpc_pass hop from ``listen_port`` to ``upstream``."""
    w = workdir
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
        listen 127.0.0.1:{listen_port} http2;
        location / {{
            grpc_pass grpc://tf_serving;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
            grpc_buffer_size 1m;
        }}
    }}
}}
"""


def write_config(workdir: Path, upstream: str, listen_port: int) -> Path:
    """Write nginx.conf (and its temp dirs) under ``workdir``; return its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(render_config(workdir.resolve(), upstream, listen_port))
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
