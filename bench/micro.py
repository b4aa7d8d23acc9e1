"""Post-processing micro-benchmarks: what one response costs to guard.

For each shape (rows x classes) and encoding (``float_val``, ``tensor_content``),
the same rule set (check_sum + clamp + argmax + top_k + labels, and each row's
entropy, which a multi-class rule measures by default) runs three ways:

- **naive**: the official message classes: ``PredictResponse.FromString`` ->
  ``np.array(tensor.float_val)`` (or ``np.frombuffer(tensor_content)``, which is
  what ``tf.make_ndarray`` does) -> the math -> write values and derived outputs
  back with the official classes -> ``SerializeToString``;
- **floor**: the pure numpy math on an already-decoded array, no protobuf at all;
- **guard**: ``guard.dataplane.pipeline.guard_predict_response`` on the response bytes, the
  function the proxy calls (it includes recording the metrics).

The responses are valid softmax rows, so the guard's work is: decode, check,
derive, encode the derived outputs. A ``threshold`` case is binary_mlp's rule
instead (examples/guard.yaml): [rows, 1] probabilities, range check, class
``p > 0.5`` and its label. ``python -m bench.micro [--quick]``
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench import payloads

SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (64, 10), (1024, 201), (4096, 1000))
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (64, 10), (256, 201))
LO, HI, TOLERANCE, TOP_K = 0.0, 1.0, 1e-3, 5
OUTPUT = "probabilities"
THRESHOLD, BINARY_LABELS = 0.5, ("negative", "positive")
MIN_CONFIDENCE, ABSTAIN_LABEL = 0.5, "unknown"


@dataclass(frozen=True)
class Case:
    """One shape in one encoding, with its rule parameters."""

    rows: int
    classes: int
    encoding: str
    threshold: bool = False
    """binary_mlp's threshold rule instead of the softmax ranking."""
    repair: bool = False
    """1 % of the values above 1.0, clamped (no sum check: the rows are repaired
    value by value, not renormalised)."""
    softmax: bool = False
    """Logits, with the softmax activation before the checks."""
    renormalise: bool = False
    """With ``repair``: the sum is checked too, so each row with a value above
    1.0 is clamped and then renormalised (it sums to more than 1 after the clamp)."""
    abstain: bool = False
    """Every other row near uniform, as an untrained model's (seed 003), under
    ``min_confidence``: those rows abstain (class -1, the abstain label)."""

    @property
    def k(self) -> int:
        """top_k, capped at the number of classes."""
        return min(TOP_K, self.classes)

    @property
    def label(self) -> str:
        """Human-readable name."""
        kind = " threshold" * self.threshold + " repair" * self.repair + " softmax" * self.softmax
        kind += " renormalise" * self.renormalise + " abstain" * self.abstain
        return f"{self.rows}x{self.classes} {self.encoding}{kind}"


def model_for(case: Case) -> payloads.CannedModel:
    """The canned model a case's response claims to come from."""
    return payloads.CannedModel(
        name="micro", batch=case.rows, classes=case.classes, encoding=case.encoding,
        output_name=OUTPUT,
    )  # fmt: skip


def response_bytes(case: Case) -> bytes:
    """The case's PredictResponse, built with the official classes."""
    model = model_for(case)
    return payloads.predict_response_for(model, values_for(case))


