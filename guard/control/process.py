"""Child processes that announce their ports in a JSON port file.

``guard serve``, ``guard backend`` and the workers write ``{"grpc": PORT,
...}`` atomically once they serve; whoever started them (the supervisor, the
demo, the tests, the benchmarks) waits for that file with :func:`start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "HEARTBEAT_S",
    "PORT_FILE_NAME",
    "Child",
    "ChildStartCancelled",
    "ChildStartError",
    "guard_argv",
    "keep_fresh",
    "read_port_file",
    "start",
    "write_port_file",
]

_POLL_S = 0.05
PORT_FILE_NAME = "ports.json"
HEARTBEAT_S = 1.0
SOURCE_ROOT = Path(__file__).resolve().parents[2]


class ChildStartError(RuntimeError):
    """The child exited, or did not write its port file in time."""


class ChildStartCancelled(ChildStartError):
    """Whoever waited for the child gave up (it is stopping): the child was stopped."""


# A child told to stop while it starts gets this long before SIGKILL: one
# that serves nothing yet drains at once.
_CANCEL_GRACE_S = 5.0


def write_port_file(path: Path, ports: Mapping[str, Any]) -> None:
    """Write ``ports`` as JSON, atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(ports)), encoding="utf-8")
    tmp.replace(path)


async def keep_fresh(path: Path, ports: Mapping[str, Any], interval_s: float = HEARTBEAT_S) -> None:
    """Touch the port file ``path`` every ``interval_s`` from the event loop
    until cancelled: to whoever started this process, a stale modification
    time means a loop that stopped running (SIGSTOP, a deadlock, a call that
    never returns). A port file removed meanwhile, or its directory (a
    temporary-file cleaner), is written again, so that its silence is not
    taken for a stall."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            os.utime(path)
        except FileNotFoundError:
            with contextlib.suppress(OSError):  # a read-only or full disk: nothing to do
                path.parent.mkdir(parents=True, exist_ok=True)
                write_port_file(path, ports)
        except OSError:
            pass


def read_port_file(path: Path) -> dict[str, Any]:
    """The ports a child wrote."""
    found: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return found


def guard_argv(*args: str, python: str = sys.executable) -> list[str]:
    """``python -m guard ARGS``."""
    return [python, "-m", "guard", *args]


@dataclass
class Child:
    """A running child and the ports it announced; stop it with :meth:`stop` or ``with``."""

    process: subprocess.Popen[bytes]
    ports: dict[str, Any]
    log_path: Path | None
    """Where its output goes (``None``: inherited)."""
    workdir: Path = field(repr=False)

    @property
    def port_file(self) -> Path:
        """The file it announced its ports in; a serving guard keeps its
        modification time fresh while its event loop runs (a heartbeat)."""
        return self.workdir / PORT_FILE_NAME

    def endpoint(self, port: str = "grpc", host: str = "127.0.0.1") -> str:
        """``host:port`` of one announced port."""
        return f"{host}:{self.ports[port]}"

    def log_text(self) -> str:
        """Everything the child wrote to stdout and stderr so far."""
        return "" if self.log_path is None else self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (a graceful stop), then SIGKILL after ``timeout_s``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start(
    argv: Sequence[str],
    *,
    port_flag: str = "--port-file",
    log_path: Path | None = None,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
    cancelled: Callable[[], bool] = lambda: False,
    **popen: Any,
) -> Child:
    """Start ``argv`` with ``port_flag PATH`` appended and wait for its port file.

    The child's output goes to ``log_path`` (a file in a fresh directory by
    default), or is inherited with ``capture=False``. The child imports this
    checkout's ``guard`` package even when it is not installed. Raises
    :class:`ChildStartError`, with the tail of the child's log, when it exits
    or has not written its port file within ``timeout_s``; and
    :class:`ChildStartCancelled`, once the child is stopped, when
    ``cancelled()`` turns true while it starts (a signal handler can set it).
    """
    workdir = Path(tempfile.mkdtemp(prefix="guard-child-"))
    port_file = workdir / PORT_FILE_NAME
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SOURCE_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    command = [*argv, port_flag, str(port_file)]
    if log_path is None and not capture:
        process = subprocess.Popen(command, env=child_env, **popen)  # inherits our output
    else:
        log_path = log_path or workdir / "child.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=child_env, **popen
            )
    try:
        _wait_for(port_file, process, log_path, timeout_s, cancelled)
    except ChildStartError:
        # The message has the log's tail: a failed start leaves no directory.
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Child(process, read_port_file(port_file), log_path, workdir)


def _wait_for(
    port_file: Path,
    process: subprocess.Popen[bytes],
    log_path: Path | None,
    timeout_s: float,
    cancelled: Callable[[], bool],
) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_file.is_file():
        if cancelled():
            _end(process)
            raise ChildStartCancelled(f"stopped while starting (exit code {process.returncode})")
        if process.poll() is not None:
            raise ChildStartError(f"exited with code {process.returncode}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise ChildStartError(f"no port file after {timeout_s:.0f} s:\n{_tail(log_path)}")
        time.sleep(_POLL_S)


def _end(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=_CANCEL_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return "(output not captured)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
