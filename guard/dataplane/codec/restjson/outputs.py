"""Outputs: each output's values as a numpy array, with the body offsets of its
numbers; read by the native scan, by the numpy scan, or with ``json.loads``
(strings, ``b64`` objects, booleans, empty tensors).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from guard.dataplane.codec.restjson.native import NumberScan, Scanned
from guard.dataplane.codec.restjson.numbers import (
    _FLOAT32_TOKEN_MAX,
    _HALF29,
    _LOW29,
    _SKELETON_DELETE,
    _U,
    _W,
    _chunks,
    _float32_of,
    _Numbers,
    _scan_chunk,
    _skeleton_shape,
)
from guard.dataplane.codec.restjson.shared import Array, RestJsonError
from guard.dataplane.codec.restjson.structure import _Span
from guard.dataplane.dtypes import FLOAT32 as _FLOAT32
from guard.dataplane.dtypes import FLOAT64 as _FLOAT64
from guard.dataplane.dtypes import INT64 as _INT64


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
