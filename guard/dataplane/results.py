"""What guarding an output produced: typed results, no transport, no numpy math."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

__all__ = [
    "CLAMPED",
    "CLEAN",
    "OBSERVED",
    "REJECTED",
    "Action",
    "Array",
    "Counts",
    "Derived",
    "OutputResult",
    "verdict_headers",
]

Array = np.ndarray[Any, Any]


class Action(IntEnum):
    """What the guard did to a response, ordered by severity: a response's
    action is the most severe of its outputs'."""

    CLEAN = 0
    OBSERVED = 1
    CLAMPED = 2
    REJECTED = 3

    @property
    def label(self) -> str:
        """The name clients and metrics see: ``clean``, ``observed``, ..."""
        return _ACTION_LABELS[self]


# The members by plain name: looking a member up on the enum class costs
# about 180 ns in Python 3.11, paid per response on the native routes.
CLEAN, OBSERVED, CLAMPED, REJECTED = Action

# Indexed by the action's value: an enum's ``name`` is a slow descriptor.
_ACTION_LABELS = tuple(action.name.lower() for action in Action)


@functools.lru_cache(maxsize=256)
def verdict_headers(action: Action, violations: int) -> tuple[tuple[str, str], ...]:
    """The ``x-guard-action`` and ``x-guard-violations`` pairs of a guarded
    response (gRPC trailers, HTTP headers): the same few pairs on almost every
    response, built once."""
    return (("x-guard-action", action.label), ("x-guard-violations", str(violations)))


@dataclass(slots=True)
class Counts:
    """Violation counts for one output of one response."""

    values: int = 0
    below_min: int = 0
    above_max: int = 0
    nan: int = 0
    inf: int = 0
    bad_rows: int = 0

    @property
    def violating_values(self) -> int:
        """Values out of range, NaN or Inf."""
        return self.below_min + self.above_max + self.nan + self.inf

    @property
    def total(self) -> int:
        """Violating values plus bad-sum rows (the ``x-guard-violations`` figure)."""
        return self.violating_values + self.bad_rows


@dataclass(slots=True)
class Derived:
    """An output the guard adds to the response, next to the original."""

    suffix: str
    """Appended to the output name: ``_class``, ``_score``, ``_label``, ``_top_k_*``."""
    array: Array
    """int64, the source's float dtype, or an object array of ``bytes`` (labels)."""


@dataclass(slots=True)
class OutputResult:
    """What the rule did to one output."""

    values: Array
    """The values to return (activated and/or repaired), or the input unchanged."""
    changed: bool
    """Whether ``values`` differ from the input (the tensor must be re-encoded)."""
    counts: Counts
    action: Action
    checked: Array
    """The values that were validated (after activation, before repair): the
    histogram and the class counter read these."""
    rejection: str | None = None
    """Why the output was rejected (the call's details), when ``action`` is ``REJECTED``."""
    classes: Array | None = None
    """The predicted class per row (argmax, top-1, or the thresholded 0/1), for metrics."""
    multi_label: bool = False
    """``classes`` holds a 0/1 per class (a threshold on a multi-class output)."""
    confidence: Array | None = None
    """Each row's top *checked* value (before repair), when argmax/top-k already
    found it: the histogram reads it instead of scanning the rows again."""
    derived: list[Derived] = field(default_factory=list)
    abstained: int = 0
    """Rows (or values, for a threshold) below ``min_confidence``: class -1."""
    entropy_rows: Array | None = None
    """The checked values as [rows, classes], when the rule tracks entropy."""
