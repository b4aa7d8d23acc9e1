"""Types of the native module built from guard/dataplane/_rank.c."""

from typing import Any

from _typeshed import ReadableBuffer
from numpy import ndarray

Buffer = ReadableBuffer | ndarray[Any, Any]
#: What a lane counted: the repaired values (None when it observed), below,
#: above, infinite, and rows off their sum.
Counted = tuple[bytes | None, int, int, int, int]

MAX_K: int
"""The largest k the native top-k ranks (larger k take the numpy reference)."""

def clean_rank_encode(
    values: Buffer,
    itemsize: int,
    rows: int,
    cols: int,
    k: int,
    lo: float,
    hi: float,
    check_sum: bool,
    sum_lo: float,
    sum_hi: float,
    content: bool,
    score_key: int,
    entries: tuple[tuple[object, ...], ...],
    thresholds: bytes | float | None = None,
    repair: int = 0,
    /,
) -> tuple[bytes, bytes, bytes] | tuple[bytes, bytes, bytes, Counted] | None:
    """See the docstring in guard/dataplane/_rank.c: 0 declines anything out
    of range, 1 counts it (observe), 2 counts and clamps it."""

def row_entropy(values: Buffer, rows: int, cols: int, /) -> bytes:
    """Each row's normalised entropy of float32 values, as float64 (see _rank.c)."""
