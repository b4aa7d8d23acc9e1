"""``guard baseline``: a drift baseline of one output's confidence, as YAML.

From a running guard's ``/metrics`` (or a saved copy): the current
``guard_output_value`` buckets of one model/output. From a validation set:
one value per line, binned with the same edges. Either way it prints
``baseline: {edges: [...], fractions: [...]}`` for the output's rule. No
TensorFlow, no gRPC.

Every input is bounded: at most :data:`VALUES_MAX_BYTES` of values, at most
:data:`METRICS_MAX_BYTES` of exposition, and a download that ends within
:data:`DOWNLOAD_DEADLINE_S`. What is printed is checked as the config loader
checks a rule's ``baseline``, after reading it back as YAML, so a file this
command writes is a file ``guard check`` accepts. A bad input is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import math
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np

from guard.control.validate import BASELINE_BINS_MAX, as_baseline
from guard.control.yamlfile import load_yaml
from guard.dataplane.errors import ConfigError
from guard.metrics.guard_metrics import OUTPUT_VALUE_BUCKETS

__all__ = [
    "DOWNLOAD_DEADLINE_S",
    "METRICS_MAX_BYTES",
    "VALUES_MAX_BYTES",
    "add_arguments",
    "from_metrics",
    "from_values",
    "render",
    "run",
]

_BUCKET = "guard_output_value_bucket"

#: The most bytes ``--values`` may hold (about 8 million numbers).
VALUES_MAX_BYTES = 64 * 1024 * 1024
#: The most bytes of a ``/metrics`` exposition, from ``--metrics-file`` or
#: ``--metrics-url`` (a guard's own is a few hundred KiB).
METRICS_MAX_BYTES = 16 * 1024 * 1024
#: ``--metrics-url`` must have answered in full within this many seconds.
DOWNLOAD_DEADLINE_S = 30.0
# Each socket operation of the download waits at most this long (so the
# download's thread ends soon after the deadline, too).
_READ_TIMEOUT_S = 10.0
_CHUNK = 1 << 16
# Values are binned this many at a time: a list of 8 million Python floats
# would take half a GiB.
_BIN_CHUNK = 1 << 16
# A reason quoted from a parser is cut to this many characters.
_REASON_MAX = 200


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
    output in a /metrics exposition, summed over signatures unless one is given.

    Raises :class:`ConfigError` for text that is not an exposition, and for
    buckets that are not a histogram's: an ``le`` that is not a number, no
    ``+Inf`` bucket, counts that are negative or not cumulative, or
    signatures with different buckets.
    """
    series = _series(text, model, output, signature)
    if not series:
        raise ConfigError(f"no guard_output_value series for model '{model}' output '{output}'")
    (first_key, first), *others = series.items()
    bounds = sorted(first)
    total = _checked_cumulative(first, bounds)
    for key, buckets in others:
        if sorted(buckets) != bounds:
            raise ConfigError(
                f"the series {dict(key)} has other buckets than {dict(first_key)}; "
                "give --signature to take one signature"
            )
        with np.errstate(over="ignore"):
            total = total + _checked_cumulative(buckets, bounds)
    if not np.isfinite(total).all():
        raise ConfigError(
            "the bucket counts summed over the signatures pass what a float holds; "
            "give --signature to take one signature"
        )
    counts = np.diff(np.concatenate(([0.0], total)))
    return tuple(bounds[:-1]), _fractions(counts), int(round(float(counts.sum())))


_Series = dict[tuple[tuple[str, str], ...], dict[float, tuple[str, float]]]


def _series(text: str, model: str, output: str, signature: str | None) -> _Series:
    """The buckets of each series of the output (its labels but ``le``):
    ``{le: (le as written, cumulative count)}``."""
    from prometheus_client.parser import text_string_to_metric_families

    series: _Series = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = s.labels
                if s.name != _BUCKET or labels.get("model") != model:
                    continue
                if labels.get("output") != output:
                    continue
                if signature is not None and labels.get("signature") != signature:
                    continue
                key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                le_text = labels.get("le")
                le = _le(le_text)
                buckets = series.setdefault(key, {})
                if le in buckets:
                    raise ConfigError(f'bucket le="{le_text}" appears twice in one series')
                buckets[le] = (str(le_text), float(s.value))
    except (ValueError, IndexError) as exc:
        why = f" ({_reason(exc)})" if str(exc).strip() else ""
        raise ConfigError(
            f"not a Prometheus text exposition{why}; give a guard's /metrics"
        ) from None
    return series


