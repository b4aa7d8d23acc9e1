"""TF Serving's REST predict responses, for the proxy: read in place, rewritten in place.

numpy only: no TensorFlow, no aiohttp, and no ``json.loads`` of a whole body.
tensorflow/serving writes these bodies in ``util/json_tensor.cc``
(``MakeJsonFromTensors``) with rapidjson's ``PrettyWriter``; this module reads
that text and writes new text the same way.

**Reading.** :func:`read_predict_response` takes the body and the format of the
request (``row``: ``"instances"`` in, ``"predictions"`` out; ``columnar``:
``"inputs"`` in, ``"outputs"`` out) and returns each output's values as a numpy
array, keeping the byte offsets of every number so that nothing of the original
text is lost. A response with one output does not name it (TF Serving drops the
name); its key is ``None``. A body that holds its output member twice (or
both ``predictions`` and ``outputs``), or names an output twice, is refused:
JSON readers differ on which one they take, and the guard cannot tell which
one its client reads.

**Which float dtype.** The body does not say; the signature does, and the proxy
does not have it here. json_tensor.cc's ``WriteDecimal`` writes a DT_FLOAT value
with at most 9 significant digits (``%.6g`` when that reads back as the same
float, else ``%.9g``), so its tokens are at most 15 characters long
(``-1.23456789e-05``); a DT_DOUBLE value needs up to 17 digits. A numeric output
is therefore read as **float32** when every token is at most 15 characters and
every value lies within float32's range, and as **float64** otherwise. float32
values are rounded from the text exactly as ``absl::SimpleAtof`` rounds them, so
they equal the model's own float32 output bit for bit. A DT_DOUBLE output whose
values all print in 6 digits (``0.1``, ``0.25``) reads as float32: its untouched
values keep their text anyway, and a value a rule changes is then written with
float32's digits. Outputs whose tokens are all integers read as int64; strings,
``{"b64": ...}`` objects and booleans read as object/bool arrays and are never
rewritten.

**Scanning.** The numbers of a tensor's text are scanned by numpy (the
reference), or by ``guard.dataplane._walk.scan_tensor`` when the caller passes
it (:data:`NumberScan`; the rule book's kernels do); with the native scan, a
body that holds one output's tensor and nothing else (TF Serving's answer for
a one-output model) is read by that one call. The native scan reads a
dense tensor's numbers and shape in one pass, the same values bit for bit,
rounded once by Clinger's fast path or ``strtod``; any text it does not read (an
odd token, an empty or ragged list) goes to numpy, which judges it
(tests/dataplane/test_restjson_native.py).

**Writing.** :meth:`RestPredictResponse.rewrite` returns the original bytes with
(i) only the values a rule changed replaced, each written as TF Serving writes
that dtype, and (ii) derived outputs inserted as text: next to the source output
where the response names its outputs, else under a top-level
``"guard_outputs"`` (one object per instance in row format, an object of arrays
in columnar format). Inserted text follows TF Serving's layout at that depth.
A derived float equal to a value of its instance takes that value's text. The
two loops over every element (that search, and joining each instance's
members) are done natively where the reader is given a :class:`TextWriter`
(the rule book's kernels do), as the Python loops here do them.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, cast

import numpy as np

from guard.dataplane.dtypes import FLOAT32 as _FLOAT32
from guard.dataplane.dtypes import FLOAT64 as _FLOAT64
from guard.dataplane.dtypes import INT64 as _INT64
from guard.dataplane.errors import shown

__all__ = [
    "GUARD_OUTPUTS_KEY",
    "Format",
    "NumberScan",
    "RequestPeekScan",
    "RestJsonError",
    "RestOutput",
    "RestPredictResponse",
    "NUMBER_BYTES",
    "Scanned",
    "TextWriter",
    "ValueSkip",
    "decimal_texts",
    "float32_values",
    "json_string",
    "numbers_at_most",
    "nest_text",
    "read_predict_response",
    "scan_single_output",
    "value_texts",
]

Array = np.ndarray[Any, Any]
Format = Literal["row", "columnar"]
OutputKey = str | None

GUARD_OUTPUTS_KEY = "guard_outputs"
"""Where derived outputs of an unnamed (single) output go, at the top level."""

INDENT = "    "
"""rapidjson PrettyWriter's default indent: four spaces per open container."""


class RestJsonError(ValueError):
    """The body is not a TF Serving predict response this module can read or extend."""


# ---------------------------------------------------------------------------
# Writing values: json_tensor.cc's WriteDecimal and rapidjson's Writer.
# Text is built as latin-1 ``str`` (one char per byte) and encoded once.

_F32 = struct.Struct("<f")
_INF = math.inf
_REUSE_LIMIT = 1 << 22  # derived values x source values per instance, compared at once
_LOW29, _HALF29 = np.uint64((1 << 29) - 1), np.uint64(1 << 28)  # a float32 midpoint's tail


def _float32_of(text: str) -> float:
    """``text`` rounded once, to the nearest float32 (as absl::SimpleAtof does)."""
    d = float(text)
    try:
        f: float = _F32.unpack(_F32.pack(d))[0]
    except OverflowError:
        return _INF if d > 0 else -_INF
    if f == d or math.isinf(f) or math.isnan(d):
        return f
    other = 2.0 * d - f  # the other float32 neighbour when d is their exact midpoint
    try:
        is_mid = _F32.unpack(_F32.pack(other))[0] == other
    except OverflowError:
        is_mid = False
    if not is_mid:
        return f
    # Rare (a double exactly halfway between two float32s), and fractions
    # pulls in decimal: imported here, it stays out of an idle guard's RSS.
    from fractions import Fraction

    exact = Fraction(text)
    if exact == Fraction(d):
        return f  # a true tie: pack already rounded half to even
    return max(f, other) if exact > Fraction(d) else min(f, other)


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


def _per_instance(flat: list[str], shape: tuple[int, ...], batch: int) -> list[str]:
    """Each instance's value text, single-line, from all elements' texts (rank >= 2)."""
    step = math.prod(shape)
    return [nest_text(flat[i * step : (i + 1) * step], shape, 3, True) for i in range(batch)]


_MEMBER = ",\n" + INDENT * 3  # before each member of an instance object, in row format

Texts = Callable[[str, Array, int], list[str]]
"""``(name, array, leaf_level) -> each element's JSON text``."""


def _plain_texts(name: str, array: Array, leaf_level: int) -> list[str]:
    return value_texts(array, leaf_level=leaf_level, as_b64=_is_bytes_name(name, array))


def _member_text(
    name: str, array: Array, level: int, single_line: bool, texts: Texts = _plain_texts
) -> str:
    """``"name": value`` as a member of an object whose own members sit at ``level``."""
    items = texts(name, array, level + array.ndim)
    return json_string(name) + ": " + nest_text(items, array.shape, level, single_line)


