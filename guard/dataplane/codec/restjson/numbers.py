"""Reading numbers: every token of a numeric region at once, in numpy.

The reference the native scan (``guard.dataplane._walk.scan_tensor``) is held
to: each token's value and offsets, a token's text rounded to float32 as
absl::SimpleAtof rounds it, and the region's dense shape from its brackets.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

import numpy as np

from guard.dataplane.codec.restjson.shared import Array, RestJsonError

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
# A token's text rounded to float32 as absl::SimpleAtof rounds it: for the
# outputs read as float32, and for the writer's check that a text reads back.

_F32 = struct.Struct("<f")
_INF = math.inf
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
