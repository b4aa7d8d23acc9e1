"""Noticing that watched files changed (config file, certificates): one poller."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence

__all__ = [
    "FileIdentity",
    "FileTooLargeError",
    "FileWatcher",
    "check_bounded",
    "file_identity",
    "read_bounded",
]

logger = logging.getLogger("guard.files")

FileIdentity = tuple[tuple[str, int, int, int], ...]


def file_identity(paths: Iterable[str | os.PathLike[str] | None]) -> FileIdentity | None:
    """(real path, inode, mtime, size) of each file, followed through symlinks.

    It changes when any file does, including a Kubernetes ConfigMap or Secret
    update, which swaps a ``..data`` symlink rather than writing the file.
    ``None`` entries are skipped; ``None`` is returned while any file is
    missing (mid-rotation: try again later).
    """
    out = []
    for path in paths:
        if path is None:
            continue
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
        except OSError:
            return None
        out.append((real, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class FileTooLargeError(OSError):
    """A file the config points to is not a regular file, or is too large."""


def read_bounded(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``.

    Refuses devices, FIFOs and directories (``/dev/zero`` never ends) and files
    over the limit, without reading more than ``max_bytes + 1`` bytes: a file
    named in a config must not be able to exhaust the guard's memory.
    """
    with open(path, "rb") as f:
        _check(path, os.fstat(f.fileno()), max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLargeError(f"'{path}' is larger than the {max_bytes}-byte limit")
    return data


def check_bounded(path: str | os.PathLike[str], max_bytes: int) -> None:
    """Raise as :func:`read_bounded` would, for a file another library reads
    by its path (``ssl``'s certificate loaders)."""
    _check(path, os.stat(path), max_bytes)


def _check(path: str | os.PathLike[str], st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise FileTooLargeError(f"'{path}' is not a regular file")
    if st.st_size > max_bytes:
        raise FileTooLargeError(f"'{path}' is larger than the {max_bytes}-byte limit")


class FileWatcher:
    """Polls a set of files and calls ``on_change`` when any of them changed.

    ``on_change`` returns whether it took the change; if not (a file caught
    mid-rotation), it is offered the same change again on the next poll.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str] | None],
        on_change: Callable[[], Awaitable[bool]],
        interval_s: float = 1.0,
    ) -> None:
        self._paths = tuple(paths)
        self._on_change = on_change
        self._interval_s = interval_s
        self._seen = file_identity(self._paths)

    def mark_seen(self) -> None:
        """The files as they are now count as handled (after a reload by signal)."""
        self._seen = file_identity(self._paths)

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            await self.poll()

    async def poll(self) -> None:
        """Check the files once."""
        now = file_identity(self._paths)
        if now is None or now == self._seen:
            return
        try:
            taken = await self._on_change()
        except Exception:  # never let the watcher die
            logger.exception("handling a change of %s failed", ", ".join(map(str, self._paths)))
            taken = True
        if taken:
            self._seen = now