def _row_members(
    items: Sequence[tuple[str, Array]],
    batch: int,
    texts: Texts,
    prefix: str,
    writer: TextWriter | None = None,
) -> list[str]:
    """Per instance, ``prefix + '"name": value'`` of each item, joined: members of
    an instance object in row format (3 open containers: root, list, object).

    A large batch is written by one ``%`` of a template per instance: with a
    batch of a thousand, joining each member's text piece by piece took longer
    than reading the response. A small one is joined directly: for one instance
    the template's object arrays cost more than the rest of the rewrite.
    The native ``writer`` joins them as the small batch's loop does.
    """
    columns = [_row_column(name, array, batch, texts, prefix) for name, array in items]
    if writer is not None:
        joined = [(head, flat, math.prod(shape), bool(shape)) for head, flat, shape in columns]
        rows = writer.row_members(joined, batch)
        if rows is not None:
            return rows
    if batch <= _SMALL_BATCH:
        rows = [""] * batch
        for head, flat, shape in columns:
            size = math.prod(shape)
            for i in range(batch):
                values = flat[i * size : (i + 1) * size]
                rows[i] += head + (values[0] if not shape else "[" + ", ".join(values) + "]")
        return rows
    formats: list[str] = []
    cells: list[Array] = []
    for head, flat, shape in columns:
        size = math.prod(shape)
        value = "%s" if not shape else "[" + ", ".join(["%s"] * size) + "]"
        formats.append(head.replace("%", "%%") + value)
        column = np.empty(len(flat), dtype=object)
        column[:] = flat
        cells.append(column.reshape(batch, size))
    if not cells:
        return [""] * batch
    template = "".join(formats)
    return [template % tuple(row) for row in np.concatenate(cells, axis=1).tolist()]


_SMALL_BATCH = 8


def _row_column(
    name: str, array: Array, batch: int, texts: Texts, prefix: str
) -> tuple[str, list[str], tuple[int, ...]]:
    """One item's member head, its elements' texts, and each instance's shape
    (``()`` once an instance of rank >= 2 is written whole)."""
    array = np.asarray(array)
    if array.ndim == 0 or array.shape[0] != batch:
        raise RestJsonError(
            f"derived output '{name}' has shape {array.shape}; row format needs "
            f"{batch} instances on its first axis"
        )
    shape = array.shape[1:]
    flat = texts(name, array, 3 + len(shape))
    if len(shape) > 1:
        flat, shape = _per_instance(flat, shape, batch), ()
    return prefix + json_string(name) + ": ", flat, shape


def _is_bytes_name(name: str, array: Array) -> bool:
    return array.dtype.kind in "OSU" and name.endswith("_bytes")


# ---------------------------------------------------------------------------
# Reading numbers: every token of a numeric region at once, in numpy.

_W = 16  # bytes per token window (a float32 token has at most 15)
_SEP = 15
_U = np.uint64
_ONES, _HIGHS = _U(0x0101010101010101), _U(0x8080808080808080)
_TEN_PLUS = _U(0x7676767676767676)  # + per byte sets bit 7 exactly where the byte >= 10
_ELEVEN_PLUS = _U(0x7575757575757575)  # ... where the byte >= 11
_P10U = np.array([10**k for k in range(20)], dtype=np.uint64)
_P10U_DOT = np.array([2**63] + [10 ** (k + 1) for k in range(1, 17)], dtype=np.uint64)
_NINE_P10U = np.array([9 * 10**k for k in range(17)], dtype=np.uint64)
_MASK64 = (1 << 64) - 1
# Keep the bytes of a mantissa right-aligned in a 16-byte window, by bytes dropped.
_KEEP = np.array(
    [
        [_MASK64 ^ ((1 << 8 * min(d, 8)) - 1), _MASK64 ^ ((1 << 8 * max(d - 8, 0)) - 1)]
        for d in range(17)
    ],
    dtype=np.uint64,
)
_P10F = np.array([10.0**k for k in range(23)])
_NUMBER_CHARS = b"0123456789.-+eENaInfity"
_NUMBER_TOKEN = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|NaN|-?Infinity")
_FLOAT32_TOKEN_MAX = 15


def _code_table() -> bytes:
    table = bytearray([16]) * 256
    for i, c in enumerate(b"0123456789"):
        table[c] = i
    table[ord(".")], table[ord("-")], table[ord("+")] = 10, 11, 12
    table[ord("e")] = table[ord("E")] = 13
    for c in b"NaIfinty":
        table[c] = 14
    for c in b" \t\n\r,[]":
        table[c] = _SEP
    return bytes(table)


_CODES = _code_table()
_SKELETON_DELETE = _NUMBER_CHARS + b" \t\n\r"


@dataclass(slots=True)
class _Numbers:
    """The tokens of a numeric region: values and offsets relative to the region."""

    values: Array  # float64
    starts: Array
    ends: Array
    integral: bool  # every token is an integer literal
    ints: Array | None  # exact int64 values when integral and all fit
    single: Array | None | bool = False
    """The float32 values when the native scan made them (None: they do not fit
    float32); False where :func:`_as_float32` decides."""


def _swar8(v: Array) -> Array:
    """Eight digit bytes per word (most significant first, little-endian) -> their
    value, in place: large temporaries are what costs here (fresh pages)."""
    t = v >> _U(8)
    v *= _U(10)
    v += t
    v &= _U(0x00FF00FF00FF00FF)
    np.right_shift(v, _U(16), out=t)
    v *= _U(100)
    v += t
    v &= _U(0x0000FFFF0000FFFF)
    np.right_shift(v, _U(32), out=t)
    v *= _U(10000)
    v += t
    v &= _U(0xFFFFFFFF)
    return v


def _top_flag_byte(flags: Array) -> Array:
    """Index (0..7) of the byte whose bit 7 is the one bit set in each word.

    ``flags >> 7`` is ``256**j``; times 0x0706050403020100 it moves byte ``7 - j`` of
    that constant to the top. (Words with several bits set give garbage; callers
    reject those tokens.)
    """
    top = ((flags >> _U(7)) * _U(0x0706050403020100)) >> _U(56)
    out: Array = 7 - top.astype(np.int64)
    return out


def _token_bounds(codes: Array) -> tuple[Array, Array]:
    is_token = codes < _SEP
    edges = np.flatnonzero(is_token[1:] != is_token[:-1])
    edges += 1
    return edges[0::2], edges[1::2]


def _token_of(starts: Array, positions: Array) -> Array:
    out: Array = np.searchsorted(starts, positions, "right") - 1
    return out


@dataclass(slots=True)
class _Mantissa:
    value: Array  # uint64 digits without the dot
    frac: Array  # digits after the dot
    ok: Array  # the fast path read this token


def _mantissas(codes: Array, starts: Array, mant_end: Array, neg: Array) -> _Mantissa:
    """Each token's mantissa from a 16-byte window that ends where the mantissa ends.

    The window is two little-endian words; the bytes before the mantissa are
    masked off, the dot is found and zeroed in-word, and eight digits at a time
    become an integer (SWAR). ``ok`` is false where the token needs the slow path.
    Large arrays are updated in place where possible.
    """
    n = starts.size
    length = mant_end - starts
    length -= neg
    windows = np.ndarray((codes.size - _W + 1,), dtype="V16", buffer=codes, strides=(1,))
    words = windows[mant_end - _W].view(_U).reshape(n, 2)
    words &= np.take(_KEEP, np.clip(_W - length, 0, _W), axis=0)
    flags = words + _TEN_PLUS
    flags &= _HIGHS  # bit 7 of every byte >= 10: '.', or a sign
    signs = words + _ELEVEN_PLUS
    signs &= _HIGHS  # a byte >= 11 ('-', '+') is not JSON inside a mantissa
    signed = (signs[:, 0] | signs[:, 1]) != 0
    del signs
    in1 = flags[:, 1] != 0
    dot_flag = np.where(in1, flags[:, 1], flags[:, 0])
    has_dot = dot_flag != 0
    dot_col = _top_flag_byte(dot_flag) + (in1 << 3)
    frac = np.where(has_dot, np.clip(15 - dot_col, 0, 16), 0)
    count = np.bitwise_count(flags)
    flags >>= _U(7)
    flags *= _U(0xFF)
    words &= ~flags
    digits = _swar8(words)
    raw = digits[:, 0] * _U(10**8)
    raw += digits[:, 1]
    lead = raw // _P10U_DOT[frac]  # the digits before the dot, one place too high
    raw -= lead * _NINE_P10U[frac]
    ok = (count[:, 0] + count[:, 1] <= 1) & ~signed
    ok &= (length - 1).astype(_U) < _U(15) + has_dot  # 1..15 digits (+ the dot)
    ok &= ~has_dot | ((frac >= 1) & (dot_col > _W - length))  # a digit on both sides
    return _Mantissa(raw, frac, ok)


