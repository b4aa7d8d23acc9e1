"""Before a command starts serving: the addresses it will listen on and the
temporary directory it needs, checked so that a user's mistake is one line
naming the setting (exit 2), not a traceback from deep in gRPC, aiohttp or
``tempfile``; and a failure to bind that gets past the check (a race)
reported the same way."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guard.control.config import Config, settings
from guard.control.net import bind_problem, overlap, share_problem

__all__ = [
    "CannotStart",
    "Listener",
    "backend_listeners",
    "check_port_file",
    "check_tempdir",
    "serve_listeners",
    "start",
]


class CannotStart(Exception):
    """A listening address or the temporary directory the command cannot use:
    reported in one line, with what to change, exit code 2."""


@dataclass(frozen=True)
class Listener:
    """One address a command listens on, and how its bind is checked."""

    setting: str
    """What the message names: ``listen``, ``--rest-listen``."""
    address: str
    change: str
    """Where to give another: ``--listen, GUARD_LISTEN or 'listen' in the config file``."""
    reuse_port: bool = True
    first_only: bool = False
    alone: bool = False
    """Refuse a port another process listens on, though SO_REUSEPORT would share it."""

    def problem(self) -> str | None:
        why = bind_problem(self.address, reuse_port=self.reuse_port, first_only=self.first_only)
        if why is None and self.alone:
            why = share_problem(self.address)
        return None if why is None else f"{self.setting} {self.address}: {why} ({self.change})"


def serve_listeners(cfg: Config, dev_mode: bool, worker: bool = False) -> list[Listener]:
    """What ``guard serve`` binds, with the options its servers bind with: gRPC
    and REST share their port with SO_REUSEPORT, but not with another process
    (new connections would reach either), except a ``--workers`` worker with
    its siblings; the metrics endpoint does not, and binds the first address
    its host resolves to."""
    served = {"listen", "metrics_listen"}
    if cfg.rest_upstream is not None or dev_mode:  # dev mode serves REST against the backend
        served.add("rest_listen")
    found = []
    for name, setting in settings():
        if name in served:
            change = f"{setting.flag}, {setting.env} or '{name}' in the config file"
            metrics = name == "metrics_listen"
            found.append(
                Listener(
                    name, getattr(cfg, name), change, reuse_port=not metrics,
                    first_only=metrics, alone=not (metrics or worker),
                )
            )  # fmt: skip
    return found


def backend_listeners(args: argparse.Namespace) -> list[Listener]:
    """What ``guard backend`` binds (neither of its servers sets SO_REUSEPORT)."""
    found = [Listener("--listen", args.listen, "--listen", False)]
    if getattr(args, "rest_listen", None):
        found.append(Listener("--rest-listen", args.rest_listen, "--rest-listen", False))
    return found


_NO_TEMPDIR = (
    "TMPDIR: no usable temporary directory (TMPDIR, /tmp, /var/tmp and the working "
    "directory are all missing, read-only or full); set TMPDIR to a writable directory "
    "(--workers and --model keep their children's port files there)"
)


def check_tempdir() -> None:
    try:
        tempfile.gettempdir()
    except FileNotFoundError:
        raise CannotStart(_NO_TEMPDIR) from None


def check_port_file(path: str | os.PathLike[str] | None) -> None:
    """Refuse a ``--port-file`` that cannot be written, before anything binds:
    it is written once serving has started, where a failure was a traceback
    (and a directory given as the path left a stray ``PATH.tmp`` beside it).
    Written as it will be, through ``PATH.tmp``: a writable-looking directory
    (root's view of /proc) or a name one suffix too long is found too."""
    if path is None:
        return
    target = Path(path)
    problem = None
    try:
        if target.is_dir():
            problem = "is a directory"
        else:
            problem = _probe(target.with_name(target.name + ".tmp"))
    except OSError as exc:
        problem = f"cannot be written: {exc.strerror or exc}"
    if problem is not None:
        raise CannotStart(
            f"--port-file {str(path)!r} {problem}; give a file path in a writable directory"
        )


def _probe(tmp: Path) -> str | None:
    """Create and remove ``tmp`` (raises OSError); what stops it, else ``None``."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # a file left by an earlier run is written over
        return f"needs {str(tmp)!r} for a moment, which is a directory" if tmp.is_dir() else None
    os.close(fd)
    tmp.unlink()
    return None


def start(listeners: Sequence[Listener], tls: bool, run: Callable[[], int]) -> int:
    """Check that every listener can bind, then ``run``. A bind that fails
    all the same (a race, or a case the check does not see) is reported as
    the check would report it; any other failure propagates untouched."""
    check_distinct(listeners)
    for listener in listeners:
        if (problem := listener.problem()) is not None:
            raise CannotStart(problem)
    try:
        return run()
    except (OSError, RuntimeError, UnicodeError) as exc:
        failure = _start_failure(exc, listeners, tls)
        if failure is None:
            raise
        raise failure from None


def check_distinct(listeners: Sequence[Listener]) -> None:
    """Refuse two of the command's own listeners on one port: with
    SO_REUSEPORT both bind, and each takes a share of the other's connections
    (gRPC clients reaching aiohttp fail every call)."""
    for i, later in enumerate(listeners):
        for earlier in listeners[:i]:
            if overlap(earlier.address, later.address):
                raise CannotStart(
                    f"{later.setting} {later.address}: the same port as {earlier.setting} "
                    f"{earlier.address}; give each its own port ({later.change})"
                )


_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def _start_failure(
    exc: BaseException, listeners: Sequence[Listener], tls: bool
) -> CannotStart | None:
    """The one line for a start that failed to bind a listener or to find a
    temporary directory; ``None`` for anything else (a genuine error)."""
    if isinstance(exc, FileNotFoundError) and "No usable temporary directory" in str(exc):
        return CannotStart(_NO_TEMPDIR)
    grpc_bind = isinstance(exc, RuntimeError) and str(exc).startswith("Failed to bind")
    resolving = isinstance(exc, socket.gaierror | UnicodeError)
    binding = isinstance(exc, OSError) and exc.errno in _BIND_ERRNOS
    if not (grpc_bind or resolving or binding):
        return None
    for listener in listeners:
        if (problem := listener.problem()) is not None:
            return CannotStart(problem)
    if grpc_bind and listeners:  # gRPC says no more than that, and binds the first
        grpc = listeners[0]
        files = ", or its TLS files (tls) could not be loaded" if tls else ""
        return CannotStart(
            f"{grpc.setting} {grpc.address}: gRPC could not listen on it{files} ({grpc.change})"
        )
    return None
