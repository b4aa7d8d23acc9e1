"""The allocator's settings for a process that handles megabyte messages."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
from collections.abc import Callable, Iterator

__all__ = ["Statm", "Trimmer", "rss_bytes", "trim", "tune_malloc", "young_collections_only"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_MB = 1024 * 1024


def tune_malloc() -> bool:
    """Keep response-sized buffers on the heap, and give freed memory back.

    glibc serves allocations over its mmap threshold (128 KiB at first) with
    new mappings, so every large response costs page faults on zeroed pages.
    A fixed threshold of 32 MiB (glibc's maximum on 64-bit) keeps megabyte
    buffers reusable: a 1024x201 response that needs clamping took 4.5 ms per
    guarded response with glibc's defaults, 1.3 ms with this. Freed memory
    past 4 MiB at the top of a heap is returned at once: with 64 MiB there,
    eight gzip bombs left 35-70 MB behind in gRPC's thread arenas for good
    (which ``malloc_trim`` cannot reach), and the clamping case was no faster
    (1.5 ms). A trim leaves 16 MiB at the top, though: guarding a REST
    predict of 1024x201 (3 MB of JSON in, 3.6 MB out, its numbers in
    between) frees about 10 MB, and trimming all of it made the next call
    fault 2,800 pages in again: 35 ms for the guard step, 24 ms with the pad
    (the live guard: 30-34 against 26-30 ms of CPU per call). ``Trimmer``
    still hands the pad back after a spike. Returns whether the allocator
    took the settings (not glibc: no-op).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, 32 * _MB)
        and mallopt(_M_TRIM_THRESHOLD, 4 * _MB)
        and mallopt(_M_TOP_PAD, 16 * _MB)
    )


logger = logging.getLogger("guard.memory")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class Statm:
    """This process's RSS, read from /proc/self/statm kept open: a few µs a
    reading, for watches that read it every few ms (opened in the process
    that reads it: /proc/self is resolved at open). :func:`rss_bytes` where
    there is none."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None

    def __call__(self) -> int:
        if self._fd is None:
            return rss_bytes()
        return int(os.pread(self._fd, 64, 0).split()[1]) * _PAGE

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Trimmer:
    """Hands freed heap memory back to the system after a spike.

    glibc keeps freed memory in its arenas: after a large message (or a
    compression bomb that gRPC decompressed up to max_request_mb) the process
    would stay at its peak for good, and a pod at its memory limit. While RSS
    is ``threshold`` above the lowest it has been, ``malloc_trim(0)`` returns
    what is free. It runs in a thread, as it takes the arenas' locks (up to
    ~0.1 s after a 100 MB spike); when a trim finds little to return (the
    memory is in use), the next waits twice as long, up to ``max_interval_s``.
    """

    def __init__(
        self,
        interval_s: float = 2.0,
        threshold: int = 16 * 1024 * 1024,
        max_interval_s: float = 60.0,
    ) -> None:
        self._interval_s = self._base_interval_s = interval_s
        self._max_interval_s = max_interval_s
        self._threshold = threshold
        self._low = rss_bytes()
        self.trims = 0

    @property
    def available(self) -> bool:
        """Whether the allocator can trim (glibc)."""
        return _malloc_trim() is not None

    async def run(self) -> None:
        """Trim when warranted, until cancelled."""
        while self.available:
            await asyncio.sleep(self._interval_s)
            if rss_bytes() > self._low + self._threshold:
                await asyncio.to_thread(self.trim_now)
            else:
                self._interval_s = self._base_interval_s

    def trim_now(self) -> None:
        """Return free heap memory to the system now."""
        before = rss_bytes()
        if trim():
            self.trims += 1
        after = rss_bytes()
        self._low = min(self._low, after)
        freed = before - after
        logger.log(
            logging.INFO if freed >= self._threshold else logging.DEBUG,
            "returned %.1f MB of freed heap memory to the system (RSS %.1f -> %.1f MB)",
            freed / _MB, before / _MB, after / _MB,
        )  # fmt: skip
        if freed < self._threshold // 4:
            self._interval_s = min(self._interval_s * 2, self._max_interval_s)
        else:
            self._interval_s = self._base_interval_s


def trim() -> bool:
    """Return free heap memory to the system now, where the allocator can
    (glibc); whether it could."""
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        malloc_trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return malloc_trim


@contextlib.contextmanager
def young_collections_only() -> Iterator[None]:
    """No full garbage collections meanwhile: for building something large.

    Every collection of the oldest generation walks every object alive, and
    a growing structure keeps triggering them: loading a config of 25,000
    model rules (450,000 YAML values) ran ten full collections, the last of
    0.94 s, each stopping the event loop while a reload loaded on its thread
    (6 s in all). Without them: 3 s, the loop stopped 0.1 s at most. Young
    collections go on, so short-lived cycles are still freed meanwhile.
    """
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, 1 << 30)
    try:
        yield
    finally:
        gc.set_threshold(young, middle, full)
