"""The rule engine: pure numpy, no gRPC, no protobuf.

For one output array and its :class:`~guard.config.OutputRule`, in order:

1. **activation** (sigmoid / softmax over the last axis);
2. **validate**: count values below/above the valid range, NaN and ±Inf, and,
   with ``check_sum``, rows whose sum is off by more than the tolerance;
3. **on_violation**: observe, clamp (clip, renormalise bad rows) or reject;
4. **derive** classes, scores and labels from the values after step 3.

Class axis: the last axis for rank >= 2. A tensor of rank 0 or 1 holds one
value per row, exactly like ``[batch, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guard.config import OutputRule
from guard.errors import LabelMismatchError, OutputShapeError

__all__ = ["Counts", "Derived", "OutputResult", "apply_rule", "class_axis_size"]

Array = np.ndarray[Any, Any]


@dataclass
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


@dataclass
class Derived:
    """An output the guard adds to the response, next to the original."""

    suffix: str
    """Appended to the output name: ``_class``, ``_score``, ``_label``, ``_top_k_*``."""
    array: Array
    """int64, the source's float dtype, or an object array of ``bytes`` (labels)."""


@dataclass
class OutputResult:
    """What the rule did to one output."""

    values: Array
    """The values to return (activated and/or repaired), or the input unchanged."""
    changed: bool
    """Whether ``values`` differ from the input (the tensor must be re-encoded)."""
    counts: Counts
    action: str
    """``clean``, ``observed``, ``clamped`` or ``rejected``."""
    checked: Array
    """The values that were validated (after activation, before repair): the
    histogram and the class counter read these."""
    rejection: str | None = None
    """Why the output was rejected (the RPC's details), when ``action`` is ``rejected``."""
    classes: Array | None = None
    """The predicted class per row (argmax, top-1, or the thresholded 0/1), for metrics."""
    multi_label: bool = False
    """``classes`` holds a 0/1 per class (a threshold on a multi-class output)."""
    derived: list[Derived] = field(default_factory=list)


def class_axis_size(shape: tuple[int, ...]) -> int:
    """Classes per row: the last axis for rank >= 2, else 1."""
    return shape[-1] if len(shape) >= 2 else 1


def _rows(values: Array) -> Array:
    return values.reshape(-1, class_axis_size(values.shape))


def _sigmoid(x: Array) -> Array:
    # Written in two halves so exp never overflows: for x >= 0 use 1/(1+e^-x),
    # else e^x/(1+e^x).
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _softmax(x: Array) -> Array:
    rows = _rows(x)
    shifted = rows - rows.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    out: Array = (e / e.sum(axis=1, keepdims=True)).reshape(x.shape)
    return out


def _activate(values: Array, activation: str) -> Array:
    if activation == "none":
        return values
    # float16 loses too much inside exp/sum; compute in float32 and cast back.
    work = values.astype(np.float32) if values.dtype == np.float16 else values
    with np.errstate(over="ignore", invalid="ignore"):
        out = _sigmoid(work) if activation == "sigmoid" else _softmax(work)
    return out.astype(values.dtype, copy=False)


def _count(values: Array, rule: OutputRule) -> tuple[Counts, Array | None]:
    lo, hi = rule.valid_range
    counts = Counts(values=int(values.size))
    # Comparisons with NaN are False, so NaN never counts as out of range; an
    # Inf does, and is moved to its own kind below.
    counts.below_min = int(np.count_nonzero(values < lo))
    counts.above_max = int(np.count_nonzero(values > hi))
    if not np.isfinite(values).all():
        counts.nan = int(np.count_nonzero(np.isnan(values)))
        pos_inf = int(np.count_nonzero(values == np.inf))
        neg_inf = int(np.count_nonzero(values == -np.inf))
        counts.inf = pos_inf + neg_inf
        if hi < np.inf:
            counts.above_max -= pos_inf
        if lo > -np.inf:
            counts.below_min -= neg_inf
    bad_rows = None
    if rule.check_sum:
        with np.errstate(over="ignore", invalid="ignore"):
            sums = _rows(values).sum(axis=1, dtype=np.float64)
            bad_rows = ~(np.abs(sums - 1.0) <= rule.sum_tolerance)  # NaN sums are bad
        counts.bad_rows = int(np.count_nonzero(bad_rows))
    return counts, bad_rows


def _describe(counts: Counts, rule: OutputRule) -> str:
    lo, hi = rule.valid_range
    parts = []
    if counts.below_min:
        parts.append(f"{counts.below_min} values below {lo}")
    if counts.above_max:
        parts.append(f"{counts.above_max} values above {hi}")
    if counts.nan:
        parts.append(f"{counts.nan} NaN values")
    if counts.inf:
        parts.append(f"{counts.inf} infinite values")
    if counts.bad_rows:
        parts.append(f"{counts.bad_rows} rows not summing to 1 (tolerance {rule.sum_tolerance})")
    return ", ".join(parts)


