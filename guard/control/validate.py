"""Reading YAML values into typed settings, with errors that say what is allowed.

Every problem names the file, the rule and the field; all of a file's
problems are collected so one run shows them all.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from guard.dataplane.errors import ConfigError

__all__ = [
    "Convert",
    "Problems",
    "as_address",
    "as_bool",
    "as_float",
    "as_int",
    "as_labels",
    "as_range",
    "as_str",
    "as_threshold",
    "check_keys",
    "get",
]

T = TypeVar("T")
Convert = Callable[[Any], T]
"""Raises TypeError or ValueError (whose text, if any, is shown) for a bad value."""


class Problems:
    """Collects every problem in a file, so one run shows them all."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, msg: str) -> None:
        """Record one problem at ``where`` (the rule, or ``""`` for the top level)."""
        prefix = f"{self.source}: {where}: " if where else f"{self.source}: "
        self.items.append(prefix + msg)

    def raise_if_any(self) -> None:
        """Raise one :class:`ConfigError` listing every problem."""
        if self.items:
            raise ConfigError("\n".join(self.items))


def check_keys(
    problems: Problems, where: str, data: Mapping[str, Any], allowed: Iterable[str]
) -> None:
    """Every key must be known; suggest the closest one for a typo."""
    allowed = tuple(allowed)
    for key in data:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            problems.add(
                where, f"unknown field '{key}'{did_you_mean}; allowed fields: {', '.join(allowed)}"
            )


def get(
    problems: Problems,
    where: str,
    data: Mapping[str, Any],
    key: str,
    default: T,
    convert: Convert[T],
    allowed: str,
) -> T:
    """``data[key]`` through ``convert``; on failure record a problem and return the default."""
    if key not in data or data[key] is None and default is None:
        return default
    value = data[key]
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        reason = f" ({exc})" if str(exc) else ""
        problems.add(where, f"field '{key}': {_shown(value)} is not allowed{reason}; {allowed}")
        return default


_SHOWN_MAX = 200
# Shown values are cut before they are written out: a list of a million
# labels must not become a message of a million labels first.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 3, 8, 8
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN_MAX


def _shown(value: Any) -> str:
    text = _SHOWN.repr(value)
    return text if len(text) <= _SHOWN_MAX else f"{text[:_SHOWN_MAX]}..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_str(value: Any) -> str:
    if isinstance(value, bool | int | float):  # name: 5, a model named 5
        kind = "true or false" if isinstance(value, bool) else "a number"
        raise TypeError(f"YAML reads it as {kind}; quote it for text: '{value}'")
    if not isinstance(value, str):
        raise TypeError("")
    return value


def as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("")
    return value


def as_float(lo: float, hi: float, *, lo_open: bool = False) -> Convert[float]:
    """A number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def convert(value: Any) -> float:
        if not _is_number(value) or math.isnan(value):
            raise TypeError("")
        v = float(value)
        if v < lo or v > hi or (lo_open and v == lo):
            raise ValueError("")
        return v

    return convert


def as_int(lo: int, hi: int) -> Convert[int]:
    """A whole number in ``[lo, hi]``."""

    def convert(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError("")
        if value < lo or value > hi:
            raise ValueError("")
        return value

    return convert


_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]*):(\d{1,5})$")


def as_address(value: Any) -> str:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    if not isinstance(value, str):
        raise TypeError("")
    m = _ADDRESS.match(value)
    if not m or int(m.group(1)) > 65535:
        raise ValueError("")
    return value


def as_range(value: Any) -> tuple[float, float]:
    """``[lo, hi]`` with ``lo < hi``."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise TypeError("")
    if not all(_is_number(v) and not math.isnan(v) for v in value):
        raise TypeError("")
    lo, hi = float(value[0]), float(value[1])
    if not lo < hi:
        raise ValueError("the lower bound must be below the upper bound")
    return lo, hi


def as_threshold(value: Any) -> float | tuple[float, ...]:
    """A finite number, or a non-empty list of them."""
    if _is_number(value) and math.isfinite(value):
        return float(value)
    if isinstance(value, list) and value and all(_is_number(v) and math.isfinite(v) for v in value):
        return tuple(float(v) for v in value)
    raise TypeError("")


#: What a label may not hold, given inline or in a labels file: control
#: characters other than tab (C0 with the line feed, DEL, C1), the Unicode line
#: and paragraph separators, and a byte order mark.
LABEL_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ufeff]")
LABEL_FORBIDDEN_SAYS = (
    "labels may hold tabs, but no other control character (U+0000-U+001F, U+007F-U+009F), "
    "line or paragraph separator (U+2028, U+2029) or byte order mark (U+FEFF)"
)


def as_labels(value: Any) -> tuple[str, ...]:
    """A non-empty list of strings (YAML numbers are read as their text)."""
    if not isinstance(value, list) or not value:
        raise TypeError("")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise TypeError(f"label {v!r} is not a string")
        bad = LABEL_FORBIDDEN.search(str(v))
        if bad is not None:
            raise TypeError(
                f"label {_shown(str(v))} holds U+{ord(bad.group()):04X}; {LABEL_FORBIDDEN_SAYS}"
            )
        out.append(str(v))
    return tuple(out)


def as_pair(limit: float) -> Convert[tuple[float, float]]:
    """Two numbers ``[a, b]``, each within ``[-limit, limit]``."""

    def convert(value: Any) -> tuple[float, float]:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise TypeError("")
        if not all(_is_number(v) and math.isfinite(v) for v in value):
            raise TypeError("")
        if not all(abs(v) <= limit for v in value):
            raise ValueError("")
        return float(value[0]), float(value[1])

    return convert


#: The most bins a drift baseline may have.
BASELINE_BINS_MAX = 1000


def as_baseline(value: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``{edges: [...], fractions: [...]}``: increasing finite edges, and one
    non-negative fraction per bin (``len(edges) + 1``) summing to 1."""
    if not isinstance(value, dict) or set(value) != {"edges", "fractions"}:
        raise TypeError("")
    edges, fractions = value["edges"], value["fractions"]
    numbers = (edges, fractions)
    if not all(isinstance(v, list) and v for v in numbers) or len(edges) > BASELINE_BINS_MAX:
        raise TypeError("")
    if not all(_is_number(x) and math.isfinite(x) for v in numbers for x in v):
        raise TypeError("")
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError("edges must increase")
    if len(fractions) != len(edges) + 1:
        raise ValueError(f"{len(edges)} edges need {len(edges) + 1} fractions")
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-3:
        raise ValueError("fractions must be >= 0 and sum to 1")
    return tuple(float(x) for x in edges), tuple(float(x) for x in fractions)
