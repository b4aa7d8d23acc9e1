"""The file-descriptor limit: raised at start to what max_connections needs,
and a limit that stays under it named with the setting to lower."""

from __future__ import annotations

import resource
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

from guard.control.config import parse_config
from guard.control.descriptors import descriptors_needed, limit_warning
from guard.control.process import Child, guard_argv, start
from tests.reliability._certs import CA

REST_CONFIG = (
    "upstream: 127.0.0.1:9\nrest_upstream: 127.0.0.1:9\nrest_listen: 127.0.0.1:0\nmodels: []\n"
)


def _limited(soft: int, hard: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _serve(tmp_path: Path, text: str, soft: int, hard: int) -> Child:
    config = tmp_path / "guard.yaml"
    config.write_text(text)
    argv = guard_argv(
        "serve", "--config", str(config), "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0",
    )  # fmt: skip
    return start(argv, log_path=tmp_path / "guard.log", preexec_fn=_limited(soft, hard))


def _open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def test_the_soft_limit_is_raised_and_a_connection_flood_leaves_the_metrics_port_up(
    tmp_path: Path,
) -> None:
    """Found: with a soft limit of 512 (systemd's default is 1,024), 600 idle
    TCP connections to the REST port, well under max_connections, left the
    metrics port without an answer (probes fail) and gRPC unable to open a
    socket to the upstream, a traceback logged for each accept."""
    flood: list[socket.socket] = []
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 20_000)
    assert hard >= 5_000, f"this machine's hard limit ({hard}) leaves nothing to raise to"
    with _serve(tmp_path, REST_CONFIG, 512, hard) as guard:
        try:
            assert _open_files(guard.process.pid) == (hard, hard)
            for _ in range(600):
                flood.append(socket.create_connection(("127.0.0.1", guard.ports["rest"])))
            url = f"http://{guard.endpoint('metrics')}/metrics"
            with urllib.request.urlopen(url, timeout=10) as answer:
                assert answer.status == 200
                assert b"guard_requests_total" in answer.read()
        finally:
            for each in flood:
                each.close()
        log = guard.log_text()
    assert "Too many open files" not in log, log[-2000:]
    assert "file descriptors" not in log


def test_a_hard_limit_under_what_max_connections_needs_is_named_at_start(
    tmp_path: Path,
) -> None:
    with _serve(tmp_path, REST_CONFIG, 1100, 1100) as guard:
        limits = _open_files(guard.process.pid)
        log = guard.log_text()
    assert limits == (1100, 1100)
    warning = next(line for line in log.splitlines() if "file descriptors" in line)
    assert "WARNING" in warning
    assert "may open 4352 file descriptors (2048 connections per listener" in warning
    assert "its limit is 1100" in warning
    assert "lower max_connections to 422" in warning


def test_what_each_listener_needs(tmp_path: Path) -> None:
    base = {"upstream": "127.0.0.1:9", "models": [], "max_connections": 100}
    grpc_only = parse_config(base, "g.yaml", Path.cwd())
    rest = {**base, "rest_upstream": "127.0.0.1:9"}
    cert, key = CA().issue("guard", server=True).write(tmp_path, "server")
    tls = {**rest, "tls": {"cert_file": str(cert), "key_file": str(key)}}
    assert descriptors_needed(grpc_only) == 100 + 256
    assert descriptors_needed(parse_config(rest, "g.yaml", Path.cwd())) == 200 + 256
    assert descriptors_needed(parse_config(tls, "g.yaml", Path.cwd())) == 300 + 256


def test_a_limit_no_max_connections_fits_under_is_named_as_such() -> None:
    """Found (a red-team pass): at a limit of 64 or 256 the warning said to
    lower max_connections to 1, which needs 257 descriptors or more."""
    config = parse_config(
        {"upstream": "127.0.0.1:9", "models": [], "rest_upstream": "127.0.0.1:9"},
        "g.yaml", Path.cwd(),
    )  # fmt: skip
    for limit in (64, 256, 257):
        warning = limit_warning(config, limit)
        assert "lower max_connections" not in warning, warning
        assert f"to at least 4352: no max_connections fits under {limit}" in warning
    assert "or lower max_connections to 1" in limit_warning(config, 258)
    assert "or lower max_connections to 422" in limit_warning(config, 1100)