def _exponents(codes: Array, e_pos: Array, ends: Array) -> tuple[Array, Array]:
    """Value of each ``e[+-]d{1,3}`` suffix, and whether it was well formed."""
    length = ends - e_pos - 1
    windows = np.ndarray((codes.size - 4,), dtype="V4", buffer=codes, strides=(1,))
    chars = windows[e_pos + 1].view(np.uint8).reshape(-1, 4).astype(np.int64)
    signed = chars[:, 0] >= 11
    sign = np.where(chars[:, 0] == 11, -1, 1)
    ndigits = length - signed
    value = np.zeros(e_pos.size, np.int64)
    ok = (
        (ndigits >= 1)
        & (ndigits <= 3)
        & ((chars[:, 0] < 10) | (chars[:, 0] == 11) | (chars[:, 0] == 12))
    )
    for k in range(3):
        digit = np.take_along_axis(chars, (signed + k)[:, None], axis=1)[:, 0]
        inside = k < ndigits
        ok &= ~inside | (digit < 10)
        value = np.where(inside, value * 10 + digit, value)
    return sign * value, ok


def _slow_token(text: str) -> float | int:
    """A token the fast path did not read: an int where it may fit int64, else
    a float. An integer of more than 19 digits is past int64 and is read as a
    float (``inf`` beyond float64, as ``float()`` reads any length in linear
    time): ``int()`` refuses more than 4,300 digits, and ``float()`` of a big
    int overflows."""
    if _NUMBER_TOKEN.fullmatch(text) is None:
        raise RestJsonError(f"not a JSON number: {text[:40]!r}")
    if text in ("NaN", "Infinity", "-Infinity"):
        return float(text)
    if "." in text or "e" in text or "E" in text or len(text.lstrip("-")) > _INT64_DIGITS:
        return float(text)
    return int(text)


_INT64_DIGITS = 19  # int64's largest, 9223372036854775807, has 19 digits


_PAD = b" " * _W  # a numeric region is padded so every token has a full window around it


_CHUNK = 1 << 18  # bytes scanned at once: keeps numpy's temporaries small
_SEPARATORS = frozenset(b" \t\n\r,[]")
_SEPARATOR_RE = re.compile(rb"[ \t\n\r,\[\]]")


def _chunks(buffer: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """``buffer[start:end]`` in pieces of about 256 KiB cut between tokens, each
    padded with :data:`_PAD`, with the buffer offset of its first byte.

    With glibc's default malloc, megabyte-sized temporaries are handed back to the
    kernel after each numpy operation and fault in again, which costs more than the
    scan itself; small pieces keep every temporary small.
    """
    view, pieces = memoryview(buffer), []
    while start < end:
        stop = min(start + _CHUNK, end)
        if stop < end and buffer[stop] not in _SEPARATORS:
            # A token over the cut: a long one (a 10 MB number) is searched
            # past in C, where a byte-by-byte loop took most of a second.
            found = _SEPARATOR_RE.search(buffer, stop, end)
            stop = end if found is None else found.start()
        pieces.append((start, b"".join((_PAD, view[start:stop], _PAD))))
        start = stop
    return pieces


Scanned = tuple[
    bytearray, bytearray, bytearray, bool, bytearray | None, tuple[int, ...], int,
    bytearray | None, list[int] | None,
]  # fmt: skip
NumberScan = Callable[[bytes, int, int], Scanned | None]
"""A native scan of the tensor whose text starts at ``text[start]``
(``guard.dataplane._walk.scan_tensor``): ``(text, start, limit) -> (values,
starts, ends, integral, ints, shape, end, single, suspects)``, or None where it
leaves the text to the reference (:func:`_reference_output`)."""


class TextWriter(Protocol):
    """The two loops over every element of derived outputs, native
    (``guard.dataplane._walk``), done as the Python code here does them:
    :meth:`RestPredictResponse._reused_texts`' search and
    :func:`_row_members`' join."""

    def reuse_texts(
        self, body: bytes, starts: Array, ends: Array, pool: Array, derived: Array,
        batch: int, width: int, /,
    ) -> tuple[list[str | None], int]: ...  # fmt: skip

    def row_members(
        self, columns: Sequence[tuple[str, list[str], int, bool]], batch: int, /
    ) -> list[str] | None: ...


ValueSkip = Callable[[bytes, int], int]
"""Where the array or object at ``text[start]`` ends, its elements not read
(``guard.dataplane._walk.skip_value``): ``(text, start) -> end``, or -1 where
it does not close (:func:`_skip_value` is the reference)."""

RequestPeekScan = Callable[[bytes, int, int, int], tuple[str | None, int, bool, bool] | None]
"""A native peek at a predict request (``guard.dataplane._walk.peek_request``):
``(body, strings_max, key_bytes_max, signature_max) -> (signature, format
code, complete, exceeded)``, or None where it leaves the body to the Python
peek, the reference (``guard.server.rest.peek``)."""


def _scan_chunk(region: bytes) -> _Numbers:
    codes = np.frombuffer(region.translate(_CODES), np.uint8)
    starts, ends = _token_bounds(codes)
    n = starts.size
    if n == 0:
        empty = np.zeros(0, np.int64)
        return _Numbers(np.zeros(0), empty, empty, True, empty)
    neg = (codes[starts] == 11).astype(np.int64)
    mant_end, exponent, slow = ends.copy(), np.zeros(n, np.int64), np.zeros(n, bool)
    has_e = b"e" in region or b"E" in region
    if has_e:
        e_pos = np.flatnonzero(codes == 13)
        e_tok = _token_of(starts, e_pos)
        mant_end[e_tok] = e_pos
        value, ok = _exponents(codes, e_pos, ends[e_tok])
        exponent[e_tok] = value
        slow[e_tok[~ok]] = True
        slow[e_tok[np.r_[False, e_tok[1:] == e_tok[:-1]]]] = True
    letters = b"N" in region or b"I" in region
    if letters:
        slow[_token_of(starts, np.flatnonzero(codes == 14))] = True
    m = _mantissas(codes, starts, mant_end, neg)
    scale = exponent - m.frac
    fast = m.ok & ~slow & (np.abs(scale) <= 22)
    values = _scaled(m.value, scale, neg.astype(bool))
    integral = not has_e and not letters and not bool(m.frac.any())
    return _finish(region, values, starts - _W, ends - _W, fast, integral, m, neg)


def _scaled(mantissa: Array, scale: Array, neg: Array) -> Array:
    """mantissa * 10**scale, rounded once (exact mantissa and power: Clinger's fast path)."""
    values = mantissa.astype(np.float64)
    values /= _P10F[np.clip(-scale, 0, 22)]
    up = np.flatnonzero(scale > 0)
    if up.size:
        values[up] *= _P10F[np.clip(scale[up], 0, 22)]
    np.negative(values, out=values, where=neg)
    return values


def _finish(
    region: bytes,
    values: Array,
    starts: Array,
    ends: Array,
    fast: Array,
    integral: bool,
    m: _Mantissa,
    neg: Array,
) -> _Numbers:
    ints: Array | None = None
    if integral:
        ints = np.where(neg.astype(bool), -m.value.astype(np.int64), m.value.astype(np.int64))
    for i in np.flatnonzero(~fast).tolist():
        text = region[starts[i] + _W : ends[i] + _W]
        parsed = _slow_token(text.decode("ascii", "replace"))
        if isinstance(parsed, int):
            if ints is not None and -(2**63) <= parsed < 2**63:
                ints[i] = parsed
            else:
                ints = None
            values[i] = float(parsed)
        elif text.lstrip(b"-").isdigit():  # an integer past int64, read as a float
            ints = None
            values[i] = parsed
        else:
            integral, ints = False, None
            values[i] = parsed
    return _Numbers(values, starts, ends, integral, ints)


# ---------------------------------------------------------------------------
# Shapes: the brackets and commas left once the numbers are deleted.


def _skeleton_shape(skeleton: bytes) -> tuple[int, ...] | None:
    """The dense shape whose nested arrays print as ``skeleton`` (every dim > 0)."""
    rank = len(skeleton) - len(skeleton.lstrip(b"["))
    dims: list[int] = []
    for closed in range(1, rank + 1):
        end = skeleton.find(b"]" * closed)
        if end < 0:
            return None
        first = skeleton[rank - closed : end + closed]
        dims.append(first.count(b"]" * (closed - 1) + b",") + 1)
    shape = tuple(reversed(dims))
    return shape if _skeleton_of(shape) == skeleton else None


def _skeleton_of(shape: tuple[int, ...]) -> bytes:
    text = b""
    for size in reversed(shape):
        text = b"[" + b",".join([text] * size) + b"]"
    return text


# ---------------------------------------------------------------------------
# Structure: a small scanner for the few objects and arrays around the tensors.

_WS_RE = re.compile(rb"[ \t\n\r]*")
_WS_BYTES = frozenset(b" \t\n\r")
_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_PLAIN_KEY_RE = re.compile(rb'"[\x20-\x21\x23-\x5b\x5d-\x7e]*"')
_SCALAR_RE = re.compile(rb"[^ \t\n\r,\]}]+")
_SKIP_TOKEN_RE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}"]', re.S)
_CLOSES = {ord("]"): ord("["), ord("}"): ord("{")}
_SKIP_DEPTH = 512  # guard/dataplane/_walk.c's SKIP_DEPTH

