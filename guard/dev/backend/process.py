"""Start ``python -m guard.dev.backend`` as a child process and wait until it serves.

Used by the tests, the demo and the guard's dev mode. TensorFlow-free: the
TensorFlow import happens in the child.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from guard.control.process import Child, ChildStartError, start

__all__ = ["BackendProcess", "BackendStartError", "backend_command", "start_backend"]

BackendStartError = ChildStartError


class BackendProcess(Child):
    """A running backend child process; stop it with :meth:`stop` or ``with``."""

    @property
    def port(self) -> int:
        """The gRPC port."""
        port: int = self.ports["grpc"]
        return port

    @property
    def address(self) -> str:
        """``host:port`` for ``grpc.insecure_channel``."""
        return self.endpoint("grpc")

    @property
    def rest_address(self) -> str | None:
        """``host:port`` of the REST API, or None when it is not served."""
        return self.endpoint("rest") if "rest" in self.ports else None

    @property
    def rest_url(self) -> str | None:
        """``http://host:port`` of the REST API, or None when it is not served."""
        return None if self.rest_address is None else f"http://{self.rest_address}"


def backend_command(
    models: Mapping[str, Path],
    *,
    listen: str = "127.0.0.1:0",
    tensor_content: bool = False,
    max_message_mb: int | None = None,
    python: str = sys.executable,
    rest_listen: str | None = None,
) -> list[str]:
    """The argv that runs the backend with these settings (without ``--port-file``)."""
    argv = [python, "-m", "guard.dev.backend", "--listen", listen]
    if rest_listen is not None:
        argv += ["--rest-listen", rest_listen]
    for name, path in models.items():
        argv += ["--model", f"{name}={path}"]
    if tensor_content:
        argv.append("--tensor-content")
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

    The child writes its ports to a port file once every model is loaded, so
    ``listen`` and ``rest_listen`` may use port 0. With ``rest_listen`` the
    backend also serves TF Serving's REST API (``rest_address``/``rest_url``).
    Raises :class:`BackendStartError` with the tail of the child's log if it
    exits or is not serving within ``startup_timeout_s``.
    """
    argv = backend_command(
        models,
        listen=listen,
        tensor_content=tensor_content,
        max_message_mb=max_message_mb,
        rest_listen=rest_listen,
    )
    child = start([*argv, *extra_args], log_path=log_path, env=env, timeout_s=startup_timeout_s)
    return BackendProcess(child.process, child.ports, child.log_path, child.workdir)