def _le(text: str | None) -> float:
    if text is None:
        raise ConfigError(f"a {_BUCKET} sample has no 'le' label")
    try:
        le = float(text)
    except ValueError:
        le = math.nan
    if math.isnan(le) or le == -math.inf:
        raise ConfigError(
            f'bucket le="{text}" is not an upper bound: a histogram\'s le are numbers, '
            'the last "+Inf"'
        )
    return le


def _checked_cumulative(buckets: dict[float, tuple[str, float]], bounds: list[float]) -> np.ndarray:
    """The cumulative counts of one series, in the order of ``bounds``."""
    if bounds[-1] != math.inf:
        raise ConfigError(
            'the buckets have no le="+Inf" (all rows); give a whole histogram from /metrics'
        )
    previous_text, previous = None, 0.0
    for le in bounds:
        text, value = buckets[le]
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f'bucket le="{text}" counts {value}: a count is a number >= 0')
        if value < previous:
            raise ConfigError(
                f'bucket le="{text}" counts {value:g}, fewer than le="{previous_text}" '
                f"({previous:g}): a histogram's buckets count cumulatively"
            )
        previous_text, previous = text, value
    return np.array([buckets[le][1] for le in bounds], np.float64)


def from_values(
    values: Iterable[float], edges: Sequence[float] = OUTPUT_VALUE_BUCKETS
) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """(edges, fractions, rows) of values binned like ``guard_output_value``
    (``le``: a value on an edge counts in the bin below it); values that are
    not finite are left out. An iterable is binned a chunk at a time."""
    e = np.asarray(edges, np.float64)
    counts = np.zeros(len(e) + 1, np.float64)
    rows = 0
    for chunk in _chunks(values):
        v = chunk[np.isfinite(chunk)]
        counts += np.bincount(np.searchsorted(e, v, side="left"), minlength=len(e) + 1)
        rows += int(v.size)
    return tuple(float(x) for x in e), _fractions(counts), rows


def _chunks(values: Iterable[float]) -> Iterator[np.ndarray]:
    if isinstance(values, np.ndarray):
        yield np.asarray(values, np.float64).ravel()
        return
    it = iter(values)
    while (chunk := np.fromiter(itertools.islice(it, _BIN_CHUNK), np.float64)).size:
        yield chunk


def _fractions(counts: np.ndarray) -> tuple[float, ...]:
    total = float(counts.sum())
    if total <= 0:
        raise ConfigError("no rows to take a baseline from (every bucket is empty)")
    return tuple(float(c) / total for c in counts)


def _yaml_float(text: str) -> str:
    # PyYAML (YAML 1.1) reads 1e-05 as a string: a float needs a point.
    return text.replace("e", ".0e") if "e" in text and "." not in text else text


def render(edges: Sequence[float], fractions: Sequence[float], comment: str) -> str:
    """The YAML to put under the output's rule. Edges are written exactly
    (shortest round trip), so they load back as the same floats; fractions
    to 6 significant digits."""
    e = ", ".join(_yaml_float(repr(float(x))) for x in edges)
    f = ", ".join(_yaml_float(f"{x:.6g}") for x in fractions)
    return f"# {comment}\nbaseline:\n  edges: [{e}]\n  fractions: [{f}]\n"


def _check_loads(text: str, edges: Sequence[float]) -> None:
    """Raise :class:`ConfigError` unless the rendered YAML is a baseline the
    config loader accepts, with these very edges."""
    if len(edges) > BASELINE_BINS_MAX:
        raise ConfigError(
            f"{len(edges)} bucket edges, more than the {BASELINE_BINS_MAX} a baseline may have"
        )
    try:
        loaded = as_baseline(load_yaml(text)["baseline"])
    except (TypeError, ValueError) as exc:
        reason = f" ({exc})" if str(exc) else ""
        raise ConfigError(
            f"the buckets do not make a baseline the config accepts{reason}: "
            "it needs increasing finite edges and fractions >= 0 summing to 1"
        ) from None
    if loaded[0] != tuple(float(x) for x in edges):
        raise ConfigError("the edges do not read back as written")


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def _read_limited(
    f: _Readable, max_bytes: int, what: str, stop: threading.Event | None = None
) -> bytes:
    """At most ``max_bytes`` from ``f``, a chunk at a time; more is a
    :class:`ConfigError`. ``read1`` where there is one: a reply that arrives a
    byte at a time returns each byte, rather than blocking for a whole chunk."""
    read = getattr(f, "read1", f.read)
    parts: list[bytes] = []
    size = 0
    while True:
        if stop is not None and stop.is_set():
            raise ConfigError(f"{what}: stopped")
        part = read(_CHUNK)
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > max_bytes:
            raise ConfigError(
                f"{what} is larger than the {_mib(max_bytes)} limit; give at most {_mib(max_bytes)}"
            )
        parts.append(part)


