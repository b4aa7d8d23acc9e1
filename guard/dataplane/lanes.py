"""The native route for one output: check, rank and encode in one call.

Most responses of a classifier need nothing repaired: every value is finite
and in range, every row sums to 1. For those, :meth:`Lane.encode` checks the
values, ranks the classes and/or thresholds the values, and writes the derived
outputs (``_class``, ``_score``, ``_label``, ``_top_k_*``) as encoded map entries in one call to
the native kernel, instead of some thirty numpy calls and six encoder passes.
In a loaded proxy, where each of those calls meets cold CPU caches, that is
most of what guarding such a response costs.

Many of the others only have values out of range, or rows off their sum,
which the rule observes or clamps: the kernel counts those in the same pass,
repairs them into a copy of the values (clamped, and rows still off their sum
renormalised; written over the old ones in place, same length), and ranks the
repaired rows, so a badly calibrated model costs one call too. Predictions
below the rule's ``min_confidence`` abstain in the same call (class -1, the
abstain label), so an untrained model's answers do not leave the lane either.

A lane is only a shortcut. When anything else would have to be decided (a
NaN, a row sum too close to the tolerance to call, a rejection) it answers
``None``, and the response takes the numpy reference
(:func:`guard.dataplane.rules.apply_rule`); the tests check that both give
the same bytes and metrics.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from guard.dataplane.codec import tensor
from guard.dataplane.codec.tensor import Encoding
from guard.dataplane.results import Array
from guard.dataplane.rules import activate, class_axis_size, rule_bounds
from guard.dataplane.rulespec import OutputRule

__all__ = ["Counted", "Lane", "LaneResult", "OutputSpec", "make_lane"]

Buffer = bytes | bytearray | memoryview | Array
#: What a lane counted: the repaired values (``None`` when it only observed),
#: then the values below the range, above it, infinite, and the rows off their sum.
Counted = tuple[bytes | None, int, int, int, int]
#: Each row's best class (int64) and score (the values' dtype), one row after
#: another, and the encoded map entries of the derived outputs; when values
#: were counted (see :data:`Counted`), the scores are each row's largest value
#: before repair, which is what the metrics read.
LaneResult = tuple[bytes, bytes, bytes] | tuple[bytes, bytes, bytes, Counted]

_DTYPES = {np.dtype(np.float32): tensor.DT_FLOAT, np.dtype(np.float64): tensor.DT_DOUBLE}

# What each derived entry holds, as guard/dataplane/_rank.c numbers them.
_CLASS, _SCORE, _LABEL, _TOP_CLASS, _TOP_SCORE, _TOP_LABEL, _FIRED, _FIRED_LABEL = range(8)
_LABELS = (_LABEL, _TOP_LABEL, _FIRED_LABEL)
# How the kernel treats values outside the valid range (_rank.c's REPAIR_*).
_REPAIR_NONE, _REPAIR_OBSERVE, _REPAIR_CLAMP = range(3)


class OutputSpec(NamedTuple):
    """What a lane is prepared for: one output's rule, shape, dtype and encoding."""

    name: str
    rule: OutputRule
    labels: np.ndarray[Any, Any] | None
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    encoding: Encoding


@dataclass(frozen=True, slots=True)
class Lane:
    """One output's rule, prepared for one shape, dtype and encoding."""

    kernel: Callable[..., LaneResult | None]
    args: tuple[Any, ...]
    """The kernel's arguments after the values (see :func:`make_lane`)."""
    dtype: np.dtype[Any]
    names: tuple[str, ...]
    """The derived outputs' names, in the order they are written."""
    multi_label: int = 0
    """Classes per row when the lane's classes are a threshold's 0/1 per
    class of a multi-class output (counted per class that fired), else 0."""

    activation: OutputRule | None = None
    """The rule, when it has an activation (see :meth:`checked`)."""
    shape: tuple[int, ...] = ()
    held: int = 0
    """About the bytes this lane holds of its own, what a cache of lanes
    weighs it by: a per-class threshold table, the encoded heads, the shape.
    Never in proportion to the classes for one threshold (the kernel takes
    it as a number), and not counting the label fields, which every lane of
    one rule's labels shares."""

    def checked(self, raw: Buffer) -> Buffer:
        """What the rule checks and ranks: the output's values as they came, or
        their activation. The activation is the reference's own numpy code
        (:func:`guard.dataplane.rules.activate`): the tensor is rewritten with
        these values, and numpy's SIMD ``exp`` gives other bytes than libm's
        (float32 differs in about 40% of values), so no C copy of it could be
        held to the reference byte for byte."""
        if self.activation is None:
            return raw
        values = np.frombuffer(raw, self.dtype).reshape(self.shape)
        return np.ascontiguousarray(activate(values, self.activation))

    def encode(self, values: Buffer) -> LaneResult | None:
        """The kernel's verdict on C-contiguous ``values`` (any alignment), or
        ``None`` when the numpy reference must decide."""
        return self.kernel(values, *self.args)