# What the Python walk visits per response (objects, their members, arrays'
# elements outside numeric tensors): a TF Serving answer visits about one per
# instance and output; a hostile one with millions of tiny objects cost
# seconds of the event loop and gigabytes before this bound.
_VISITS_MAX = 1 << 16
# A non-numeric output (strings, b64, booleans) with more text than this is
# not read: no rule applies to it, and json.loads of short strings takes about
# 15 times the text's size in objects.
_GENERIC_READ_MAX = 1 << 20


def _skip_value(body: bytes, i: int) -> int:
    """One past the array or object opening at ``body[i]``: strings skipped,
    brackets matched by kind, at most 512 deep; -1 where it does not close
    (the reference of ``guard.dataplane._walk.skip_value``)."""
    if body[i : i + 1] not in (b"[", b"{"):
        return -1
    opened: list[int] = []
    for match in _SKIP_TOKEN_RE.finditer(body, i):
        token = match.group()
        if token[0] == 0x22:  # '"': a string, or one that does not close
            if len(token) == 1:
                return -1
            continue
        if token[0] in _CLOSES:
            if not opened or opened.pop() != _CLOSES[token[0]]:
                return -1
            if not opened:
                return match.end()
        elif len(opened) == _SKIP_DEPTH:
            return -1
        else:
            opened.append(token[0])
    return -1


@dataclass(slots=True)
class _Span:
    start: int
    end: int
    kind: str
    """object, array, numeric (an array holding numbers only), string or scalar."""
    scanned: Scanned | None = None
    """A numeric span's numbers, when the native scan found its end."""
    members: list[_Member] | None = None
    """An object's members, read once."""


@dataclass(slots=True)
class _Member:
    key: str
    value: _Span


class _Scanner:
    """Finds values' spans; arrays of numbers are skipped without looking inside,
    or read by the native scan when there is one (then read once); other
    arrays are skipped whole (natively with ``skip``). At most
    ``_VISITS_MAX`` values are visited one by one."""

    def __init__(
        self, body: bytes, native: NumberScan | None = None, skip: ValueSkip | None = None
    ) -> None:
        self.body = body
        self.native = native
        self.skip = skip
        self.visits = 0

    def visit(self) -> None:
        self.visits += 1
        if self.visits > _VISITS_MAX:
            raise RestJsonError(
                f"it holds more than {_VISITS_MAX} objects, members and elements outside "
                "numeric tensors, the most the guard reads (a TF Serving answer has about "
                "one per instance and output); send smaller batches"
            )

    def ws(self, i: int) -> int:
        if i < len(self.body) and self.body[i] not in _WS_BYTES:
            return i  # most values follow their separator directly
        match = _WS_RE.match(self.body, i)
        assert match is not None  # the pattern matches the empty string
        return match.end()

    def expect(self, i: int, char: bytes) -> int:
        i = self.ws(i)
        if self.body[i : i + 1] != char:
            raise RestJsonError(f"expected {char.decode()!r} at offset {i}")
        return i + 1

    def value(self, i: int) -> _Span:
        self.visit()
        i = self.ws(i)
        head = self.body[i : i + 1]
        if head == b"{":
            found = self.members(i)
            end = found[-1].value.end if found else self.ws(i + 1)
            return _Span(i, self.expect(end, b"}"), "object", members=found)
        if head == b"[":
            return self._array(i)
        if head == b'"':
            return _Span(i, self.string_end(i), "string")
        match = _SCALAR_RE.match(self.body, i)
        if match is None:
            raise RestJsonError(f"expected a value at offset {i}")
        return _Span(i, match.end(), "scalar")

    def _array(self, i: int) -> _Span:
        scanned = self.native(self.body, i, len(self.body)) if self.native else None
        if scanned is not None:
            return _Span(i, scanned[6], "numeric", scanned)
        if self.skip is not None:  # one native pass finds its end either way
            end = self.container_end(i)
            return _Span(i, end, "numeric" if end <= self._stop(i) else "array")
        end = self.numeric_end(i)
        if end >= 0:
            return _Span(i, end, "numeric")
        return _Span(i, self.container_end(i), "array")

    def string_end(self, i: int) -> int:
        match = _STRING_RE.match(self.body, i)
        if match is None:
            raise RestJsonError(f"unterminated string at offset {i}")
        return match.end()

    def numeric_end(self, i: int) -> int:
        """End of the array at ``i`` when it holds only numbers (and arrays of them).

        Only called where the array is an object member's value: after it come a
        comma and a key string, or ``}``. So the run of bytes up to the next
        ``"``/``{``/``}`` holds this array and nothing else with brackets.
        """
        body, stop = self.body, self._stop(i)
        end = body.rfind(b"]", i, stop) + 1
        return end if end > i and _one_array(body, i, end) else -1

    def _stop(self, i: int) -> int:
        """The first ``"``, ``{`` or ``}`` from ``i``: an array that ends before
        it holds only numbers and arrays of them."""
        body = self.body
        stops = [p for p in (body.find(b'"', i), body.find(b"{", i), body.find(b"}", i)) if p >= 0]
        return min(stops) if stops else len(body)

    def members(self, i: int) -> list[_Member]:
        out: list[_Member] = []
        i = self.expect(i, b"{")
        if self.body[self.ws(i) : self.ws(i) + 1] == b"}":
            return out
        while True:
            key_start = self.ws(i)
            key_end = self.string_end(key_start)
            key = _decode_key(self.body[key_start:key_end])
            span = self.value(self.expect(key_end, b":"))
            out.append(_Member(key, span))
            i = self.ws(span.end)
            if self.body[i : i + 1] == b"}":
                return out
            i = self.expect(i, b",")

    def members_of(self, span: _Span) -> list[_Member]:
        return span.members if span.members is not None else self.members(span.start)

    def container_end(self, i: int) -> int:
        """End of the array or object at ``i``, its elements not visited."""
        end = self.skip(self.body, i) if self.skip is not None else _skip_value(self.body, i)
        if end < 0:
            raise RestJsonError(
                f"the value at offset {i} does not close, or nests deeper than {_SKIP_DEPTH}"
            )
        return end

    def elements(self, i: int) -> list[_Span]:
        out: list[_Span] = []
        i = self.expect(i, b"[")
        if self.body[self.ws(i) : self.ws(i) + 1] == b"]":
            return out
        while True:
            span = self.element(i)
            out.append(span)
            i = self.ws(span.end)
            if self.body[i : i + 1] == b"]":
                return out
            i = self.expect(i, b",")

    def element(self, i: int) -> _Span:
        """An array element: like :meth:`value`, without the numeric shortcut."""
        i = self.ws(i)
        if self.body[i : i + 1] == b"[":
            self.visit()
            return _Span(i, self.container_end(i), "array")
        return self.value(i)

    def first_element(self, i: int) -> _Span | None:
        """The first element of the array at ``i`` (None: it is empty)."""
        i = self.expect(i, b"[")
        return None if self.body[self.ws(i) : self.ws(i) + 1] == b"]" else self.element(i)


