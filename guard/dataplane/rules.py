"""The rule engine: the numpy reference. No gRPC, no protobuf, no native code.

For one output array and its :class:`~guard.dataplane.rulespec.OutputRule`,
in four steps:

1. :func:`activate`: sigmoid / softmax over the last axis;
2. :func:`validate`: count values below/above the valid range, NaN and ±Inf,
   and, with ``check_sum``, rows whose sum is off by more than the tolerance;
3. :func:`repair`: the ``on_violation`` policy: observe, clamp (clip,
   renormalise bad rows) or reject;
4. :func:`derive`: classes, scores and labels from the values after step 3.

Class axis: the last axis for rank >= 2. A tensor of rank 0 or 1 holds one
value per row, exactly like ``[batch, 1]``.

The native kernels (:mod:`guard.dataplane.kernels`) shortcut the clean case;
this module stays the reference they are tested against.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from guard.dataplane.errors import LabelMismatchError, OutputShapeError, shown
from guard.dataplane.results import Action, Array, Counts, Derived, OutputResult
from guard.dataplane.rulespec import OutputRule

__all__ = [
    "activate",
    "apply_rule",
    "class_axis_size",
    "derive",
    "derived_bytes",
    "label_table",
    "longest_label",
    "labels_for",
    "normalized_entropy",
    "repair",
    "rule_bounds",
    "threshold_unsure",
    "validate",
]


def class_axis_size(shape: tuple[int, ...]) -> int:
    """Classes per row: the last axis for rank >= 2, else 1."""
    return shape[-1] if len(shape) >= 2 else 1


def _rows(values: Array) -> Array:
    c = class_axis_size(values.shape)
    # An explicit row count: reshape(-1, 0) is undefined for an empty class axis.
    return values.reshape(values.size // c if c else int(np.prod(values.shape[:-1])), c)


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
    if rows.shape[1] == 0:
        return x
    shifted = rows - rows.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    out: Array = (e / e.sum(axis=1, keepdims=True)).reshape(x.shape)
    return out


def _activate(values: Array, rule: OutputRule) -> Array:
    if rule.activation == "none":
        return values
    # float16 loses too much inside exp/sum; compute in float32 and cast back.
    work = values.astype(np.float32) if values.dtype == np.float16 else values
    with np.errstate(over="ignore", invalid="ignore"):
        work = _calibrate(work, rule)
        out = _sigmoid(work) if rule.activation == "sigmoid" else _softmax(work)
    return out.astype(values.dtype, copy=False)


def _calibrate(logits: Array, rule: OutputRule) -> Array:
    """Temperature (``z / T``) or Platt (``a * z + b``) scaling of the logits,
    in their own dtype (a new array: the response's values stay as they are)."""
    if rule.platt is not None:
        a, b = rule.platt
        out: Array = logits * logits.dtype.type(a) + logits.dtype.type(b)
        return out
    if rule.temperature is not None:
        out = logits / logits.dtype.type(rule.temperature)
        return out
    return logits


def rule_bounds(dtype: np.dtype[Any], rule: OutputRule) -> tuple[Any, Any]:
    """``valid_range`` in the output's dtype, limited to its finite range.

    A bound beyond the dtype's range (float16 tops out at 65504) would overflow to
    ±Inf in a comparison or a clip; no finite value can lie beyond it anyway.
    """
    return _dtype_bounds(dtype, *rule.valid_range)


@functools.lru_cache(maxsize=256)
def _dtype_bounds(dtype: np.dtype[Any], lo: float, hi: float) -> tuple[Any, Any]:
    finfo = np.finfo(dtype)
    return dtype.type(max(lo, float(finfo.min))), dtype.type(min(hi, float(finfo.max)))


def _row_sums(values: Array) -> Array:
    # Accumulate in float64: a float32 sum flips the verdict of rows right at the
    # tolerance boundary (found by the property tests); it costs ~45 us at 1024x201.
    sums: Array = _rows(values).sum(axis=1, dtype=np.float64)
    return sums


def _bad_sum_rows(values: Array, tolerance: float) -> Array | None:
    """A mask of the rows whose sum is off 1 by more than ``tolerance`` (NaN is
    off), or ``None`` when every row is within it."""
    sums = _row_sums(values)
    if sums.size:
        # The common case, decided by two reductions: every sum strictly inside
        # the band, with a margin that covers the rounding of 1 ± tolerance (the
        # exact test below is |s - 1| <= tolerance). NaN fails both comparisons.
        low, high = _sum_band(tolerance)
        if low <= sums.min() and sums.max() <= high:
            return None
    deviation = np.abs(sums - 1.0)
    ok = deviation <= tolerance
    if ok.all():
        return None
    bad: Array = ~ok
    return bad


@functools.lru_cache(maxsize=64)
def _sum_band(tolerance: float) -> tuple[float, float]:
    margin = 4 * float(np.spacing(1.0 + tolerance))
    return 1.0 - tolerance + margin, 1.0 + tolerance - margin


def _count(values: Array, rule: OutputRule) -> tuple[Counts, Array | None]:
    lo, hi = rule_bounds(values.dtype, rule)
    counts = Counts(values=int(values.size))
    bad_rows = None
    # Two reductions without temporaries decide what must be counted. NaN
    # propagates through min/max, and ±Inf lies beyond the (finite) bounds.
    if values.size:
        vmin, vmax = values.min(), values.max()
        in_range = bool(lo <= vmin and vmax <= hi)
    else:
        in_range = True
    if rule.check_sum:
        if in_range and values.dtype.itemsize < 8:
            # Finite float16/32 values summed in float64 cannot overflow: no
            # errstate (entering one costs more than the sums of a small output).
            bad_rows = _bad_sum_rows(values, rule.sum_tolerance)
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                bad_rows = _bad_sum_rows(values, rule.sum_tolerance)
        if bad_rows is not None:
            counts.bad_rows = int(np.count_nonzero(bad_rows))
    if in_range:
        return counts, bad_rows
    # Comparisons with NaN are False, so NaN never counts as out of range; an
    # Inf does, and is moved to its own kind below.
    if not lo <= vmin:
        counts.below_min = int(np.count_nonzero(values < lo))
    if not vmax <= hi:
        counts.above_max = int(np.count_nonzero(values > hi))
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        counts.nan = int(np.count_nonzero(np.isnan(values)))
        pos_inf = int(np.count_nonzero(values == np.inf))
        neg_inf = int(np.count_nonzero(values == -np.inf))
        counts.inf = pos_inf + neg_inf
        # The bounds are finite, so every ±Inf was also counted as out of range.
        counts.above_max -= pos_inf
        counts.below_min -= neg_inf
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
    lo, hi = rule_bounds(values.dtype, rule)  # ±Inf clip to finite bounds
    out = np.asarray(np.clip(values, lo, hi))
    if bad_rows is None or not bad_rows.any() or class_axis_size(out.shape) == 0:
        return out
    rows = _rows(out)  # a view: np.clip's result is contiguous (0-d included)
    # Clipping may have fixed some bad rows; recheck those rows only.
    candidates = np.flatnonzero(bad_rows)
    sums = rows[candidates].sum(axis=1, dtype=np.float64)
    recheck = np.zeros_like(bad_rows)
    recheck[candidates] = ~(np.abs(sums - 1.0) <= rule.sum_tolerance)
    if recheck.any():
        fix = rows[recheck].astype(np.float64)
        # Scale by the row maximum first, so rows holding values near the dtype's
        # maximum cannot overflow the sum (inf / inf is NaN).
        peak = fix.max(axis=1, keepdims=True)
        fix = np.divide(fix, peak, out=np.zeros_like(fix), where=peak > 0)
        s = fix.sum(axis=1, keepdims=True)
        zero = (s == 0).ravel()
        fix[zero] = 1.0 / fix.shape[1]
        s[zero] = 1.0
        rows[recheck] = (fix / s).astype(out.dtype)
    return rows.reshape(out.shape)


_ARGMAX_ROUNDS_MAX_K = 16


def _top_k(values: Array, k: int, finite: bool = False) -> tuple[Array, Array]:
    """The k best classes per row, best first, ranked exactly as repeated
    ``np.argmax`` ranks them: ties go to the lower class index and NaN counts
    as the largest value, so ``argmax`` and ``top_k[..., 0]`` always agree.

    ``finite`` says the caller knows there is no NaN or ±Inf (saves a pass)."""
    rows = _rows(values)
    at = np.arange(rows.shape[0])
    if k == 1:
        idx = rows.argmax(axis=1).astype(np.int64, copy=False)[:, None]
    elif k <= _ARGMAX_ROUNDS_MAX_K:
        # k passes of argmax beat argpartition + sort by 6-10x for small k (measured).
        # -inf becomes the dtype's minimum, distinct from "already taken"; NaN stays.
        if finite:
            work = rows.copy()
        else:
            work = np.maximum(rows, _lowest(rows.dtype))
        idx = np.empty((rows.shape[0], k), dtype=np.int64)
        for j in range(k):
            best = work.argmax(axis=1)
            idx[:, j] = best
            if j + 1 < k:
                work[at, best] = -np.inf
    else:
        key = np.where(np.isnan(rows), -np.inf, -rows)  # NaN first, like argmax
        idx = np.argsort(key, axis=1, kind="stable")[:, :k].astype(np.int64, copy=False)
    scores = rows[at[:, None], idx]
    lead = values.shape[:-1] if values.ndim >= 2 else values.shape
    return idx.reshape(*lead, k), scores.reshape(*lead, k)


@functools.lru_cache(maxsize=8)
def _lowest(dtype: np.dtype[Any]) -> Any:
    return np.finfo(dtype).min


#: The class of a row that abstained (below ``min_confidence``).
ABSTAINED = -1


def labels_for(
    classes: Array, labels: np.ndarray[Any, Any], rule: OutputRule | None = None
) -> Array:
    if rule is not None and rule.min_confidence is not None and (classes == ABSTAINED).any():
        # The abstain label sits one past the classes; -1 would index the last one.
        labels = np.append(labels, np.array([rule.abstain_label.encode("utf-8")], dtype=object))
        classes = np.where(classes == ABSTAINED, labels.size - 1, classes)
    if classes.ndim:
        out: Array = labels.take(classes)
        return out
    # ravel/reshape keep a rank-0 result an array (take returns a scalar).
    out = labels[np.ravel(classes)].reshape(())
    return out


def activate(values: Array, rule: OutputRule) -> Array:
    """Step 1: the rule's activation (``values`` itself when there is none)."""
    return _activate(values, rule)


def validate(checked: Array, rule: OutputRule) -> tuple[Counts, Array | None]:
    """Step 2: the violation counts, and the mask of rows off their sum (if any)."""
    return _count(checked, rule)


def repair(
    values: Array,
    checked: Array,
    counts: Counts,
    bad_rows: Array | None,
    rule: OutputRule,
    who: str,
) -> OutputResult:
    """Step 3: apply ``on_violation`` to the checked values.

    A rejected output comes back with ``Action.REJECTED`` and the reason.
    """
    changed = checked is not values
    if not counts.total:
        return OutputResult(checked, changed, counts, Action.CLEAN, checked)
    if rule.on_violation == "observe":
        return OutputResult(checked, changed, counts, Action.OBSERVED, checked)
    if rule.on_violation == "reject":
        reason = f"{who}: {_describe(counts, rule)}"
    elif counts.nan:
        reason = (
            f"{who}: {counts.nan} NaN values cannot be clamped; "
            "fix the model or use on_violation: observe"
        )
    else:
        repaired = _clamp(checked, rule, bad_rows)
        return OutputResult(repaired, True, counts, Action.CLAMPED, checked)
    return OutputResult(values, False, counts, Action.REJECTED, checked, rejection=reason)


def derive(
    out: OutputResult,
    rule: OutputRule,
    label_table: np.ndarray[Any, Any] | None,
    who: str,
    bad_rows: Array | None = None,
) -> None:
    """Step 4: add the derived outputs (and the classes the metrics read) to ``out``."""
    if rule.threshold is not None:
        _derive_threshold(out, rule, label_table, who)
    if not rule.k:
        return
    _derive_ranked(out, rule, label_table, who, bad_rows)


def _derive_ranked(
    out: OutputResult,
    rule: OutputRule,
    label_table: np.ndarray[Any, Any] | None,
    who: str,
    bad_rows: Array | None,
) -> None:
    c = class_axis_size(out.values.shape)
    if c == 0:
        raise OutputShapeError(f"{who}: the output has no classes (last dimension 0)")
    if rule.top_k > c:
        raise OutputShapeError(
            f"{who}: top_k is {rule.top_k} but the output has only {c} classes per row"
        )
    if label_table is not None:
        _check_label_count(who, label_table, c)
    # _count saw every NaN and ±Inf (none when in range); a clamp leaves none.
    finite = out.action == Action.CLAMPED or not (out.counts.nan or out.counts.inf)
    # The top-k ranking puts the argmax first: one ranking serves both.
    cls, score = _top_k(out.values, rule.k, finite if rule.top_k else False)
    if rule.min_confidence is not None and rule.threshold is None:
        # With a threshold, its classes are the prediction that abstains.
        cls = _abstain_ranked(out, cls, score[..., 0], rule.min_confidence)
    if out.classes is None:  # a threshold's 0/1 classes stay what the metrics count
        out.classes, out.confidence = cls[..., 0], score[..., 0]
    if rule.argmax:
        _add_ranked(out, "", cls[..., 0], score[..., 0], label_table, rule)
    if rule.top_k:
        _add_ranked(out, "_top_k", cls, score, label_table, rule)
    if out.confidence is not None and out.action == Action.CLAMPED:
        out.confidence = _checked_row_max(out.checked, out.confidence, rule, bad_rows)


def _derive_threshold(
    out: OutputResult, rule: OutputRule, label_table: np.ndarray[Any, Any] | None, who: str
) -> None:
    c = class_axis_size(out.values.shape)
    threshold = np.asarray(rule.threshold, dtype=np.float64)
    if threshold.ndim == 1 and threshold.size == 1 and out.values.ndim < 2:
        threshold = threshold[0]  # one class per row: keep the output's shape
    if threshold.ndim == 1 and threshold.size != c:
        raise OutputShapeError(
            f"{who}: {threshold.size} thresholds configured but the output has {c} classes"
        )
    cls = np.asarray(out.values > threshold).astype(np.int64)
    if rule.min_confidence is not None:
        unsure = threshold_unsure(out.values, cls, rule.min_confidence)
        cls = _mark_abstained(out, cls, unsure)
    out.classes = cls
    out.multi_label = c > 1
    out.derived.append(Derived("_class", cls))
    if label_table is not None:
        out.derived.append(Derived("_label", labels_for(cls, label_table, rule)))


def threshold_unsure(values: Array, cls: Array, min_confidence: float) -> Array:
    """Where a threshold's prediction abstains: the predicted class's
    probability (p for class 1, 1 - p for class 0, in the values' dtype) is
    below ``min_confidence``, or NaN. The native route asks this too."""
    confidence = np.where(cls == 1, values, 1.0 - values)
    unsure: Array = ~(confidence >= min_confidence)
    return unsure


def _abstain_ranked(out: OutputResult, cls: Array, top: Array, min_confidence: float) -> Array:
    """The ranking with each unsure row's predicted class (column 0) set to -1;
    the other columns and every score stay as ranked."""
    unsure = ~(top >= min_confidence)  # NaN abstains too
    if not unsure.any():
        return cls
    marked = cls.copy()
    marked[..., 0] = _mark_abstained(out, cls[..., 0], unsure)
    return marked


def _mark_abstained(out: OutputResult, cls: Array, unsure: Array) -> Array:
    out.abstained = int(np.count_nonzero(unsure))
    if not out.abstained:
        return cls
    marked: Array = np.where(unsure, ABSTAINED, cls)
    return marked


def _add_ranked(
    out: OutputResult,
    prefix: str,
    classes: Array,
    scores: Array,
    label_table: np.ndarray[Any, Any] | None,
    rule: OutputRule,
) -> None:
    out.derived.append(Derived(f"{prefix}_class", classes))
    out.derived.append(Derived(f"{prefix}_score", scores))
    if label_table is not None:
        out.derived.append(Derived(f"{prefix}_label", labels_for(classes, label_table, rule)))


def apply_rule(
    values: Array,
    rule: OutputRule,
    label_table: np.ndarray[Any, Any] | None,
    model: str,
    output: str,
) -> OutputResult:
    """Apply ``rule`` to one output: activate, validate, repair, derive.

    A rejected output comes back with ``Action.REJECTED`` and its counts (so
    they can be recorded); the caller fails the call. A rule that cannot fit
    the tensor raises a :class:`~guard.dataplane.errors.GuardError`.

    ``label_table`` is ``rule.labels`` encoded once as an object array of
    ``bytes`` (see :func:`label_table`).
    """
    who = f"guard: model '{shown(model)}' output '{shown(output)}'"
    checked = activate(values, rule)
    counts, bad_rows = validate(checked, rule)
    out = repair(values, checked, counts, bad_rows, rule, who)
    if out.action != Action.REJECTED:
        derive(out, rule, label_table, who, bad_rows)
    if rule.tracks_entropy and class_axis_size(checked.shape) >= 2:
        out.entropy_rows = _rows(checked)
    return out


#: A row summing to less has no entropy: its subnormal values, counted as the
#: smallest normal number (0 ln 0 = 0), would not be negligible against the sum.
ENTROPY_MIN_SUM = 1e-20


def normalized_entropy(rows: Array) -> Array:
    """Each row's Shannon entropy over ``ln(classes)``, in [0, 1], as float64.

    A row is taken as a distribution after dividing by its sum, so
    ``H = ln S - sum(p ln p) / S``; a row with a negative, NaN or infinite
    value, or a sum below :data:`ENTROPY_MIN_SUM`, has no entropy (NaN). 1 is
    a uniform row, 0 a one-hot. Computed in the values' own precision (float16
    in float32): the result only has to resolve the 0.001 buckets. The native
    loop for float32 (guard/dataplane/_rank.c) is held to this within 1e-5.
    """
    p = rows.astype(np.float32) if rows.dtype == np.float16 else rows
    n_rows, n_classes = p.shape
    if n_classes < 2 or n_rows == 0:
        return np.full(n_rows, np.nan)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lowest = p.min(axis=1)
        # 0 ln 0 = 0: a zero times the log of the smallest normal number is 0.
        # A softmax row has no zero unless it underflows: skip that pass then.
        positive = lowest.min() > 0
        logs = np.log(p if positive else np.maximum(p, np.finfo(p.dtype).tiny))
        plogp = np.einsum("ij,ij->i", p, logs).astype(np.float64)
        total = p.sum(axis=1, dtype=np.float64)
        h = (np.log(total) - plogp / total) / np.log(n_classes)
        valid = np.isfinite(h) & (total >= ENTROPY_MIN_SUM) & (lowest >= 0)
    out: Array = np.where(valid, np.clip(h, 0.0, 1.0), np.nan)
    return out


def _checked_row_max(
    checked: Array, repaired_max: Array, rule: OutputRule, bad_rows: Array | None
) -> Array:
    """Row maxima of the values before repair, from the maxima after it.

    Clipping leaves every value inside (lo, hi) as it was, so a row whose
    repaired maximum lies strictly inside the bounds, and which was not
    renormalised, had that same maximum before. Only the other rows are scanned.
    """
    lo, hi = rule_bounds(checked.dtype, rule)
    flat = repaired_max.ravel()
    rescan = (flat <= lo) | (flat >= hi)
    if bad_rows is not None:
        rescan |= bad_rows
    if not rescan.any():
        return repaired_max
    fixed = flat.copy()
    fixed[rescan] = _rows(checked)[rescan].max(axis=1)
    return fixed.reshape(repaired_max.shape)


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


def longest_label(rule: OutputRule, labels: np.ndarray[Any, Any] | None) -> int:
    """The bytes of ``rule``'s longest label, its abstain label included; 0 without labels."""
    longest = max((len(x) for x in labels.tolist()), default=0) if labels is not None else 0
    if rule.min_confidence is not None:
        longest = max(longest, len(rule.abstain_label.encode("utf-8")))
    return longest


def derived_bytes(
    rule: OutputRule, shape: tuple[int, ...], itemsize: int, labelled: bool, longest: int
) -> int:
    """An upper bound of what ``rule``'s derived outputs for a tensor of
    ``shape`` take, in memory and encoded together, before any is made.

    Per derived value: an int64 class (8 bytes, at most 10 encoded), a score
    (``itemsize``, twice) and a label (a reference, and its bytes with a field
    key and length; ``longest`` is :func:`longest_label`).
    """
    numel = math.prod(shape)
    rows = math.prod(shape[:-1] if len(shape) >= 2 else shape)
    label = 14 + longest if labelled else 0
    ranked = 18 + 2 * itemsize + label
    total = numel * (18 + label) if rule.threshold is not None else 0
    if rule.argmax:
        total += rows * ranked
    return total + rows * rule.top_k * ranked
