"""The one native seam: the C modules are loaded here, and only here.

Two implementations of :class:`Kernels` exist. :class:`Native` reads a
response's layout in place (``_walk``; for REST, the numbers of a tensor's
text, and the text of derived outputs) and checks, ranks and encodes a clean
output in one call (``_rank``).
:data:`REFERENCE` (the base class) does neither, so every response takes the
numpy and protobuf path, which stays the reference the native one is tested
against. The rule book is given one of them, so tests switch routes by
injection.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from guard.dataplane.codec.response import Walked
from guard.dataplane.lanes import Lane, OutputSpec, make_lane
from guard.dataplane.results import Array
from guard.dataplane.rules import normalized_entropy

if TYPE_CHECKING:  # restjson is imported by the REST front-end only, when REST is served
    from guard.dataplane.codec.restjson import NumberScan, RequestPeekScan, TextWriter, ValueSkip

__all__ = ["MISSING", "NATIVE", "REFERENCE", "Kernels", "Native", "default", "row_entropy"]


class Kernels:
    """What the data plane asks of its native modules; this base is the
    reference: protobuf reads every response, numpy guards every output."""

    name = "reference"

    def walk(self, data: bytes) -> Walked | None:
        """The response's layout read in place, or ``None`` (protobuf decides)."""
        return None

    def lane(self, spec: OutputSpec) -> Lane | None:
        """The native route for one output, or ``None`` (numpy decides)."""
        return None

    number_scan: NumberScan | None = None
    """The numbers of a REST tensor's text, scanned natively (``None``: numpy)."""

    request_peek: RequestPeekScan | None = None
    """A REST request's signature and format, peeked natively (``None``: Python)."""

    numbers_at_most: Callable[[bytes, int], int] | None = None
    """An upper bound on a REST body's numbers, counted natively (``None``: Python)."""

    value_skip: ValueSkip | None = None
    """Where a REST output's non-numeric value ends, found natively (``None``: Python)."""

    rest_writer: TextWriter | None = None
    """The text of a REST response's derived outputs, written natively (``None``: Python)."""


class Native(Kernels):
    """The walker and the check-rank-encode kernel, from the built C modules."""

    name = "native"

    def __init__(self, walk: ModuleType, rank: ModuleType) -> None:
        self.walk_module = walk
        self.rank_module = rank
        self._walk = walk.walk_predict_response
        self._kernel = rank.clean_rank_encode
        self.max_k: int = rank.MAX_K
        self.number_scan = walk.scan_tensor
        self.request_peek = walk.peek_request
        self.value_skip = walk.skip_value
        self.numbers_at_most = walk.numbers_at_most
        self.rest_writer = walk

    def walk(self, data: bytes) -> Walked | None:
        found: Walked | None = self._walk(data)
        return found

    def lane(self, spec: OutputSpec) -> Lane | None:
        return make_lane(self._kernel, self.max_k, spec)


def _load() -> tuple[Native | None, tuple[str, ...]]:
    modules: dict[str, ModuleType | None] = {}
    try:
        from guard.dataplane import _walk

        modules["guard.dataplane._walk"] = _walk
    except ImportError:  # built by setup.py when a C compiler is there; optional
        modules["guard.dataplane._walk"] = None
    try:
        from guard.dataplane import _rank

        modules["guard.dataplane._rank"] = _rank
    except ImportError:
        modules["guard.dataplane._rank"] = None
    missing = tuple(name for name, module in modules.items() if module is None)
    walk, rank = modules["guard.dataplane._walk"], modules["guard.dataplane._rank"]
    if walk is None or rank is None:
        return None, missing
    return Native(walk, rank), missing


REFERENCE = Kernels()
NATIVE, MISSING = _load()
"""The native kernels (``None`` unless both C modules are built), and the
names of the modules that are not built."""


def default() -> Kernels:
    """The native kernels when built, else the reference."""
    return NATIVE if NATIVE is not None else REFERENCE


def row_entropy(rows: Array) -> Array:
    """Each row's normalised entropy ([rows, classes] in, float64 per row out).

    One function for the whole process, whichever route a response took, so
    both routes count alike: the native loop for float32 values when built
    (within 1e-5 of the reference), else
    :func:`~guard.dataplane.rules.normalized_entropy`.
    """
    n_rows, n_classes = rows.shape
    if NATIVE is None or rows.dtype != np.float32 or n_classes < 2 or not rows.flags.c_contiguous:
        return normalized_entropy(rows)
    out: Array = np.frombuffer(NATIVE.rank_module.row_entropy(rows, n_rows, n_classes))
    return out