def _one_array(body: bytes, start: int, end: int) -> bool:
    """Whether the brackets of ``body[start:end]`` nest as one array (``[a],[b]``
    holds two, and ``[[a]`` none)."""
    region = np.frombuffer(body, np.uint8, count=end - start, offset=start)
    brackets = region[np.flatnonzero((region == 0x5B) | (region == 0x5D))]
    depth = np.cumsum(np.where(brackets == 0x5B, 1, -1))
    return bool(depth[-1] == 0 and (depth[:-1] > 0).all())


def _decode_key(token: bytes) -> str:
    if _PLAIN_KEY_RE.fullmatch(token):
        return token[1:-1].decode("ascii")  # no escapes: json.loads would give the same
    try:
        key = json.loads(token)
    except ValueError as exc:
        raise RestJsonError(f"bad object key {token[:40]!r}") from exc
    if not isinstance(key, str):
        raise RestJsonError(f"bad object key {token[:40]!r}")
    return key


# ---------------------------------------------------------------------------
# Outputs.


class RestOutput(NamedTuple):
    """One output of a REST predict response."""

    name: str | None
    """The output's alias, or ``None`` when the response does not name it (one output)."""
    values: Array
    """float32/float64/int64 for numbers, bool, or an object array (str, or bytes for b64)."""
    kind: str
    """``float32``, ``float64``, ``int``, ``bool``, ``string``, ``bytes`` or ``other``;
    ``unread`` for a non-numeric output of more than 1 MiB of text, whose
    values (empty here) are not read: no rule applies to them."""

    @property
    def numeric(self) -> bool:
        return self.kind in ("float32", "float64", "int")


@dataclass(slots=True)
class _Where:
    """Where an output's text is: token offsets, and where derived text goes."""

    starts: Array | None  # absolute offset of every value's token (numeric outputs)
    ends: Array | None
    after: list[int] = field(default_factory=list)  # insertion points (named outputs)


@dataclass(slots=True)
class _Source:
    """The text an output's numbers are scanned from, and how to map its offsets
    back to the body: one span of the body, or instance spans joined as ``[a,b]``."""

    buffer: bytes
    start: int
    end: int
    region_at: Array | None  # where each joined segment starts in ``buffer`` (None: the body)
    body_at: Array | None  # ... and in the body

    @classmethod
    def of(cls, body: bytes, spans: Sequence[_Span], batched: bool) -> _Source:
        if not batched:
            return cls(body, spans[0].start, spans[0].end, None, None)
        view = memoryview(body)
        pieces = [view[s.start : s.end] for s in spans]
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        region_at = 1 + np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
        buffer = b"[" + b",".join(pieces) + b"]"
        body_at = np.array([s.start for s in spans], dtype=np.int64)
        return cls(buffer, 0, len(buffer), region_at, body_at)

    def to_body(self, offsets: Array) -> Array:
        if self.region_at is None or self.body_at is None:
            return offsets  # the buffer is the body
        piece = np.searchsorted(self.region_at, offsets, "right") - 1
        out: Array = self.body_at[piece] + (offsets - self.region_at[piece])
        return out


@dataclass(slots=True)
class _Part:
    """One chunk's numbers, with offsets already in the body."""

    numbers: _Numbers
    chunk: bytes
    pad: int  # where ``numbers``' offset 0 lies in ``chunk``
    starts: Array  # offsets in the body
    ends: Array


def _numeric_output(
    body: bytes, spans: Sequence[_Span], batched: bool, native: NumberScan | None
) -> tuple[Array, str, Array, Array] | None:
    """The tensor, its kind and every token's body offsets; None if not numeric.
    ``batched``: each span is one instance's value. The native scan reads what
    it can; the reference, the rest."""
    if native is not None:
        found = _native_output(body, spans, batched, native)
        if found is not None:
            return found
    return _reference_output(_Source.of(body, spans, batched))


def _native_output(
    body: bytes, spans: Sequence[_Span], batched: bool, native: NumberScan
) -> tuple[Array, str, Array, Array] | None:
    scans = [span.scanned or native(body, span.start, span.end) for span in spans]
    if not scans or any(
        s is None or s[6] != span.end for s, span in zip(scans, spans, strict=True)
    ):
        return None
    shapes = {s[5] for s in scans if s is not None}
    if len(shapes) != 1:
        return None
    parts = [_native_part(body, s) for s in scans if s is not None]
    values, kind = _typed(parts)
    shape = ((len(spans),) if batched else ()) + shapes.pop()
    starts = parts[0].starts if len(parts) == 1 else np.concatenate([p.starts for p in parts])
    ends = parts[0].ends if len(parts) == 1 else np.concatenate([p.ends for p in parts])
    return values.reshape(shape), kind, starts, ends


def _native_part(body: bytes, scanned: Scanned) -> _Part:
    values, starts, ends, integral, ints, _, _, single, suspects = scanned
    numbers = _Numbers(
        np.frombuffer(values, _FLOAT64),
        np.frombuffer(starts, _INT64),
        np.frombuffer(ends, _INT64),
        integral,
        None if ints is None else np.frombuffer(ints, _INT64),
        None if single is None else np.frombuffer(single, _FLOAT32),
    )
    if isinstance(numbers.single, np.ndarray):
        for i in suspects or ():
            text = body[numbers.starts[i] : numbers.ends[i]].decode("ascii")
            numbers.single[i] = _float32_of(text)
    return _Part(numbers, body, 0, numbers.starts, numbers.ends)