def make_lane(
    kernel: Callable[..., LaneResult | None], max_k: int, spec: OutputSpec
) -> Lane | None:
    """The lane for one output, or ``None`` where only the reference applies.

    Taken natively: rules that rank (argmax, top-k) and/or threshold the
    values (one threshold, or one per class), with or without labels, and
    rules that only check them (range, sums: no derived output, as seed
    001's clamp), after the rule's activation if any (:meth:`Lane.checked`).
    The kernel answers the classes the metrics count (each row's best, or
    every value's 0/1; a rule that derives nothing counts none) and each
    row's largest value (the histogram's), and counts values out of range
    and rows off their sum when the rule observes them (finite values) or
    clamps them (±Inf too; it derives from the repaired values: clamped,
    and renormalised where a row stays off its sum).

    With ``min_confidence``, the predictions below it abstain (class -1 and
    the abstain label, as the reference writes them).

    Left to the reference: a NaN; a row whose sum is too close to the
    tolerance to call for certain; ``reject`` with a value out of range or a
    row off its sum; float16,
    rank 0 with a threshold, no values or no classes, k beyond ``max_k``, and
    thresholds or labels that do not fit the classes (the reference raises
    the error for those).
    """
    name, rule, labels, shape, dtype, encoding = spec
    c = class_axis_size(shape)
    size = int(np.prod(shape, dtype=np.int64))
    dtype_enum = _DTYPES.get(dtype)
    if dtype_enum is None or not _takes(rule, labels, c, size, max_k):
        return None
    thresholds = _thresholds(rule, shape)
    if rule.threshold is not None and thresholds is None:
        return None
    wanted = _wanted(rule, labels is not None, shape, dtype_enum)
    args = _kernel_args(spec, size // c, c, dtype_enum, wanted, thresholds)
    return Lane(
        kernel=kernel,
        args=args,
        dtype=dtype,
        names=tuple(name + suffix for suffix, *_ in wanted),
        multi_label=c if thresholds is not None and c > 1 else 0,
        activation=rule if rule.activation != "none" else None,
        shape=shape,
        held=_held(args, thresholds, shape),
    )


def _takes(rule: OutputRule, labels: Array | None, c: int, size: int, max_k: int) -> bool:
    """Whether a lane can take this rule on ``size`` values of ``c`` classes."""
    return c > 0 and size > 0 and rule.k <= min(c, max_k) and _labels_fit(rule, labels, c)


def _labels_fit(rule: OutputRule, labels: Array | None, c: int) -> bool:
    """Whether the labels cover what is labelled: a threshold's 0 and 1, and
    every ranked class."""
    if labels is None:
        return True
    if rule.threshold is not None and labels.size < 2:
        return False
    return not rule.k or labels.size == c


def _thresholds(rule: OutputRule, shape: tuple[int, ...]) -> bytes | float | None:
    """The thresholds as the kernel reads them: one float64 per class (the
    rule's tuple), or one number for every class; ``None`` without a
    threshold, or with one the reference refuses or that rank 0 would need.

    One threshold stays one number: the classes are the upstream's to
    declare, and TF's fill convention lets a 60-byte answer declare sixteen
    million of them (a table of them took 128 MB, kept with the lane)."""
    if rule.threshold is None or not shape:
        return None
    c = class_axis_size(shape)
    # The reference compares in float64 (the values promote to the thresholds').
    if isinstance(rule.threshold, tuple):
        per_class = np.asarray(rule.threshold, dtype=np.float64)
        return per_class.tobytes() if per_class.size == c else None
    return float(rule.threshold)


# What a lane holds besides what its fields count (the Lane, its tuples).
_LANE_OVERHEAD = 1024


def _held(args: tuple[Any, ...], thresholds: bytes | float | None, shape: tuple[int, ...]) -> int:
    """:attr:`Lane.held` of a lane with these kernel arguments."""
    entries: tuple[tuple[Any, ...], ...] = args[11]
    heads = sum(len(entry[0]) + len(entry[1]) for entry in entries)
    table = len(thresholds) if isinstance(thresholds, bytes) else 0
    return _LANE_OVERHEAD + heads + table + 8 * len(shape)


#: Each label table's encoded string_val fields, made once and shared by the
#: lanes of its rule (a lane per batch shape would otherwise copy them all),
#: by the table's id while it lives, with the abstain label they end with.
_FIELDS: dict[int, tuple[weakref.ref[Any], str | None, tuple[bytes, ...]]] = {}


def _label_fields(labels: np.ndarray[Any, Any], abstain: str | None) -> tuple[bytes, ...]:
    """One encoded ``string_val`` field per label of ``labels``, then the
    abstain label's (class -1's) unless ``abstain`` is ``None``."""
    key = id(labels)
    found = _FIELDS.get(key)
    if found is not None and found[0]() is labels and found[1] == abstain:
        return found[2]
    fields = tuple(tensor.string_field(s) for s in labels.tolist())
    if abstain is not None:
        fields += (tensor.string_field(abstain.encode("utf-8")),)
    _FIELDS[key] = (weakref.ref(labels, _forgetting(key)), abstain, fields)
    return fields


def _forgetting(key: int) -> Callable[[weakref.ref[Any]], None]:
    """The callback that drops a label table's fields once the table is gone."""

    def forget(_: weakref.ref[Any]) -> None:
        _FIELDS.pop(key, None)

    return forget


_Wanted = list[tuple[str, int, int, tuple[int, ...]]]


def _wanted(rule: OutputRule, labelled: bool, shape: tuple[int, ...], dtype_enum: int) -> _Wanted:
    """(suffix, what, dtype, shape) of each derived output, in the order written."""
    lead = shape[:-1] if len(shape) >= 2 else shape
    wanted: _Wanted = []
    if rule.threshold is not None:
        wanted.append(("_class", _FIRED, tensor.DT_INT64, shape))
        if labelled:
            wanted.append(("_label", _FIRED_LABEL, tensor.DT_STRING, shape))
    if rule.argmax:
        wanted += [("_class", _CLASS, tensor.DT_INT64, lead), ("_score", _SCORE, dtype_enum, lead)]
        if labelled:
            wanted.append(("_label", _LABEL, tensor.DT_STRING, lead))
    if rule.top_k:
        top = (*lead, rule.top_k)
        wanted += [
            ("_top_k_class", _TOP_CLASS, tensor.DT_INT64, top),
            ("_top_k_score", _TOP_SCORE, dtype_enum, top),
        ]
        if labelled:
            wanted.append(("_top_k_label", _TOP_LABEL, tensor.DT_STRING, top))
    return wanted


def _kernel_args(
    spec: OutputSpec,
    rows: int,
    cols: int,
    dtype_enum: int,
    wanted: _Wanted,
    thresholds: bytes | float | None,
) -> tuple[Any, ...]:
    """The one place the kernel's arguments are packed (guard/dataplane/_rank.pyi)."""
    name, rule, labels, _, dtype, encoding = spec
    # Only a prediction abstains: a rule that derives nothing has none.
    abstains = rule.min_confidence is not None and rule.derives
    floor = rule.min_confidence if abstains else math.nan
    abstain = rule.abstain_label if abstains else None  # class -1's
    fields = None if labels is None else _label_fields(labels, abstain)
    entries = []
    for suffix, what, entry_dtype, entry_shape in wanted:
        key_field, head = tensor.entry_head(name + suffix, entry_dtype, entry_shape)
        label_fields = (fields,) if what in _LABELS else ()
        entries.append((key_field, head, what, *label_fields))
    lo, hi = rule_bounds(dtype, rule)
    # A threshold alone, or a rule that only checks, still ranks one class:
    # each row's best score is what the metrics' histogram reads.
    k = max(rule.k, 1)
    return (
        dtype.itemsize, rows, cols, k, float(lo), float(hi),
        rule.check_sum, 1.0 - rule.sum_tolerance, 1.0 + rule.sum_tolerance,
        encoding is Encoding.CONTENT, tensor.packed_key(dtype_enum)[0], tuple(entries),
        thresholds, _repair_mode(rule), floor,
    )  # fmt: skip


def _repair_mode(rule: OutputRule) -> int:
    """What the kernel may do with values outside the valid range."""
    if rule.on_violation == "observe":
        return _REPAIR_OBSERVE
    if rule.on_violation == "clamp":
        return _REPAIR_CLAMP
    return _REPAIR_NONE
