"""The clean case of an argmax/top-k rule in one native call.

Most responses of a classifier need nothing repaired: every value is finite
and in range, every row sums to 1. For those, :func:`Lane.run` checks the
values, ranks the classes and writes the derived outputs (``_class``,
``_score``, ``_label``, ``_top_k_*``) as encoded map entries in one call to
``guard.dataplane._rank``, instead of some thirty numpy calls and six encoder passes.
In a loaded proxy, where each of those calls meets cold CPU caches, that is
most of what guarding such a response costs.

The lane is only a shortcut. When anything would have to be counted, or the
native module is not built, :meth:`Lane.run` returns ``None`` and the
pipeline takes its general path (:func:`guard.dataplane.rules.apply_rule` and
:func:`guard.dataplane.wire.encode_output`), which stays the reference: the tests check
that both give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.control.config import OutputRule
from guard.dataplane import wire
from guard.dataplane.rules import Counts, OutputResult, class_axis_size, native_module, rule_bounds

__all__ = ["Lane", "lane_for"]

Array = np.ndarray[Any, Any]
Buffer = bytes | memoryview | Array

_DTYPES = {np.dtype(np.float32): wire.DT_FLOAT, np.dtype(np.float64): wire.DT_DOUBLE}

# What each derived entry holds, as guard/_rank.c numbers them.
_CLASS, _SCORE, _LABEL, _TOP_CLASS, _TOP_SCORE, _TOP_LABEL = range(6)


@dataclass(frozen=True, slots=True)
class Lane:
    """One output's rule, prepared for one shape, dtype and encoding."""

    kernel: Callable[..., tuple[bytes, bytes, bytes] | None]
    """``guard.dataplane._rank.clean_rank_encode``."""
    args: tuple[Any, ...]
    """The kernel's arguments after the values: the shape, k, the bounds, the
    sum band, the encoding and the derived entries' specs."""
    dtype: np.dtype[Any]
    names: tuple[str, ...]
    """The derived outputs' names, in the order they are written."""

    def encode(self, values: Buffer) -> tuple[bytes, bytes, bytes] | None:
        """The kernel's verdict on C-contiguous ``values`` (any alignment): each
        row's best class (int64) and score (the values' dtype), one row after
        another, and the encoded map entries; ``None`` when the general path
        must decide."""
        return self.kernel(values, *self.args)

    def run(self, values: Array) -> tuple[OutputResult, bytes] | None:
        """Check and rank ``values``, and encode the derived outputs.

        Returns the rule's result (for the metrics) and the encoded map
        entries, or ``None`` when the general path must decide.
        """
        if not values.flags.c_contiguous:
            return None
        found = self.encode(values)
        if found is None:
            return None
        result = OutputResult(values, False, Counts(values=values.size), "clean", values)
        # One row after another: the metrics read them flat.
        result.classes = np.frombuffer(found[0], dtype=np.int64)
        result.confidence = np.frombuffer(found[1], dtype=values.dtype)
        return result, found[2]


def lane_for(
    name: str,
    rule: OutputRule,
    labels: np.ndarray[Any, Any] | None,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    encoding: wire.Encoding,
) -> Lane | None:
    """The lane for one output, or ``None`` where only the general path applies:
    an activation or threshold, float16, no classes, k beyond the native limit,
    or labels that do not fit (the general path raises the error for those)."""
    rank = native_module()
    dtype_enum = _DTYPES.get(dtype)
    c = class_axis_size(shape)
    k = rule.top_k or (1 if rule.argmax else 0)
    size = int(np.prod(shape, dtype=np.int64))
    if (
        rank is None
        or dtype_enum is None
        or rule.activation != "none"
        or rule.threshold is not None
        or not k
        or c == 0
        or size == 0
        or k > min(c, rank.MAX_K)
        or (labels is not None and labels.size != c)
    ):
        return None
    lead = shape[:-1] if len(shape) >= 2 else shape
    fields = None if labels is None else tuple(wire.string_field(s) for s in labels.tolist())
    wanted: list[tuple[str, int, int, tuple[int, ...]]] = []
    if rule.argmax:
        wanted += [("_class", _CLASS, wire.DT_INT64, lead), ("_score", _SCORE, dtype_enum, lead)]
        if fields is not None:
            wanted.append(("_label", _LABEL, wire.DT_STRING, lead))
    if rule.top_k:
        top = (*lead, k)
        wanted += [
            ("_top_k_class", _TOP_CLASS, wire.DT_INT64, top),
            ("_top_k_score", _TOP_SCORE, dtype_enum, top),
        ]
        if fields is not None:
            wanted.append(("_top_k_label", _TOP_LABEL, wire.DT_STRING, top))
    entries = []
    for suffix, what, entry_dtype, entry_shape in wanted:
        key_field, head = wire.entry_head(name + suffix, entry_dtype, entry_shape)
        label_fields = () if what not in (_LABEL, _TOP_LABEL) else (fields,)
        entries.append((key_field, head, what, *label_fields))
    lo, hi = rule_bounds(dtype, rule)
    args = (
        dtype.itemsize, size // c, c, k, float(lo), float(hi),
        rule.check_sum, 1.0 - rule.sum_tolerance, 1.0 + rule.sum_tolerance,
        encoding is wire.Encoding.CONTENT, wire.packed_key(dtype_enum)[0], tuple(entries),
    )  # fmt: skip
    return Lane(
        kernel=rank.clean_rank_encode,
        args=args,
        dtype=dtype,
        names=tuple(name + suffix for suffix, *_ in wanted),
    )