def _reference_output(source: _Source) -> tuple[Array, str, Array, Array] | None:
    parts: list[_Part] = []
    skeletons: list[bytes] = []
    for at, chunk in _chunks(source.buffer, source.start, source.end):
        skeleton = chunk.translate(None, _SKELETON_DELETE)
        if skeleton.strip(b"[],"):
            return None
        skeletons.append(skeleton)
        numbers = _scan_chunk(chunk)
        starts = source.to_body(numbers.starts + at)
        parts.append(_Part(numbers, chunk, _W, starts, starts + (numbers.ends - numbers.starts)))
    count = sum(p.numbers.values.size for p in parts)
    shape = _skeleton_shape(b"".join(skeletons)) if count else None
    if shape is None or math.prod(shape) != count:
        if count:
            raise RestJsonError("the numbers do not form a dense tensor")
        return None  # an empty tensor: the generic reader finds its shape
    values, kind = _typed(parts)
    starts = np.concatenate([p.starts for p in parts])
    ends = np.concatenate([p.ends for p in parts])
    return values.reshape(shape), kind, starts, ends


def _typed(parts: list[_Part]) -> tuple[Array, str]:
    """int64 when every token is an integer; float32 when every token could be a
    DT_FLOAT's (<= 15 characters, within float32's range); else float64."""
    numbers = [p.numbers for p in parts]
    if all(n.integral and n.ints is not None for n in numbers):
        return _joined([n.ints for n in numbers if n.ints is not None]), "int"
    singles = []
    for part in parts:
        single = _single(part)
        if single is None:
            return _joined([n.values for n in numbers]), "float64"
        singles.append(single)
    return _joined(singles), "float32"


def _joined(arrays: list[Array]) -> Array:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _single(part: _Part) -> Array | None:
    numbers = part.numbers
    if not isinstance(numbers.single, bool):
        return numbers.single
    if numbers.ends.size and int((numbers.ends - numbers.starts).max()) > _FLOAT32_TOKEN_MAX:
        return None
    return _as_float32(numbers, part.chunk, part.pad)


def _as_float32(numbers: _Numbers, chunk: bytes, pad: int) -> Array | None:
    """The chunk's values as float32, rounded from the text exactly as
    absl::SimpleAtof does; None when a value does not fit float32."""
    values = numbers.values
    with np.errstate(over="ignore"):
        single = values.astype(np.float32)
    lost = (np.isfinite(values) & ~np.isfinite(single)) | ((single == 0) & (values != 0))
    if lost.any():
        return None
    # Text -> double -> float32 can differ from text -> float32 only where the double
    # is exactly halfway between two float32s (or in float32's subnormal range).
    suspect = ((values.view(_U) & _LOW29) == _HALF29) & np.isfinite(values)
    suspect |= (np.abs(values) < 2.0**-126) & (values != 0)
    for i in np.flatnonzero(suspect).tolist():
        text = chunk[numbers.starts[i] + pad : numbers.ends[i] + pad].decode("ascii")
        single[i] = _float32_of(text)
    return single


def _generic_output(body: bytes, span: _Span) -> tuple[Array, str]:
    """Strings, b64 objects, booleans (and empty tensors), read with json.loads."""
    try:
        value = json.loads(body[span.start : span.end])
    except ValueError as exc:
        raise RestJsonError(f"bad output value at offset {span.start}: {exc}") from exc
    return _from_python(value)


