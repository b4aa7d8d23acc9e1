"""Fuzz the REST front-end's data plane with atheris: the request peek, and a
REST predict response read, guarded and rewritten.

Run: ``python -m tests.fuzz.fuzz_rest -max_total_time=60`` (``make fuzz``), after
``pip install atheris``.

The first input byte selects a rule set, the format (row or columnar) and
whether the model's metadata names its one output, and how; the rest is the response
body (and, separately, a request body for the peek). Any exception other than
a :class:`GuardError` is a crash, and so is a numpy warning. The native scan
must read every body as the numpy reference does; the native routes must
guard it as the reference kernels do (the same bytes, action and violations,
or the same error); a guarded body must read again as a response of the same
format; a peek must agree with ``json.loads``
on every body that parses as a JSON object.

:func:`one_input` needs no atheris; ``tests/server/test_rest_fuzz.py`` runs it
over hypothesis-generated inputs.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

_instrument: Any = contextlib.nullcontext()
if __name__ == "__main__":
    import atheris

    _instrument = atheris.instrument_imports(include=["guard"])

with _instrument:
    from guard.control.config import parse_config
    from guard.dataplane.book import RuleBook
    from guard.dataplane.codec.restjson import Format, RestJsonError, read_predict_response
    from guard.dataplane.errors import GuardError
    from guard.dataplane.kernels import REFERENCE, default
    from guard.metrics.guard_metrics import GuardMetrics
    from guard.server.rest.guarding import RestRequest, guard_rest_response
    from guard.server.rest.peek import peek_request
    from guard.server.rest.signatures import Metadata, OutputInfo
    from tests.fuzz.fuzz_wire import _RULE_SETS

__all__ = ["main", "one_input", "seeds"]

_CONFIGS = [parse_config({"max_message_mb": 1, "models": m}, source="<fuzz>") for m in _RULE_SETS]
_BOOKS = [RuleBook(c.models, c.max_message_bytes) for c in _CONFIGS]
# The same rules, never on the native route (plans, lanes, the scan-only route).
_REFERENCE_BOOKS = [RuleBook(c.models, c.max_message_bytes, REFERENCE) for c in _CONFIGS]
_metrics = GuardMetrics(CollectorRegistry(), model_names=["fuzz"], max_class_label_values=5)
_reference_metrics = GuardMetrics(
    CollectorRegistry(), model_names=["fuzz"], max_class_label_values=5
)
_NAMED = Metadata(1, {"serving_default": {"out1": OutputInfo("DT_FLOAT", None)}})
# An output only the "*" rules match (thresholds on one column: the scan-only route).
_OTHER = Metadata(1, {"serving_default": {"out2": OutputInfo("DT_FLOAT", None)}})
_UNKNOWN = Metadata(problem="fuzz: no metadata")
_NATIVE_SCAN = default().number_scan
_NATIVE_PEEK = default().request_peek
_NATIVE_SKIP = default().value_skip


def _check_peek(body: bytes) -> None:
    found = peek_request(body)
    if _NATIVE_PEEK is not None:  # the native peek reads what the reference reads
        assert peek_request(body, _NATIVE_PEEK) == found
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return
    if isinstance(doc, dict) and found.complete and len(body) < 1 << 16:
        signature = doc.get("signature_name")
        # json.loads keeps the last of duplicated keys, the peek may stop at the first.
        if body.count(b"signature_name") <= 1:
            assert found.signature == (signature if isinstance(signature, str) else None)


def _read(body: bytes, fmt: Format, native: bool) -> Any:
    """What the read makes of ``body``: each output's kind, values' bits and
    token offsets, or a refusal (of malformed text, the first fault found may
    differ, and so the message)."""
    try:
        read = read_predict_response(
            body,
            fmt,
            _NATIVE_SCAN if native else None,
            skip=_NATIVE_SKIP if native else None,
        )
    except (RestJsonError, RecursionError):
        return "refused"
    out = {}
    for key, output in read.outputs.items():
        values = output.values
        if values.dtype.kind == "f":
            values = np.where(np.isnan(values), np.nan, values)  # every NaN alike
        where = read._where[key]
        starts = None if where.starts is None else where.starts.tolist()
        data = values.tobytes() if values.dtype.kind != "O" else values.tolist()
        out[key] = (output.kind, values.dtype.str, values.shape, data, starts)
    return out


def _check_native_read(body: bytes, fmt: Format) -> None:
    """The native scan reads a body as the numpy reference does."""
    if _NATIVE_SCAN is not None:
        assert _read(body, fmt, True) == _read(body, fmt, False)


def _guarded(body: bytes, request: RestRequest, book: RuleBook, metrics: GuardMetrics) -> Any:
    """What guarding ``body`` gives: the body, action and violations, or the
    error's type (of malformed text, the first fault found may differ, and
    so the message)."""
    try:
        found = guard_rest_response(body, request, book, metrics)
    except GuardError as exc:
        return type(exc)
    return None if found is None else (found.body, found.action, found.violations)


def one_input(data: bytes) -> None:
    """Run one fuzz input; raises on anything but a :class:`GuardError`."""
    if not data:
        return
    selector, body = data[0], data[1:]
    fmt: Format = "columnar" if selector & 0x40 else "row"
    metadata = _UNKNOWN if selector & 0x80 else _OTHER if selector & 0x20 else _NAMED
    request = RestRequest("fuzz", "", fmt, metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_peek(body)
        _check_native_read(body, fmt)
        book = selector % len(_BOOKS)
        # Twice natively: the second may be answered from the scan alone.
        found = [_guarded(body, request, _BOOKS[book], _metrics) for _ in range(2)]
        reference = _guarded(body, request, _REFERENCE_BOOKS[book], _reference_metrics)
        assert found[0] == found[1] == reference
        if isinstance(reference, tuple) and reference[0] != body:
            read_predict_response(reference[0], fmt)  # what we wrote reads again


def seeds() -> list[bytes]:
    """Responses in both formats, one and several outputs, NaN/Infinity and strings."""
    from guard.dev.backend.json_tensor import predict_response

    special = np.array([[0.2, 1.5], [np.nan, -np.inf]], dtype=np.float32)
    plain = np.array([[0.2, 1.5], [0.7, -0.25], [0.5, 0.5]], dtype=np.float32)
    column = np.array([[0.7], [0.2], [0.9]], dtype=np.float32)
    outputs = [[("out1", np.array([[b"a"], [b"b"]], dtype=object), 7)]]
    for values in (special, plain, column, column[:1]):
        outputs.append([("out1", values, 1)])
        outputs.append([("out1", values, 1), ("out0", values[:, :1].astype(np.float64), 2)])
    out: list[bytes] = []
    for selected in outputs:
        for fmt, bit in (("row", 0), ("columnar", 0x40)):
            body = predict_response(selected, fmt)  # type: ignore[arg-type]
            selectors = [bit | extra for extra in (0, 1, 2, 0x80)]
            # Every rule set on an output only the "*" rules match.
            selectors += [s for s in range(256) if s & 0xE0 == bit | 0x20][: len(_BOOKS)]
            out.extend(bytes([selector]) + body for selector in selectors)
    return out


def main(argv: list[str] | None = None) -> None:
    """Start libFuzzer on :func:`one_input` (arguments are libFuzzer's)."""
    import atheris

    args = list(sys.argv if argv is None else argv)
    if all(a.startswith("-") for a in args[1:]):
        corpus = Path(tempfile.mkdtemp(prefix="fuzz_rest_corpus_"))
        for i, seed in enumerate(seeds()):
            (corpus / f"seed{i:03d}").write_bytes(seed)
        args.append(str(corpus))
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
