"""Start ``python -m guard.dev.backend`` as a child process and wait until it serves.

Used by the tests, the demo and the guard's dev mode. TensorFlow-free: the
TensorFlow import happens in the child.
"""

from __future__ import annotations

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
        self, process: subprocess.Popen[bytes], host: str, port: int, log_path: Path
    ) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.log_path = log_path
        """The child's stdout and stderr."""

    @property
    def address(self) -> str:
        """``host:port`` for ``grpc.insecure_channel``."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if host == "[::]":
            host = "[::1]"
        return f"{host}:{self.port}"

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


def backend_command(
    models: Mapping[str, Path],
    *,
    listen: str = "127.0.0.1:0",
    tensor_content: bool = False,
    port_file: Path | None = None,
    max_message_mb: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The argv that runs the backend with these settings."""
    argv = [python, "-m", "guard.dev.backend", "--listen", listen]
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
) -> BackendProcess:
    """Start the backend serving ``models`` (name -> base path) and wait until it serves.

    The child writes its bound port to a port file once every model is loaded, so
    ``listen`` may use port 0. Raises :class:`BackendStartError` with the tail of
    the child's log if it exits or is not serving within ``startup_timeout_s``.
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
    )
    argv += list(extra_args)
    child_env = dict(os.environ if env is None else env)
    # The child must import this checkout's guard package even when it is not installed.
    source_root = str(Path(__file__).resolve().parents[3])
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (source_root, child_env.get("PYTHONPATH", "")) if p
    )
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env)
    deadline = time.monotonic() + startup_timeout_s
    while True:
        if port_file.is_file():
            port = int(port_file.read_text().strip())
            return BackendProcess(process, listen.rsplit(":", 1)[0], port, log_path)
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
