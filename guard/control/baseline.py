"""``guard baseline``: a drift baseline of one output's confidence, as YAML.

From a running guard's ``/metrics`` (or a saved copy): the current
``guard_output_value`` buckets of one model/output. From a validation set:
one value per line, binned with the same edges. Either way it prints
``baseline: {edges: [...], fractions: [...]}`` for the output's rule. No
TensorFlow, no gRPC.
"""

from __future__ import annotations

import argparse
import math
import sys
import urllib.request
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from guard.dataplane.errors import ConfigError
from guard.metrics.guard_metrics import OUTPUT_VALUE_BUCKETS

__all__ = ["add_arguments", "from_metrics", "from_values", "render", "run"]

_BUCKET = "guard_output_value_bucket"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``guard baseline``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--metrics-url", help="a guard's /metrics, e.g. http://127.0.0.1:9102/metrics"
    )
    source.add_argument("--metrics-file", type=Path, help="a saved copy of /metrics")
    source.add_argument("--values", type=Path, help="confidences, one number per line")
    parser.add_argument("--model", help="model name (with --metrics-*)")
    parser.add_argument("--output", help="output name (with --metrics-*)")
    parser.add_argument("--signature", help="signature (default: every signature, summed)")
    parser.add_argument("--out", type=Path, help="write the YAML here (default: stdout)")


def from_metrics(
    text: str, model: str, output: str, signature: str | None = None
) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """(edges, fractions, rows) of the ``guard_output_value`` buckets of one
    output in a /metrics exposition, summed over signatures unless one is given."""
    from prometheus_client.parser import text_string_to_metric_families

    cumulative: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name != _BUCKET or labels.get("model") != model:
                continue
            if labels.get("output") != output:
                continue
            if signature is not None and labels.get("signature") != signature:
                continue
            le = float(labels["le"])
            cumulative[le] = cumulative.get(le, 0.0) + s.value
    if not cumulative:
        raise ConfigError(f"no guard_output_value series for model '{model}' output '{output}'")
    bounds = sorted(cumulative)
    counts = np.diff(np.array([0.0] + [cumulative[b] for b in bounds]))
    edges = tuple(b for b in bounds if math.isfinite(b))
    return edges, _fractions(counts), int(counts.sum())


def from_values(
    values: Iterable[float], edges: Sequence[float] = OUTPUT_VALUE_BUCKETS
) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """(edges, fractions, rows) of values binned like ``guard_output_value``
    (``le``: a value on an edge counts in the bin below it)."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    idx = np.searchsorted(np.asarray(edges, np.float64), v, side="left")
    counts = np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)
    return tuple(float(e) for e in edges), _fractions(counts), int(v.size)


def _fractions(counts: np.ndarray) -> tuple[float, ...]:
    total = float(counts.sum())
    if total <= 0:
        raise ConfigError("no rows to take a baseline from (every bucket is empty)")
    return tuple(float(c) / total for c in counts)


def render(edges: Sequence[float], fractions: Sequence[float], comment: str) -> str:
    """The YAML to put under the output's rule."""
    e = ", ".join(f"{x:g}" for x in edges)
    f = ", ".join(f"{x:.6g}" for x in fractions)
    return f"# {comment}\nbaseline:\n  edges: [{e}]\n  fractions: [{f}]\n"


def _read_values(path: Path) -> list[float]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(float(line))
            except ValueError:
                raise ConfigError(f"{path} line {i}: {line.strip()!r} is not a number") from None
    return out


def run(args: argparse.Namespace) -> int:
    """Write the baseline; exit 2 when there is nothing to take it from."""
    try:
        if args.values is not None:
            edges, fractions, rows = from_values(_read_values(args.values))
            what = f"{args.values}"
        else:
            if not (args.model and args.output):
                raise ConfigError("--metrics-url/--metrics-file need --model and --output")
            if args.metrics_url:
                with urllib.request.urlopen(args.metrics_url, timeout=10) as resp:  # noqa: S310
                    text = resp.read().decode("utf-8")
            else:
                text = args.metrics_file.read_text()
            edges, fractions, rows = from_metrics(text, args.model, args.output, args.signature)
            what = f"model '{args.model}' output '{args.output}'"
    except (ConfigError, OSError) as exc:
        print(f"guard baseline: {exc}", file=sys.stderr)
        return 2
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = render(edges, fractions, f"guard baseline: {what}, {rows} rows, {stamp}")
    if args.out is not None:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0
