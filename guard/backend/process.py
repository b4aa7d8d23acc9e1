"""Start ``python -m guard.backend`` as a child process and wait until it serves.

Used by the tests, the demo and the guard's dev mode. TensorFlow-free: the
TensorFlow import happens in the child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

_POLL_S = 0.05


class BackendStartError(RuntimeError):
    """The backend exited or did not start serving in time."""


class BackendProcess:
    """A running backend child process; stop it with :meth:`stop` or ``with``."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        host: str,
        port: int,
        log_path: Path,
        *,
        rest_host: str | None = None,
        rest_port: int | None = None,
    ) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.log_path = log_path
        """The child's stdout and stderr."""
        self.rest_host = rest_host
        self.rest_port = rest_port
        """The REST API's port; None unless started with ``rest_listen``."""

    @property
    def address(self) -> str:
        """``host:port`` for ``grpc.insecure_channel``."""
        return f"{_connect_host(self.host)}:{self.port}"

    @property
    def rest_address(self) -> str | None:
        """``host:port`` of the REST API, or None when it is not served."""
        if self.rest_port is None:
            return None
        return f"{_connect_host(self.rest_host or '')}:{self.rest_port}"

    @property
    def rest_url(self) -> str | None:
        """``http://host:port`` of the REST API, or None when it is not served."""
        return None if self.rest_address is None else f"http://{self.rest_address}"

    def log_text(self) -> str:
        """Everything the child has logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (graceful stop), then SIGKILL after ``timeout_s``; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _connect_host(host: str) -> str:
    """A host to connect to for a listen host (a wildcard becomes loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return "[::1]" if host == "[::]" else host


def read_port_file(text: str) -> tuple[int, int | None]:
    """The gRPC port and the REST port (None without REST) from a backend port file."""
    text = text.strip()
    if text.startswith("{"):
        ports = json.loads(text)
        return int(ports["grpc"]), int(ports["rest"])
    return int(text), None


def backend_command(
    models: Mapping[str, Path],
    *,
    listen: str = "127.0.0.1:0",
    tensor_content: bool = False,
    port_file: Path | None = None,
    max_message_mb: int | None = None,
    python: str = sys.executable,
    rest_listen: str | None = None,
) -> list[str]:
    """The argv that runs the backend with these settings."""
    argv = [python, "-m", "guard.backend", "--listen", listen]
    if rest_listen is not None:
        argv += ["--rest-listen", rest_listen]
    for name, path in models.items():
        argv += ["--model", f"{name}={path}"]
    if tensor_content:
        argv.append("--tensor-content")
    if port_file is not None:
        argv += ["--port-file", str(port_file)]
    if max_message_mb is not None:
        argv += ["--max-message-mb", str(max_message_mb)]
    return argv


def start_backend(
    models: Mapping[str, Path],
    *,
    listen: str = "127.0.0.1:0",
    tensor_content: bool = False,
    max_message_mb: int | None = None,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 180.0,
    rest_listen: str | None = None,
) -> BackendProcess:
    """Start the backend serving ``models`` (name -> base path) and wait until it serves.

    The child writes its bound port(s) to a port file once every model is loaded,
    so ``listen`` and ``rest_listen`` may use port 0. With ``rest_listen`` the
    backend also serves TF Serving's REST API: ``rest_address``/``rest_url`` on the
    result. Raises :class:`BackendStartError` with the tail of the child's log if
    it exits or is not serving within ``startup_timeout_s``.
    """
    workdir = Path(tempfile.mkdtemp(prefix="guard-backend-"))
    port_file = workdir / "port"
    if log_path is None:
        log_path = workdir / "backend.log"
    argv = backend_command(
        models,
        listen=listen,
        tensor_content=tensor_content,
        port_file=port_file,
        max_message_mb=max_message_mb,
        rest_listen=rest_listen,
    )
    argv += list(extra_args)
    child_env = dict(os.environ if env is None else env)
    # The child must import this checkout's guard package even when it is not installed.
    source_root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (source_root, child_env.get("PYTHONPATH", "")) if p
    )
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env)
    deadline = time.monotonic() + startup_timeout_s
    while True:
        if port_file.is_file():
            port, rest_port = read_port_file(port_file.read_text())
            rest_host = rest_listen.rsplit(":", 1)[0] if rest_listen else None
            return BackendProcess(
                process,
                listen.rsplit(":", 1)[0],
                port,
                log_path,
                rest_host=rest_host,
                rest_port=rest_port,
            )
        if process.poll() is not None:
            raise BackendStartError(
                f"backend exited with code {process.returncode}:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise BackendStartError(
                f"backend not serving after {startup_timeout_s:.0f} s:\n{_tail(log_path)}"
            )
        time.sleep(_POLL_S)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