def _leaf(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        try:
            return base64.b64decode(value["b64"])
        except ValueError as exc:  # binascii.Error; TF Serving writes valid base64
            raise RestJsonError(f'bad base64 in {{"b64": ...}}: {exc}') from None
    return value


def _from_python(value: Any) -> tuple[Array, str]:
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        probe = probe[0] if probe else None
    flat: list[Any] = []
    _flatten(value, len(shape), flat)
    leaves = [_leaf(v) for v in flat]
    if len(leaves) != math.prod(shape):
        raise RestJsonError("the values do not form a dense tensor")
    kinds = {type(v) for v in leaves}
    if not leaves:
        return np.zeros(tuple(shape), np.float32), "float32"
    if kinds == {bool}:
        return np.array(leaves, dtype=bool).reshape(shape), "bool"
    array = np.empty(len(leaves), dtype=object)
    array[:] = leaves
    kind = "bytes" if kinds == {bytes} else "string" if kinds == {str} else "other"
    return array.reshape(shape), kind


def _flatten(value: Any, depth: int, out: list[Any]) -> None:
    if depth == 0:
        out.append(value)
        return
    if not isinstance(value, list):
        raise RestJsonError("the values do not form a dense tensor")
    for item in value:
        _flatten(item, depth - 1, out)


# ---------------------------------------------------------------------------
# The response.


@dataclass(slots=True)
class RestPredictResponse:
    """A REST predict response, read; :meth:`rewrite` makes the guarded body."""

    body: bytes
    format: Format
    outputs: dict[OutputKey, RestOutput]
    _where: dict[OutputKey, _Where]
    _root_after: int
    _root_keys: set[str]
    _names_per_instance: list[set[str]]
    writer: TextWriter | None = None
    """Writes derived outputs' text natively (None: Python does)."""

    @property
    def unnamed(self) -> bool:
        """The response has one output and does not name it."""
        return None in self.outputs

    @property
    def guard_outputs_taken(self) -> bool:
        """The upstream's answer has a top-level ``"guard_outputs"`` member of its
        own: the outputs derived from an unnamed output cannot be written, and
        :meth:`rewrite` refuses to. Where none is derived, it passes as it came."""
        return GUARD_OUTPUTS_KEY in self._root_keys

    def rewrite(
        self,
        changed: Mapping[OutputKey, Array] | None = None,
        derived: Mapping[OutputKey, Sequence[tuple[str, Array]]] | None = None,
        guard_outputs: str | None = None,
    ) -> bytes:
        """The body with ``changed`` values rewritten and ``derived`` outputs inserted.

        ``changed`` maps an output to its new values (same shape); only elements
        whose value differs are rewritten. ``derived`` maps a source output to its
        ``(name, array)`` pairs; in row format each array's first axis is the batch.
        ``guard_outputs`` is a ``"guard_outputs"`` member's text already made by
        :meth:`guard_outputs_text`, in place of ``derived[None]``.
        """
        edits: list[tuple[int, int, str]] = []
        for key, new in (changed or {}).items():
            edits.extend(self._value_edits(key, new))
        unnamed: list[tuple[str, Array]] = []
        for key, items in (derived or {}).items():
            self._output(key)
            if key is None:
                unnamed.extend(items)
            else:
                edits.extend(self._derived_edits(key, items))
        if unnamed:
            guard_outputs = self.guard_outputs_text(unnamed)
        if guard_outputs is not None:
            if self.guard_outputs_taken:
                raise RestJsonError(
                    f"the upstream's answer already has a top-level '{GUARD_OUTPUTS_KEY}' "
                    "member, where the guard writes the outputs it derives, and a second one "
                    "would leave the client to pick one of the two; TF Serving never writes "
                    "it: remove it upstream, or derive nothing from this output (no "
                    "threshold, argmax, top_k or labels)"
                )
            edits.append((self._root_after, self._root_after, guard_outputs))
        return _apply(self.body, edits)

    def _output(self, key: OutputKey) -> RestOutput:
        try:
            return self.outputs[key]
        except KeyError:
            raise RestJsonError(f"the response has no output {key!r}") from None

    def _value_edits(self, key: OutputKey, new: Array) -> list[tuple[int, int, str]]:
        out, where = self._output(key), self._where[key]
        if not out.numeric or where.starts is None or where.ends is None:
            raise RestJsonError(f"output {key!r} is not numeric; its values cannot be rewritten")
        new = np.asarray(new)
        if new.shape != out.values.shape:
            raise RestJsonError(f"output {key!r}: new shape {new.shape} != {out.values.shape}")
        new = new.astype(out.values.dtype, copy=False)
        index = np.flatnonzero(_differs(out.values, new))
        texts = value_texts(new.ravel()[index])
        starts, ends = where.starts[index].tolist(), where.ends[index].tolist()
        return list(zip(starts, ends, texts, strict=True))

    def _derived_edits(
        self, key: str, items: Sequence[tuple[str, Array]]
    ) -> list[tuple[int, int, str]]:
        where = self._where[key]
        if self.format == "columnar":
            self._check_free([{k for k in self.outputs if k is not None}], items)
            texts = self._texts_from(key)
            text = "".join(
                ",\n" + INDENT * 2 + _member_text(n, a, 2, False, texts) for n, a in items
            )
            return [(where.after[0], where.after[0], text)]
        self._check_free(self._names_per_instance, items)
        texts = self._texts_from(key)
        members = _row_members(items, len(where.after), texts, _MEMBER, self.writer)
        return [
            (position, position, row) for position, row in zip(where.after, members, strict=True)
        ]

    def guard_outputs_text(self, items: Sequence[tuple[str, Array]]) -> str:
        """The root's ``"guard_outputs"`` member, with its leading comma: the
        outputs derived from the one unnamed output. Where no item is floating
        point (whose texts are the body's own), it depends on the format and
        the items alone, so the same items give the same text."""
        self._output(None)
        _check_unique(items)
        if self.format == "columnar":
            texts = self._texts_from(None)
            members = ["\n" + INDENT * 2 + _member_text(n, a, 2, False, texts) for n, a in items]
            value = "{" + ",".join(members) + "\n" + INDENT + "}"
        else:
            value = self._instance_objects(items)
        return ",\n" + INDENT + json_string(GUARD_OUTPUTS_KEY) + ": " + value

    def _instance_objects(self, items: Sequence[tuple[str, Array]]) -> str:
        values = self._output(None).values
        batch = values.shape[0] if values.ndim else 0
        close = "\n" + INDENT * 2 + "}"
        objects = [
            "{" + row[1:] + close
            for row in _row_members(items, batch, self._texts_from(None), _MEMBER, self.writer)
        ]
        if not objects:
            return "[]"
        inner = "\n" + INDENT * 2
        return "[" + inner + ("," + inner).join(objects) + "\n" + INDENT + "]"

    def _texts_from(self, source: OutputKey) -> Texts:
        """Element texts for outputs derived from ``source``: a float equal (bit for
        bit) to a value in the same instance of the source reuses that value's text,
        which is how TF Serving wrote that float; anything else is formatted."""

        def texts(name: str, array: Array, leaf_level: int) -> list[str]:
            reused = self._reused_texts(source, np.asarray(array))
            return reused if reused is not None else _plain_texts(name, array, leaf_level)

        return texts

    def _reused_texts(self, source: OutputKey, array: Array) -> list[str] | None:
        out, where = self.outputs[source], self._where[source]
        values = out.values
        if (
            where.starts is None
            or where.ends is None
            or array.dtype != values.dtype
            or array.dtype.kind != "f"
            or array.ndim == 0
            or values.ndim == 0
            or array.shape[0] != values.shape[0]
        ):
            return None
        batch = values.shape[0]
        derived, pool = array.reshape(batch, -1), values.reshape(batch, -1)
        if derived.size * pool.shape[1] > _REUSE_LIMIT:
            return None
        if self.writer is not None and derived.size and pool.size:
            return self._native_reused(where, derived, pool)
        bits = np.dtype(f"u{values.dtype.itemsize}")
        equal = derived.view(bits)[:, :, None] == pool.view(bits)[:, None, :]
        column = equal.argmax(axis=2)
        found = np.take_along_axis(equal, column[:, :, None], axis=2).ravel()
        token = (np.arange(batch)[:, None] * pool.shape[1] + column).ravel()
        texts = _token_texts(self.body, where.starts[token], where.ends[token])
        missing = np.flatnonzero(~found)
        for i, text in zip(missing.tolist(), decimal_texts(derived.ravel()[missing]), strict=True):
            texts[i] = text
        return texts

    def _native_reused(self, where: _Where, derived: Array, pool: Array) -> list[str]:
        """:meth:`_reused_texts`' answer, searched natively."""
        assert self.writer is not None and where.starts is not None and where.ends is not None
        found, missing = self.writer.reuse_texts(
            self.body,
            np.ascontiguousarray(where.starts, _INT64),
            np.ascontiguousarray(where.ends, _INT64),
            np.ascontiguousarray(pool),
            np.ascontiguousarray(derived),
            pool.shape[0],
            pool.itemsize,
        )
        if missing:
            absent = [i for i, text in enumerate(found) if text is None]
            for i, text in zip(absent, decimal_texts(derived.ravel()[absent]), strict=True):
                found[i] = text
        return cast(list[str], found)  # no None is left

    @staticmethod
    def _check_free(taken: list[set[str]], items: Sequence[tuple[str, Array]]) -> None:
        _check_unique(items)
        for name, _ in items:
            if any(name in names for names in taken):
                raise RestJsonError(f"derived output '{name}' would replace an output")


def _token_texts(body: bytes, starts: Array, ends: Array) -> list[str]:
    """The text of each number token ``body[start:end]``. Sliced one by one:
    gathering them through a numpy byte grid took twice as long (1024x6 tokens)."""
    return [
        body[s:e].decode("latin-1") for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


def _check_unique(items: Sequence[tuple[str, Array]]) -> None:
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise RestJsonError(f"derived outputs named twice: {sorted(names)}")


def _differs(old: Array, new: Array) -> Array:
    if old.dtype.kind == "f":
        bits = np.dtype(f"u{old.dtype.itemsize}")
        differ: Array = old.view(bits) != new.view(bits)  # NaN == NaN, -0.0 != 0.0
        return differ
    out: Array = old != new
    return out


def _apply(body: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    if not edits:
        return body
    edits.sort(key=lambda e: (e[0], e[1]))
    pieces: list[bytes] = []
    at = 0
    for start, end, text in edits:
        pieces.append(body[at:start])
        pieces.append(text.encode("latin-1"))
        at = end
    pieces.append(body[at:])
    return b"".join(pieces)


# ---------------------------------------------------------------------------
# Reading a whole response.


def read_predict_response(
    body: bytes,
    fmt: Format,
    native: NumberScan | None = None,
    single: Scanned | None = None,
    writer: TextWriter | None = None,
    skip: ValueSkip | None = None,
) -> RestPredictResponse:
    """Read a TF Serving REST predict response (see the module docstring).
    ``native`` scans the numbers (:data:`NumberScan`); without it, numpy does.
    ``single`` is the body's :func:`scan_single_output`, where the caller has it.
    ``writer`` is the response's :class:`TextWriter` (None: Python writes).
    ``skip`` finds where non-numeric arrays end (:data:`ValueSkip`; None: Python)."""
    if single is None and native is not None:
        single = scan_single_output(body, fmt, native)
    if single is not None:
        return _single_output(body, fmt, single, writer)
    scanner = _Scanner(body, native, skip)
    start = scanner.ws(0)
    root = scanner.members(start)
    member = _root_member(root, _ROOT_KEYS[fmt])
    reader = _Reader(body, scanner, native)
    if fmt == "row":
        reader.row(member.value)
    else:
        reader.columnar(member.value)
    return RestPredictResponse(
        body,
        fmt,
        reader.outputs,
        reader.where,
        root[-1].value.end,
        {m.key for m in root},
        reader.names_per_instance,
        writer,
    )


_ROOT_KEYS: dict[str, str] = {"row": "predictions", "columnar": "outputs"}
_UNTOLD = (
    "JSON readers differ on which one they take (json.loads and JSON.parse the last, "
    "rapidjson the first), so the guard cannot tell which one the client reads"
)


def _root_member(root: list[_Member], key: str) -> _Member:
    """The root's ``key`` member, the only output member: TF Serving writes
    ``predictions`` or ``outputs``, once. A second one would pass unchecked."""
    found = [m for m in root if m.key in _OUTPUT_MEMBERS]
    if len(found) > 1:
        first, second = found[0].key, found[1].key
        held = f"'{first}' twice" if first == second else f"both '{first}' and '{second}'"
        raise RestJsonError(
            f"it holds {held}; {_UNTOLD}; TF Serving writes one of them, once: fix the upstream"
        )
    if not found or found[0].key != key:
        raise RestJsonError(f"no '{key}' member in the response")
    return found[0]


_OUTPUT_MEMBERS = frozenset(_ROOT_KEYS.values())


def _check_names_once(names: Sequence[str], where: str) -> None:
    """An output named twice: a reader may take either value (:data:`_UNTOLD`)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise RestJsonError(
                f"output '{shown(name)}' is named twice {where}; {_UNTOLD}; "
                "TF Serving names each output once: fix the upstream"
            )
        seen.add(name)


_SINGLE_HEAD = {
    fmt: re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"' + key.encode() + rb'"[ \t\n\r]*:[ \t\n\r]*\[')
    for fmt, key in _ROOT_KEYS.items()
}
_ROOT_TAIL = re.compile(rb"[ \t\n\r]*\}[ \t\n\r]*\Z")


NUMBER_BYTES = 32
"""What reading one number from text holds while the response is guarded:
its value, its text's start and end, and its integer (8 bytes each)."""


def numbers_at_most(body: bytes, enough: int) -> int:
    """An upper bound on the numbers in a JSON text (every number follows a
    ``[``, ``,`` or ``:``): the count of those where it is at most ``enough``,
    else of the tokens that start like a number right after one, outside
    strings (the reference of ``guard.dataplane._walk.numbers_at_most``)."""
    heads = body.count(b"[") + body.count(b",") + body.count(b":")
    if heads <= enough:
        return heads
    return sum(1 for m in _NUMBER_START_RE.finditer(body) if m.group()[0] != 0x22)


_NUMBER_START_RE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[,:][ \t\n\r]*[-0-9NI]', re.S)


def scan_single_output(body: bytes, fmt: Format, native: NumberScan) -> Scanned | None:
    """TF Serving's answer with one output (a root holding only that output's
    dense numeric tensor), scanned natively; ``None`` for any other body,
    which the general reader reads. Its values are float32 as written where
    the scan's ``single`` (index 7) is set and nothing was integral or
    suspect (:func:`float32_values`)."""
    head = _SINGLE_HEAD[fmt].match(body)
    if head is None:
        return None
    scanned = native(body, head.end() - 1, len(body))
    if scanned is None or _ROOT_TAIL.match(body, scanned[6]) is None:
        return None
    return scanned


def float32_values(scanned: Scanned) -> bytearray | None:
    """A single output's values as float32 (native byte order), where every
    token was read as a float32 exactly as written; else ``None``."""
    single = scanned[7]
    return None if scanned[3] or scanned[8] else single


def _single_output(
    body: bytes, fmt: Format, scanned: Scanned, writer: TextWriter | None = None
) -> RestPredictResponse:
    """The response of a body :func:`scan_single_output` read. A shortcut
    only: it is what the general reader returns
    (tests/dataplane/test_restjson_native.py)."""
    _, starts, ends, _, _, shape, end, _, _ = scanned
    single = float32_values(scanned)
    if single is None:
        part = _native_part(body, scanned)
        values, kind = _typed([part])
        where = _Where(part.starts, part.ends, [])
    else:  # float32 tokens, each read as float32 already: _typed's answer, made directly
        values, kind = np.frombuffer(single, _FLOAT32), "float32"
        where = _Where(np.frombuffer(starts, _INT64), np.frombuffer(ends, _INT64), [])
    return RestPredictResponse(
        body, fmt, {None: RestOutput(None, values.reshape(shape), kind)}, {None: where}, end,
        {_ROOT_KEYS[fmt]}, [], writer,
    )  # fmt: skip


class _Reader:
    def __init__(self, body: bytes, scanner: _Scanner, native: NumberScan | None) -> None:
        self.body = body
        self.scanner = scanner
        self.native = native
        self.outputs: dict[OutputKey, RestOutput] = {}
        self.where: dict[OutputKey, _Where] = {}
        self.names_per_instance: list[set[str]] = []

    def add(self, key: OutputKey, spans: Sequence[_Span], batched: bool, after: list[int]) -> None:
        numeric = None
        if _may_be_numeric(spans):
            numeric = _numeric_output(self.body, spans, batched, self.native)
        if numeric is None and sum(s.end - s.start for s in spans) > _GENERIC_READ_MAX:
            values, kind = np.empty(0, object), "unread"
            where = _Where(None, None, after)
        elif numeric is None:
            values, kind = self._generic(spans, batched)
            where = _Where(None, None, after)
        else:
            values, kind, starts, ends = numeric
            where = _Where(starts, ends, after)
        self.outputs[key] = RestOutput(key, values, kind)
        self.where[key] = where

    def _generic(self, spans: Sequence[_Span], batched: bool) -> tuple[Array, str]:
        if not batched:
            return _generic_output(self.body, spans[0])
        parts = [_generic_output(self.body, s) for s in spans]
        if not parts:
            return np.zeros(0, np.float32), "float32"
        kinds = {k for _, k in parts}
        stacked = np.stack([v for v, _ in parts]) if len({v.shape for v, _ in parts}) == 1 else None
        if stacked is None:
            raise RestJsonError("instances of one output differ in shape")
        return stacked, kinds.pop() if len(kinds) == 1 else "other"

    def row(self, span: _Span) -> None:
        if span.kind == "numeric":
            self.add(None, [span], False, [])
            return
        if span.kind != "array":
            raise RestJsonError("'predictions' is not a list")
        # Instances are objects (named outputs) or none is; only then are they all visited.
        first = self.scanner.first_element(span.start)
        if first is not None and first.kind == "object" and not self._is_b64(first):
            instances = self.scanner.elements(span.start)
            if all(s.kind == "object" for s in instances):
                self._named_rows(instances)
                return
        self.add(None, [span], False, [])

    def _is_b64(self, span: _Span) -> bool:
        members = self.scanner.members_of(span)
        return len(members) == 1 and members[0].key == "b64" and members[0].value.kind == "string"

    def _named_rows(self, instances: list[_Span]) -> None:
        per_instance = [self.scanner.members_of(s) for s in instances]
        names = [m.key for m in per_instance[0]]
        _check_names_once(names, "in an instance of 'predictions'")
        self.names_per_instance = [{m.key for m in members} for members in per_instance]
        for members in per_instance:
            if [m.key for m in members] != names:
                raise RestJsonError("instances name different outputs")
        for column, name in enumerate(names):
            spans = [members[column].value for members in per_instance]
            self.add(name, spans, True, [s.end for s in spans])

    def columnar(self, span: _Span) -> None:
        if span.kind == "object":
            members = self.scanner.members_of(span)
            b64 = (
                len(members) == 1 and members[0].key == "b64" and members[0].value.kind == "string"
            )
            if not b64:
                _check_names_once([m.key for m in members], "in 'outputs'")
                for m in members:
                    self.add(m.key, [m.value], False, [m.value.end])
                return
        self.add(None, [span], False, [])


def _may_be_numeric(spans: Sequence[_Span]) -> bool:
    return all(s.kind in ("numeric", "scalar") for s in spans)
