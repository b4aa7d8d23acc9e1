"""Noticing that watched files changed (config and labels files, certificates): one poller."""

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
    "changed",
    "check_bounded",
    "file_identity",
    "read_bounded",
]

logger = logging.getLogger("guard.files")

#: Per path, as given: (path, device, inode, mtime, size), or (path,) while missing.
FileIdentity = tuple[tuple[str, ...] | tuple[str, int, int, int, int], ...]


def file_identity(paths: Iterable[str | os.PathLike[str] | None]) -> FileIdentity:
    """(path, device, inode, mtime, size) of each file, followed through symlinks.

    It changes when any file does, including a Kubernetes ConfigMap or Secret
    update, which swaps a ``..data`` symlink rather than writing the file (the
    file it leads to is another inode). ``None`` entries are skipped; a file
    that is missing, or behind more symlinks than the kernel follows (a loop),
    is ``(path,)``. The kernel follows the links: one ``stat`` per file, its
    cost bounded however the links are laid out.
    """
    out: list[tuple[str, ...] | tuple[str, int, int, int, int]] = []
    for path in paths:
        if path is None:
            continue
        name = os.fspath(path)
        try:
            st = os.stat(name)
        except (OSError, ValueError):  # ValueError: a NUL in the name
            out.append((name,))
            continue
        out.append((name, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def changed(before: FileIdentity, now: FileIdentity) -> bool:
    """Whether a file that is there now differs from ``before`` (same paths).
    A missing file alone is no change: it may be mid-rotation, and is waited
    for; the others are still watched meanwhile."""
    if len(before) != len(now):
        return True
    return any(len(new) > 1 and new != old for old, new in zip(before, now, strict=True))


class FileTooLargeError(OSError):
    """A file the config points to is not a regular file, or is too large."""


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_bounded(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``.

    Refuses devices, FIFOs, sockets and directories (``/dev/zero`` never ends;
    opening a FIFO with no writer never returns) and files over the limit,
    without reading more than ``max_bytes + 1`` bytes: a file named in a config
    must not be able to exhaust the guard's memory or stop it.

    The file is checked before it is opened, and opened without blocking: a
    FIFO swapped in between the two is still refused, not waited on.
    """
    _check(path, os.stat(path), max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb", closefd=True) as f:
        _check(path, os.fstat(fd), max_bytes)
        data = f.read(max_bytes + 1)  # a regular file: O_NONBLOCK changes nothing
    if len(data) > max_bytes:
        raise FileTooLargeError(f"'{path}' is larger than the {max_bytes}-byte limit")
    return data


def check_bounded(path: str | os.PathLike[str], max_bytes: int) -> None:
    """Raise as :func:`read_bounded` would, for a file another library reads
    by its path (``ssl``'s certificate loaders). Only ``stat``: nothing is
    opened, so a FIFO is refused without blocking."""
    _check(path, os.stat(path), max_bytes)


def _check(path: str | os.PathLike[str], st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        raise FileTooLargeError(f"'{path}' is {kind}, not a regular file")
    if st.st_size > max_bytes:
        raise FileTooLargeError(f"'{path}' is larger than the {max_bytes}-byte limit")


class FileWatcher:
    """Polls a set of files and calls ``on_change`` when any of them changed
    and then stayed the same for one more poll.

    The wait is for a file rewritten in place (``cat new > guard.yaml``, a slow
    copy): caught half-written, its beginning is often valid YAML of its own,
    with a different meaning (``threshold: 0.`` is 0.0). A change is acted on
    once the files' identity (inode, mtime, size) at one poll matches the one
    at the poll before; a file that keeps changing is left alone until it stops.
    Files replaced atomically (a rename, a ConfigMap's symlink swap) are
    complete at once, and only wait the one extra interval.

    ``on_change`` returns whether it took the change; if not (a file caught
    mid-rotation), it is offered the same change again on the next poll. The
    set of files may change (:meth:`watch`), as a config's labels files do.
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
        self._settling: FileIdentity | None = None  # changed, not yet seen stable

    def mark_seen(self) -> FileIdentity:
        """The files as they are now count as handled (after a reload by
        signal); returns their identity, to compare with after reading them."""
        self._seen = file_identity(self._paths)
        self._settling = None
        return self._seen

    def watch(self, paths: Sequence[str | os.PathLike[str] | None]) -> None:
        """Watch ``paths`` from now on, as they are now (a reload just read them)."""
        if tuple(paths) != self._paths:
            self._paths = tuple(paths)
            self.mark_seen()

    def identity(self) -> FileIdentity:
        """The files' identity now."""
        return file_identity(self._paths)

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.poll()
            except Exception:  # never let the watcher die
                logger.exception("watching %s failed", ", ".join(map(str, self._paths)))

    async def poll(self) -> None:
        """Check the files once."""
        now = file_identity(self._paths)
        if not changed(self._seen, now):
            self._settling = None
            return
        if now != self._settling:  # changed since the last poll: may be mid-write
            self._settling = now
            return
        paths = self._paths
        try:
            taken = await self._on_change()
        except Exception:  # never let the watcher die
            logger.exception("handling a change of %s failed", ", ".join(map(str, paths)))
            taken = True
        if taken and self._paths == paths:  # new paths were marked seen by watch()
            self._seen = now
            self._settling = None
