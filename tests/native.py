"""Switching the native clean path (``guard._rank``) off, for differential tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from guard import rules


@contextmanager
def numpy_only() -> Iterator[None]:
    """Run the rule engine as an install without a C compiler would.

    Rule books made inside it never get a fast lane (their lane caches remember
    that there was none), so keep such books apart from the others.
    """
    saved = rules._rank
    rules._rank = None  # type: ignore[assignment]
    try:
        yield
    finally:
        rules._rank = saved