def _clamp(values: Array, rule: OutputRule, bad_rows: Array | None) -> Array:
    lo, hi = rule.valid_range
    out = np.clip(values, lo, hi)  # ±Inf clip to the bounds
    if bad_rows is not None:
        rows = _rows(out)  # a view of ``out``
        recheck = bad_rows.copy()
        sums = rows.sum(axis=1, dtype=np.float64)
        recheck &= ~(np.abs(sums - 1.0) <= rule.sum_tolerance)
        if recheck.any():
            fix = rows[recheck].astype(np.float64)
            s = fix.sum(axis=1, keepdims=True)
            zero = (s == 0).ravel()
            fix[zero] = 1.0 / fix.shape[1]
            s[zero] = 1.0
            rows[recheck] = (fix / s).astype(out.dtype)
    return out


def _top_k(values: Array, k: int) -> tuple[Array, Array]:
    rows = _rows(values)
    c = rows.shape[1]
    if k < c:
        # argpartition finds the k largest in O(C); only those k are then sorted.
        part = np.argpartition(-rows, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(c), (rows.shape[0], c))
    part_vals = np.take_along_axis(rows, part, axis=1)
    # Best first; ties go to the lower class index, as a stable argsort would.
    order = np.lexsort((part, -part_vals), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    scores = np.take_along_axis(rows, idx, axis=1)
    lead = values.shape[:-1] if values.ndim >= 2 else values.shape
    return idx.astype(np.int64).reshape(*lead, k), scores.reshape(*lead, k)


def _labels_for(classes: Array, labels: np.ndarray[Any, Any]) -> Array:
    return labels[classes]


def apply_rule(
    values: Array,
    rule: OutputRule,
    label_table: np.ndarray[Any, Any] | None,
    model: str,
    output: str,
) -> OutputResult:
    """Apply ``rule`` to one output.

    A rejected output comes back with ``action == "rejected"`` and its counts (so
    they can be recorded); the caller fails the RPC. A rule that cannot fit the
    tensor raises a :class:`~guard.errors.GuardError`.

    ``label_table`` is ``rule.labels`` encoded once as an object array of
    ``bytes`` (see :func:`label_table`).
    """
    who = f"guard: model '{model}' output '{output}'"
    activated = _activate(values, rule.activation)
    changed = activated is not values
    counts, bad_rows = _count(activated, rule)

    action = "clean"
    result = activated
    if counts.total:
        if rule.on_violation == "reject":
            reason = f"{who}: {_describe(counts, rule)}"
            return OutputResult(values, False, counts, "rejected", activated, rejection=reason)
        if rule.on_violation == "clamp":
            if counts.nan:
                reason = (
                    f"{who}: {counts.nan} NaN values cannot be clamped; "
                    "fix the model or use on_violation: observe"
                )
                return OutputResult(values, False, counts, "rejected", activated, rejection=reason)
            result = _clamp(activated, rule, bad_rows)
            changed = True
            action = "clamped"
        else:
            action = "observed"

    out = OutputResult(result, changed, counts, action, checked=activated)
    c = class_axis_size(result.shape)
    if rule.threshold is not None:
        threshold = np.asarray(rule.threshold, dtype=np.float64)
        if threshold.ndim == 1 and threshold.size != c:
            raise OutputShapeError(
                f"{who}: {threshold.size} thresholds configured but the output has {c} classes"
            )
        cls = (result > threshold).astype(np.int64)
        out.classes = cls
        out.multi_label = c > 1
        out.derived.append(Derived("_class", cls))
        if label_table is not None:
            out.derived.append(Derived("_label", _labels_for(cls, label_table)))
    if rule.argmax:
        cls, score = _top_k(result, 1)
        cls, score = cls[..., 0], score[..., 0]
        out.classes = cls
        out.derived.append(Derived("_class", cls))
        out.derived.append(Derived("_score", score))
        if label_table is not None:
            _check_label_count(who, label_table, c)
            out.derived.append(Derived("_label", _labels_for(cls, label_table)))
    if rule.top_k:
        if rule.top_k > c:
            raise OutputShapeError(
                f"{who}: top_k is {rule.top_k} but the output has only {c} classes per row"
            )
        cls, score = _top_k(result, rule.top_k)
        if out.classes is None:
            out.classes = cls[..., 0]
        out.derived.append(Derived("_top_k_class", cls))
        out.derived.append(Derived("_top_k_score", score))
        if label_table is not None:
            _check_label_count(who, label_table, c)
            out.derived.append(Derived("_top_k_label", _labels_for(cls, label_table)))
    return out


def _check_label_count(who: str, labels: np.ndarray[Any, Any], classes: int) -> None:
    if labels.size != classes:
        raise LabelMismatchError(
            f"{who}: {labels.size} labels configured but the output has {classes} classes; "
            "give one label per class"
        )


def label_table(labels: tuple[str, ...] | None) -> np.ndarray[Any, Any] | None:
    """Encode labels once, as the object array of ``bytes`` that indexing wants."""
    if labels is None:
        return None
    table = np.empty(len(labels), dtype=object)
    table[:] = [label.encode("utf-8") for label in labels]
    return table