def _download(url: str, max_bytes: int, deadline_s: float) -> bytes:
    """The body at ``url``, at most ``max_bytes``, complete within ``deadline_s``.

    A socket timeout bounds each read, not the whole: a server sending a byte
    a second would never be done. The download runs in a daemon thread that
    this one waits for until the deadline (it stops at its next read after).
    """
    got: list[bytes] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def fetch() -> None:
        try:
            timeout = min(_READ_TIMEOUT_S, deadline_s)
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
                got.append(_read_limited(resp, max_bytes, f"--metrics-url {url}", stop))
        except Exception as exc:  # handed to the waiting thread
            failed.append(exc)

    worker = threading.Thread(target=fetch, name="guard-baseline-download", daemon=True)
    worker.start()
    worker.join(deadline_s)
    what = f"--metrics-url {url}"
    if worker.is_alive():
        stop.set()
        raise ConfigError(
            f"{what}: no complete reply within {deadline_s:g} s; give a guard's /metrics "
            "that answers, or save it and use --metrics-file"
        )
    if not failed:
        return got[0]
    exc = failed[0]
    if isinstance(exc, ConfigError):
        raise exc
    if isinstance(exc, urllib.error.HTTPError):
        exc.close()  # it holds the reply's socket
        raise ConfigError(f"{what}: HTTP {exc.code} {_reason(exc.reason)}") from None
    if isinstance(exc, urllib.error.URLError):
        raise ConfigError(f"{what}: {_reason(exc.reason)}; give a guard's /metrics") from None
    if isinstance(exc, (OSError, http.client.HTTPException)):
        raise ConfigError(f"{what}: {type(exc).__name__} {_reason(exc)}".rstrip()) from None
    if isinstance(exc, ValueError):  # not a URL urllib can open
        raise ConfigError(f"{what}: {_reason(exc)}") from None
    raise exc


def _read_file(path: Path, max_bytes: int, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return _read_limited(f, max_bytes, f"{flag} {path}")
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or _reason(exc)}") from None


def _text(data: bytes, what: str, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise ConfigError(
            f"{what} line {line}: byte {data[exc.start]:#04x} is not UTF-8 text; give a text file"
        ) from None


def _read_values(path: Path) -> Iterator[float]:
    """The numbers of ``--values``, one per line (blank lines skipped)."""
    what = f"--values {path}"
    data = _read_file(path, VALUES_MAX_BYTES, "--values")
    for i, raw in enumerate(io.BytesIO(data), 1):
        line = _text(raw, what, i)
        if not line.strip():
            continue
        try:
            yield float(line)
        except ValueError:
            shown = line.strip()[:_REASON_MAX]
            raise ConfigError(
                f"{what} line {i}: {shown!r} is not a number; give one number per line"
            ) from None


def _reason(exc: object) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."


def _mib(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"


def _take(args: argparse.Namespace) -> tuple[tuple[float, ...], tuple[float, ...], int, str]:
    if args.values is not None:
        given = [f"--{n}" for n in ("model", "output", "signature") if getattr(args, n)]
        if given:  # they select a series of /metrics; values are one output's already
            raise ConfigError(f"{', '.join(given)} apply to --metrics-url/--metrics-file only")
        edges, fractions, rows = from_values(_read_values(args.values))
        return edges, fractions, rows, f"{args.values}"
    if not (args.model and args.output):
        raise ConfigError("--metrics-url/--metrics-file need --model and --output")
    if args.metrics_url:
        source = f"--metrics-url {args.metrics_url}"
        data = _download(args.metrics_url, METRICS_MAX_BYTES, DOWNLOAD_DEADLINE_S)
    else:
        source = f"--metrics-file {args.metrics_file}"
        data = _read_file(args.metrics_file, METRICS_MAX_BYTES, "--metrics-file")
    text = _text(data, source)
    try:
        edges, fractions, rows = from_metrics(text, args.model, args.output, args.signature)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return edges, fractions, rows, f"model '{args.model}' output '{args.output}'"


def run(args: argparse.Namespace) -> int:
    """Write the baseline; exit 2, with one line on stderr, when there is
    nothing to take it from or the input is not what it should be."""
    try:
        edges, fractions, rows, what = _take(args)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = render(edges, fractions, f"guard baseline: {what}, {rows} rows, {stamp}")
        _check_loads(text, edges)
        if args.out is not None:
            try:
                args.out.write_text(text)
            except OSError as exc:
                raise ConfigError(f"--out {args.out}: {exc.strerror or _reason(exc)}") from None
        else:
            sys.stdout.write(text)
    except ConfigError as exc:
        print(f"guard baseline: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
