"""Noticing that watched files changed (config file, certificates)."""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["FileIdentity", "file_identity"]

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