def values_for(case: Case) -> np.ndarray:
    """Valid softmax rows for the case (probabilities in [0, 1] for a threshold)."""
    seed = case.rows * 7 + case.classes
    rng = np.random.default_rng(seed)
    if case.threshold:
        return rng.uniform(0.0, 1.0, (case.rows, case.classes)).astype(np.float32)
    if case.softmax:
        return rng.normal(0.0, 2.0, (case.rows, case.classes)).astype(np.float32)
    values = payloads.softmax_rows(case.rows, case.classes, seed=seed)
    if case.abstain:
        values[::2] = rng.dirichlet(np.full(case.classes, 1000.0), values[::2].shape[0])
    if case.repair:
        flat = values.reshape(-1)
        count = max(1, flat.size // 100)
        flat[rng.choice(flat.size, count, replace=False)] = rng.uniform(1.001, 1.1, count)
    return values


def label_table(classes: int) -> np.ndarray:
    """Labels as an object array of bytes (for fancy indexing)."""
    return np.array([s.encode() for s in payloads.labels(classes)], dtype=object)


def case_labels(case: Case) -> np.ndarray:
    """The case's labels: one per class, or a threshold's two."""
    if case.threshold:
        return np.array([s.encode() for s in BINARY_LABELS], dtype=object)
    if case.abstain:  # class -1 indexes the abstain label, last
        return np.append(label_table(case.classes), np.array([ABSTAIN_LABEL.encode()], object))
    return label_table(case.classes)


# --- (ii) the floor: pure numpy on a decoded array ---------------------------------------


def top_k(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best classes per row, best first, ties to the lower index.

    For small k, k rounds of argmax are several times faster than argpartition
    along the last axis (numpy's per-row introselect), hence this and not that.
    """
    work = rows.reshape(-1, rows.shape[-1]).copy()
    index = np.arange(work.shape[0])
    classes = np.empty((work.shape[0], k), dtype=np.int64)
    scores = np.empty((work.shape[0], k), dtype=rows.dtype)
    for j in range(k):
        best = work.argmax(axis=-1)
        classes[:, j] = best
        scores[:, j] = work[index, best]
        work[index, best] = -np.inf
    lead = rows.shape[:-1]
    return classes.reshape(*lead, k), scores.reshape(*lead, k)


def floor_math(
    values: np.ndarray, k: int, labels: np.ndarray, renormalise: bool = False
) -> dict[str, Any]:
    """Check (range, NaN/Inf, row sums), clip (and with ``renormalise``, divide
    each row still off its sum by its peak, then by its sum), argmax, top-k,
    label lookup, and each row's normalised entropy (-sum(p ln p) / ln C, zeros
    counting 0)."""
    nan = int(np.count_nonzero(np.isnan(values)))
    below = int(np.count_nonzero(values < LO))
    above = int(np.count_nonzero(values > HI))
    bad_rows = int(np.count_nonzero(np.abs(values.sum(axis=-1) - 1.0) > TOLERANCE))
    clipped = np.clip(values, LO, HI)
    if renormalise:
        off = np.abs(clipped.sum(axis=-1, dtype=np.float64) - 1.0) > TOLERANCE
        fix = clipped[off].astype(np.float64)
        fix /= fix.max(axis=-1, keepdims=True)
        clipped[off] = (fix / fix.sum(axis=-1, keepdims=True)).astype(clipped.dtype)
    cls = clipped.argmax(axis=-1)
    score = np.take_along_axis(clipped, cls[..., None], axis=-1)[..., 0]
    top_cls, top_score = top_k(clipped, k)
    entropy = None
    if values.shape[-1] >= 2:  # one class has no entropy (and ln 1 is 0): the guard skips it
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.einsum("ij,ij->i", values, np.log(values))
        entropy = -plogp / np.log(values.shape[-1])
    return {
        "counts": (nan, below, above, bad_rows),
        "entropy": entropy,
        "values": clipped,
        "class": cls.astype(np.int64),
        "score": score,
        "label": labels[cls],
        "top_k_class": top_cls.astype(np.int64),
        "top_k_score": top_score,
        "top_k_label": labels[top_cls],
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Each row's softmax, shifted by its maximum."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def case_math(case: Case, labels: np.ndarray) -> Callable[[np.ndarray], dict[str, Any]]:
    """The floor's math for the case."""
    if case.threshold:
        return lambda v: threshold_math(v, labels)
    if case.softmax:
        return lambda v: floor_math(softmax(v), case.k, labels)
    if case.abstain:
        return lambda v: abstaining_math(v, case.k, labels)
    return lambda v: floor_math(v, case.k, labels, case.renormalise)


def abstaining_math(values: np.ndarray, k: int, labels: np.ndarray) -> dict[str, Any]:
    """:func:`floor_math`, then each row whose best score is below
    MIN_CONFIDENCE abstains: class -1 (first of its top k too), whose label is
    the last of ``labels``."""
    out = floor_math(values, k, labels[:-1])
    unsure = ~(out["score"] >= MIN_CONFIDENCE)
    out["class"] = np.where(unsure, -1, out["class"])
    top = out["top_k_class"].copy()
    top[unsure, 0] = -1
    out["top_k_class"], out["label"], out["top_k_label"] = top, labels[out["class"]], labels[top]
    return out


def threshold_math(values: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Check (range, NaN/Inf), then each value's class ``p > 0.5`` and label."""
    nan = int(np.count_nonzero(np.isnan(values)))
    below = int(np.count_nonzero(values < LO))
    above = int(np.count_nonzero(values > HI))
    cls = (values > THRESHOLD).astype(np.int64)
    return {"counts": (nan, below, above), "values": values, "class": cls, "label": labels[cls]}


def derived_suffixes(case: Case) -> tuple[str, ...]:
    """The derived outputs the case's rule adds."""
    if case.threshold:
        return ("class", "label")
    return ("class", "score", "label", "top_k_class", "top_k_score", "top_k_label")


# --- (i) naive: the official message classes -----------------------------------------------


def naive_path(case: Case, labels: np.ndarray) -> Callable[[bytes], bytes]:
    """Decode, compute and re-encode with the official TF Serving classes."""
    math = case_math(case, labels)
    pb = payloads.official_protos()
    response_cls = pb.predict_pb2.PredictResponse
    dt_float, dt_int64, dt_string = (pb.types_pb2.DT_FLOAT, pb.types_pb2.DT_INT64,
                                     pb.types_pb2.DT_STRING)  # fmt: skip

    def put(tensor: Any, array: np.ndarray, content: bool) -> None:
        tensor.tensor_shape.Clear()
        for size in array.shape:
            tensor.tensor_shape.dim.add(size=size)
        if array.dtype == object:
            tensor.dtype = dt_string
            tensor.string_val.extend(array.ravel().tolist())
        elif array.dtype == np.int64:
            tensor.dtype = dt_int64
            if content:
                tensor.tensor_content = array.tobytes()
            else:
                tensor.int64_val.extend(array.ravel().tolist())
        else:
            tensor.dtype = dt_float
            if content:
                tensor.tensor_content = array.astype(np.float32).tobytes()
            else:
                del tensor.float_val[:]
                tensor.float_val.extend(array.ravel().tolist())

    def run(body: bytes) -> bytes:
        response = response_cls.FromString(body)
        tensor = response.outputs[OUTPUT]
        shape = [d.size for d in tensor.tensor_shape.dim]
        content = bool(tensor.tensor_content)
        if content:
            values = np.frombuffer(tensor.tensor_content, dtype=np.float32).reshape(shape).copy()
        else:
            values = np.array(tensor.float_val, dtype=np.float32).reshape(shape)
        result = math(values)
        if not case.threshold:  # a threshold observes: the values stay as they are
            put(tensor, result["values"], content)
        for suffix in derived_suffixes(case):
            put(response.outputs[f"{OUTPUT}_{suffix}"], result[suffix], content)
        return bytes(response.SerializeToString())

    return run


# --- (iii) the guard's own path ----------------------------------------------------------------


def rule_document(case: Case) -> dict[str, Any]:
    """The guard config (as parsed YAML) for one case."""
    if case.threshold:
        output = {"name": OUTPUT, "valid_range": [LO, HI], "on_violation": "observe",
                  "threshold": THRESHOLD, "labels": list(BINARY_LABELS)}  # fmt: skip
        return {"models": [{"name": "micro", "outputs": [output]}]}
    output = {
        "name": OUTPUT,
        "valid_range": [LO, HI],
        "check_sum": not case.repair or case.renormalise,
        "sum_tolerance": TOLERANCE,
        "on_violation": "clamp",
        "argmax": True,
        "top_k": case.k,
        "labels": payloads.labels(case.classes),
    }
    if case.softmax:
        output["activation"] = "softmax"
    if case.abstain:
        output |= {"min_confidence": MIN_CONFIDENCE, "abstain_label": ABSTAIN_LABEL}
    return {"models": [{"name": "micro", "outputs": [output]}]}


def guard_path(case: Case, native: bool = True) -> Callable[[bytes], bytes] | None:
    """The guard's response function with the case's rules, or None if it is
    missing; ``native=False`` runs it on the reference kernels (numpy and
    protobuf alone)."""
    try:
        from prometheus_client import CollectorRegistry

        from guard.control.config import parse_config
        from guard.dataplane import kernels
        from guard.dataplane.book import RuleBook
        from guard.dataplane.pipeline import guard_predict_response
        from guard.metrics.guard_metrics import GuardMetrics
    except ImportError:
        return None
    config = parse_config(rule_document(case), "<bench.micro>")
    chosen = kernels.default() if native else kernels.REFERENCE
    book = RuleBook(config.models, config.max_message_bytes, chosen)
    metrics = GuardMetrics(
        CollectorRegistry(),
        config.model_names(),
        getattr(config, "max_class_label_values", 100),
    )

    def run(body: bytes) -> bytes:
        guarded = guard_predict_response(body, None, book, metrics)
        return body if guarded is None else guarded.body

    return run


# --- timing ---------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call time in microseconds over repeated timing loops."""

    median_us: float
    min_us: float
    max_us: float
    loops: int
    repeats: int


def time_call(fn: Callable[[Any], Any], arg: Any, budget_s: float, repeats: int = 5) -> Timing:
    """Time ``fn(arg)``: calibrate a loop count to ``budget_s / repeats``, repeat."""
    fn(arg)  # warm caches and lazy setup
    start = time.perf_counter()
    fn(arg)
    one = max(time.perf_counter() - start, 1e-7)
    loops = max(1, int(budget_s / repeats / one))
    per_call: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn(arg)
        per_call.append((time.perf_counter() - start) / loops * 1e6)
    return Timing(float(np.median(per_call)), min(per_call), max(per_call), loops, repeats)


def check_same_answer(case: Case, guard_out: bytes, naive_out: bytes) -> None:
    """The guard and the naive path must agree on the derived outputs."""
    pb = payloads.official_protos()
    g = pb.predict_pb2.PredictResponse.FromString(guard_out)
    n = pb.predict_pb2.PredictResponse.FromString(naive_out)
    for suffix in ("class", "label") + ("top_k_class", "top_k_label") * (not case.threshold):
        name = f"{OUTPUT}_{suffix}"
        if name not in g.outputs:
            raise AssertionError(f"{case.label}: the guard did not add {name}")
        gv = list(g.outputs[name].int64_val or g.outputs[name].string_val)
        nv = list(n.outputs[name].int64_val or n.outputs[name].string_val)
        if g.outputs[name].tensor_content:
            gv = np.frombuffer(g.outputs[name].tensor_content, np.int64).tolist()
            nv = np.frombuffer(n.outputs[name].tensor_content, np.int64).tolist()
        if gv != nv:
            raise AssertionError(f"{case.label}: guard and naive disagree on {name}")


def run_case(case: Case, budget_s: float, native: bool = True) -> dict[str, Any]:
    """Time the three paths on one case (the guard's on the native or the
    reference kernels)."""
    body = response_bytes(case)
    labels = case_labels(case)
    values = values_for(case)
    naive = naive_path(case, labels)
    floor = case_math(case, labels)
    out: dict[str, Any] = {
        "shape": f"{case.rows}x{case.classes}",
        "encoding": case.encoding,
        "response_bytes": len(body),
        "naive": asdict(time_call(naive, body, budget_s)),
        "floor": asdict(time_call(floor, values, budget_s)),
        "guard": None,
    }
    guard = guard_path(case, native=native)
    if guard is not None:
        check_same_answer(case, guard(body), naive(body))
        out["guard"] = asdict(time_call(guard, body, budget_s))
        g = out["guard"]["median_us"]
        out["guard_vs_floor"] = g / out["floor"]["median_us"]
        out["naive_vs_guard"] = out["naive"]["median_us"] / g
    return out


def same_allocator_as_guard() -> None:
    """``guard serve`` tunes glibc's malloc at start (guard.control.memory.tune_malloc); time
    the naive path, the floor and the guard under that same setting."""
    try:
        from guard.control.memory import tune_malloc
    except ImportError:
        return
    tune_malloc()


def core_target(budget_s: float) -> dict[str, Any] | None:
    """Issue 2's figure: a 1024x201 float_val response through decode + softmax
    (sum) check + clamp + argmax + encode. One row in eight leaks above 1, so the
    clamp really repairs and the tensor is re-encoded, not passed through."""
    case = Case(1024, 201, "float_val")
    values = values_for(case).copy()
    values[::8, 0] += 0.01  # over 1 in the largest entry's row sum, and maybe > 1
    values[::8, 1] = 1.002850
    body = payloads.predict_response_for(model_for(case), values)
    doc = {"models": [{"name": "micro", "outputs": [{
        "name": OUTPUT, "valid_range": [LO, HI], "check_sum": True,
        "sum_tolerance": TOLERANCE, "on_violation": "clamp", "argmax": True,
    }]}]}  # fmt: skip
    try:
        from prometheus_client import CollectorRegistry

        from guard.control.config import parse_config
        from guard.dataplane import rules
        from guard.dataplane.book import RuleBook
        from guard.dataplane.codec.response import parse_predict_response
        from guard.dataplane.codec.tensor import decode_tensor, set_tensor
        from guard.dataplane.pipeline import guard_predict_response
        from guard.dataplane.results import Action
        from guard.metrics.guard_metrics import GuardMetrics
    except ImportError:
        return None

    config = parse_config(doc, "<bench.micro core target>")
    book = RuleBook(config.models, config.max_message_bytes)
    metrics = GuardMetrics(CollectorRegistry(), config.model_names())
    first = guard_predict_response(body, None, book, metrics)
    assert first is not None and first.action == Action.CLAMPED, "the core target must clamp"
    compiled = book.for_signature("micro", "serving_default")
    assert compiled is not None
    rule = compiled.rule_for(OUTPUT)
    assert rule is not None

    def engine(b: bytes) -> bytes:
        """Exactly the issue's scope: decode, check, clamp, argmax, encode."""
        view = parse_predict_response(b)
        tensor = view.outputs[OUTPUT]
        decoded = decode_tensor(tensor, config.max_message_bytes)
        assert decoded is not None
        values, encoding = decoded
        result = rules.apply_rule(values, rule.rule, rule.labels, "micro", OUTPUT)
        set_tensor(tensor, result.values, encoding)
        for derived in result.derived:
            set_tensor(view.outputs[OUTPUT + derived.suffix], derived.array, encoding)
        out: bytes = view.SerializeToString()
        return out

    with_metrics = time_call(
        lambda b: guard_predict_response(b, None, book, metrics), body, budget_s
    )
    return {
        "case": "1024x201 float_val, check_sum + clamp + argmax",
        **asdict(time_call(engine, body, budget_s)),
        "with_metrics": asdict(with_metrics),
    }


def run_all(quick: bool = False, shapes: tuple[tuple[int, int], ...] | None = None,
            budget_s: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Every shape x encoding; returns the results as plain data."""
    same_allocator_as_guard()
    chosen = shapes or (QUICK_SHAPES if quick else SHAPES)
    budget = budget_s if budget_s is not None else (0.1 if quick else 1.0)
    cases = [Case(r, c, enc) for r, c in chosen for enc in payloads.ENCODINGS]
    return {
        "budget_s_per_path": budget,
        "guard_available": guard_path(cases[0]) is not None,
        "cases": [run_case(case, budget) for case in cases],
        "core_target": None if quick else core_target(budget),
    }


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the results."""
    lines = [f"{'case':28} {'naive us':>10} {'floor us':>10} {'guard us':>10} "
             f"{'guard/floor':>11} {'naive/guard':>11}"]  # fmt: skip
    for c in results["cases"]:
        g = c["guard"]["median_us"] if c["guard"] else float("nan")
        lines.append(
            f"{c['shape'] + ' ' + c['encoding']:28} {c['naive']['median_us']:10.1f} "
            f"{c['floor']['median_us']:10.1f} {g:10.1f} "
            f"{c.get('guard_vs_floor', float('nan')):11.2f} "
            f"{c.get('naive_vs_guard', float('nan')):11.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget", type=float, help="seconds of timing per path and case")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    results = run_all(args.quick, budget_s=args.budget)
    print(json.dumps(results, indent=1) if args.json else format_table(results))


if __name__ == "__main__":
    main()
