"""Writing values: json_tensor.cc's WriteDecimal and rapidjson's Writer.

Each element's JSON text as TF Serving writes its dtype, strings as rapidjson
escapes them, nested arrays in PrettyWriter's layout. Text is built as latin-1
``str`` (one char per byte) and encoded once.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from guard.dataplane.codec.restjson.numbers import _HALF29, _INF, _LOW29, _float32_of
from guard.dataplane.codec.restjson.shared import INDENT, Array


def _six_reads_back(flat: Array, six: list[str]) -> Array:
    """Whether each ``%.6g`` text reads back as the value (absl::SimpleAtof/SimpleAtod)."""
    back = np.array(six, dtype=np.float64)
    if flat.dtype == np.float64:
        same: Array = back == flat
        return same
    with np.errstate(over="ignore", invalid="ignore"):
        same = back.astype(np.float32) == flat
    # text -> double -> float32 can round differently from text -> float32 only
    # where the double is exactly halfway between two float32s: decide those exactly.
    halfway = (back.view(np.uint64) & _LOW29) == _HALF29
    for i in np.flatnonzero(halfway).tolist():
        same[i] = _float32_of(six[i]) == float(flat[i])
    return same


# Fewer values are read back one by one: numpy's fixed cost (an array of
# strings parsed, compared, checked for halfway) was 4 us for one value.
_FEW = 8


def _finite_text(x: float, six: str, six_reads_back: bool, digits: int) -> str:
    text = six if six_reads_back else format(x, f".{digits}g")  # max_digits10
    if "." not in text and "e" not in text:
        text += ".0"  # WriteDecimal marks whole numbers as decimals
    return text


def decimal_texts(values: Array) -> list[str]:
    """Each float as TF Serving writes it (float32 or float64, any shape, flattened).

    json_tensor.cc's WriteDecimal: ``absl::StrCat`` (``%.6g``) when that reads back
    as the same value, else ``%.9g`` (float) / ``%.17g`` (double); ``.0`` appended
    when the text has neither ``.`` nor ``e``; ``NaN``, ``Infinity``, ``-Infinity``.
    """
    if values.dtype not in (np.float32, np.float64):
        raise TypeError(f"not a float32/float64 array: {values.dtype}")
    digits = 9 if values.dtype == np.float32 else 17
    flat = values.ravel()
    xs = flat.tolist()
    six = [format(x, ".6g") for x in xs]  # absl's SixDigitsToBuffer is %.6g
    if len(xs) <= _FEW:
        read = _float32_of if values.dtype == np.float32 else float
        reads_back = [read(text) == x for text, x in zip(six, xs, strict=True)]
    else:
        reads_back = _six_reads_back(flat, six).tolist()
    out = []
    for x, text, ok in zip(xs, six, reads_back, strict=True):
        if x != x:
            out.append("NaN")
        elif x == _INF or x == -_INF:
            out.append("Infinity" if x > 0 else "-Infinity")
        else:
            out.append(_finite_text(x, text, ok, digits))
    return out


_ESCAPE = {c: f"\\u{c:04X}" for c in range(0x20)}
_ESCAPE.update({0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"})
_ESCAPE.update({0x22: '\\"', 0x5C: "\\\\"})


def json_string(raw: bytes | str) -> str:
    """A JSON string as rapidjson writes it: bytes kept, only ``"``, ``\\`` and
    control characters escaped (``\\u001F`` in upper case). Short ones are
    cached: what the guard writes on every response are the same few output
    names and labels; error messages and model strings mostly pass the bound."""
    if len(raw) <= _CACHED_CHARS_MAX:
        return _cached_json_string(raw)
    return _json_string(raw)


def _json_string(raw: bytes | str) -> str:
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw.encode().decode("latin-1")
    return '"' + text.translate(_ESCAPE) + '"'


# At most 1024 entries of 128 characters in (and 6 bytes out per character):
# under a megabyte whatever the strings are.
_CACHED_CHARS_MAX = 128
_cached_json_string = functools.lru_cache(maxsize=1024)(_json_string)


def _b64_object(raw: bytes, level: int) -> str:
    """``{"b64": ...}`` inside ``level`` open containers, in PrettyWriter's layout."""
    encoded = base64.b64encode(raw).decode("ascii")
    return "{\n" + INDENT * (level + 1) + '"b64": "' + encoded + '"\n' + INDENT * level + "}"


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def value_texts(values: Array, *, leaf_level: int = 0, as_b64: bool = False) -> list[str]:
    """The JSON text of each element (flattened), as json_tensor.cc writes its dtype.

    ``as_b64`` writes strings as ``{"b64": ...}`` (outputs whose name ends in
    ``_bytes``); ``leaf_level`` is the number of containers open around a value,
    which only the multi-line ``b64`` objects need.
    """
    kind = values.dtype.kind
    flat = values.ravel().tolist()
    if not flat:
        return []
    if kind == "f":
        return decimal_texts(values)
    if kind == "b":
        return ["true" if v else "false" for v in flat]
    if kind in "iu":
        return _int_texts(values, flat)
    write: Callable[[Any], str] = (
        functools.partial(_b64_value, level=leaf_level) if as_b64 else _string_value
    )
    texts = {v: write(v) for v in set(flat)}  # labels repeat: write each distinct one once
    return list(map(texts.__getitem__, flat))


def _int_texts(values: Array, flat: list[Any]) -> list[str]:
    """Integers as text; class indices (small, and repeated across a batch)
    from a table: ``str`` of each took 0.7 ms for a 1024 x 5 top-k."""
    if len(flat) < _INT_TABLE_FROM or values.min() < 0:
        return list(map(str, flat))
    top = int(values.max())
    if top >= _INT_TABLE_MAX:
        return list(map(str, flat))
    if top >= len(_INT_TEXTS):
        _INT_TEXTS.extend(map(str, range(len(_INT_TEXTS), top + 1)))
    return list(map(_INT_TEXTS.__getitem__, flat))


_INT_TABLE_FROM, _INT_TABLE_MAX = 64, 1 << 14
_INT_TEXTS: list[str] = []  # str(i), grown to the largest class index seen (under 1 MB)


def _string_value(value: Any) -> str:
    return json_string(_as_bytes(value))


def _b64_value(value: Any, level: int) -> str:
    return _b64_object(_as_bytes(value), level)


def _wrap(children: Sequence[str], level: int, single_line: bool) -> str:
    if single_line:
        return "[" + ", ".join(children) + "]"
    if not children:
        return "[]"
    inner = "\n" + INDENT * (level + 1)
    return "[" + inner + ("," + inner).join(children) + "\n" + INDENT * level + "]"


def nest_text(items: Sequence[str], shape: tuple[int, ...], level: int, single_line: bool) -> str:
    """Nested arrays of ``items`` (row-major) in PrettyWriter's layout.

    ``level`` counts the containers open around the outermost array. Row format
    writes each instance with ``kFormatSingleLineArray`` (``[1.0, 2.0]``),
    columnar format writes one value per line.
    """
    if not shape:
        return items[0]
    if len(shape) == 1:
        return _wrap(items, level, single_line)
    step = math.prod(shape[1:])
    children = [
        nest_text(items[i * step : (i + 1) * step], shape[1:], level + 1, single_line)
        for i in range(shape[0])
    ]
    return _wrap(children, level, single_line)
