"""Types of the native module built from guard/dataplane/_rank.c."""

from typing import Any

from _typeshed import ReadableBuffer
from numpy import ndarray

Buffer = ReadableBuffer | ndarray[Any, Any]

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
    thresholds: bytes | None = None,
    /,
) -> tuple[bytes, bytes, bytes] | None: ...
def row_entropy(values: Buffer, rows: int, cols: int, /) -> bytes:
    """Each row's normalised entropy of float32 values, as float64 (see _rank.c)."""
