"""The one native seam: the C modules are loaded here, and only here.

Two implementations of :class:`Kernels` exist. :class:`Native` reads a
response's layout in place (``_walk``) and checks, ranks and encodes a clean
output in one call (``_rank``). :data:`REFERENCE` does neither, so every
response takes the numpy and protobuf path, which stays the reference the
native one is tested against. The rule book is given one of them, so tests
switch routes by injection.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Protocol

import numpy as np

from guard.dataplane.codec.response import Walked
from guard.dataplane.codec.tensor import Encoding
from guard.dataplane.lanes import Lane, make_lane
from guard.dataplane.rulespec import OutputRule

__all__ = ["MISSING", "NATIVE", "REFERENCE", "Kernels", "Native", "Reference", "default"]


class Kernels(Protocol):
    """What the data plane asks of its native modules."""

    name: str

    def walk(self, data: bytes) -> Walked | None:
        """The response's layout read in place, or ``None`` (protobuf decides)."""

    def lane(
        self,
        name: str,
        rule: OutputRule,
        labels: np.ndarray[Any, Any] | None,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        encoding: Encoding,
    ) -> Lane | None:
        """The native route for one output, or ``None`` (numpy decides)."""


class Reference:
    """No native code: protobuf reads every response, numpy guards every output."""

    name = "reference"

    def walk(self, data: bytes) -> Walked | None:
        return None

    def lane(
        self,
        name: str,
        rule: OutputRule,
        labels: np.ndarray[Any, Any] | None,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        encoding: Encoding,
    ) -> Lane | None:
        return None


class Native:
    """The walker and the check-rank-encode kernel, from the built C modules."""

    name = "native"

    def __init__(self, walk: ModuleType, rank: ModuleType) -> None:
        self.walk_module = walk
        self.rank_module = rank
        self._walk = walk.walk_predict_response
        self._kernel = rank.clean_rank_encode
        self.max_k: int = rank.MAX_K

    def walk(self, data: bytes) -> Walked | None:
        found: Walked | None = self._walk(data)
        return found

    def lane(
        self,
        name: str,
        rule: OutputRule,
        labels: np.ndarray[Any, Any] | None,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        encoding: Encoding,
    ) -> Lane | None:
        return make_lane(self._kernel, self.max_k, name, rule, labels, shape, dtype, encoding)


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


REFERENCE = Reference()
NATIVE, MISSING = _load()
"""The native kernels (``None`` unless both C modules are built), and the
names of the modules that are not built."""


def default() -> Kernels:
    """The native kernels when built, else the reference."""
    return NATIVE if NATIVE is not None else REFERENCE
