"""Fuzz the response decoder, the rule engine and the encoder with atheris.

Run: ``python -m tests.fuzz.fuzz_wire -max_total_time=60`` (``make fuzz``), after
``pip install atheris``. Any libFuzzer flag works (``-runs=N``, ``-max_len=N``,
a corpus directory).

The first input byte selects a rule set and a framing: with its top bit set, the
rest is wrapped as a TensorProto under an output name, so the fuzzer reaches
the tensor decoder without first having to discover the map-entry framing.

Every input goes through the whole data plane (:func:`guard_predict_response`:
parse, decode with the typed fallback, rules, metrics, set_tensor, serialize)
and through the bare codec path (decode_tensor, apply_rule, set_tensor,
SerializeToString). Any exception other than a :class:`GuardError` is a crash,
and so is a numpy warning (the test suite treats warnings as errors too). The
data plane runs twice, with and without the native modules (``guard.dataplane._rank``,
``guard.dataplane._walk``), and the two must give the same bytes or the same error; and
whatever bytes the native walker takes, protobuf must parse and read the same.
Memory is bounded by the decode limit: ``max_message_mb: 1``.

:func:`one_input` needs no atheris; ``tests/dataplane/test_wire.py`` runs it over
hypothesis-generated inputs, so CI exercises the target without libFuzzer.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

_instrument: Any = contextlib.nullcontext()
if __name__ == "__main__":
    import atheris

    # Coverage feedback for the guard's own code only: instrumenting every loaded
    # module (numpy, protobuf, prometheus) takes about a minute on a small machine.
    _instrument = atheris.instrument_imports(include=["guard"])

with _instrument:
    from guard.control.config import OutputRule, parse_config
    from guard.dataplane.book import RuleBook
    from guard.dataplane.codec import varint
    from guard.dataplane.codec.response import ModelSpecInfo, parse_predict_response
    from guard.dataplane.codec.tensor import Encoding, decode_tensor, set_tensor
    from guard.dataplane.codec.views import PredictResponseView
    from guard.dataplane.errors import GuardError
    from guard.dataplane.kernels import REFERENCE, default
    from guard.dataplane.pipeline import guard_predict_response
    from guard.dataplane.results import Action
    from guard.dataplane.rules import apply_rule, label_table
    from guard.metrics.guard_metrics import GuardMetrics
    from tests.native import same_outcome, walk_agrees_with_protobuf

__all__ = ["main", "one_input", "seeds"]

_CONFIG = {"max_message_mb": 1, "max_class_label_values": 5}

#: Rule sets the first input byte chooses between: between them they reach every
#: activation, policy, derivation and the label checks.
_RULE_SETS = (
    [
        {
            "name": "*",
            "outputs": [
                {"name": "*", "on_violation": "clamp", "check_sum": True, "argmax": True},
                {"name": "out1", "valid_range": [-1, 1], "top_k": 2, "labels": ["a", "b"]},
            ],
        }
    ],
    [
        {
            "name": "*",
            "outputs": [
                {"name": "*", "activation": "softmax", "on_violation": "reject", "top_k": 1},
            ],
        }
    ],
    [
        {
            "name": "*",
            "signature": "",
            "outputs": [
                {
                    "name": "*",
                    "activation": "sigmoid",
                    "threshold": 0.5,
                    "labels": ["NO", "YES"],
                },
                {"name": "out1", "on_violation": "clamp", "threshold": [0.2, 0.8]},
            ],
        }
    ],
    # Thresholds on raw values: the native lane when clean.
    [
        {
            "name": "*",
            "outputs": [
                {"name": "*", "threshold": 0.5, "labels": ["NO", "YES"]},
                {"name": "out1", "threshold": [0.2, 0.8], "top_k": 2, "check_sum": True},
            ],
        }
    ],
    # Values out of range, counted (and clamped) by the native lane.
    [
        {
            "name": "*",
            "outputs": [
                {"name": "*", "on_violation": "clamp", "argmax": True, "top_k": 2},
                {"name": "out1", "on_violation": "observe", "threshold": 0.5},
            ],
        }
    ],
)
_CONFIGS = [parse_config({**_CONFIG, "models": m}, source="<fuzz>") for m in _RULE_SETS]
_LIMIT = _CONFIGS[0].max_message_bytes
_BOOKS = [RuleBook(c.models, _LIMIT, default()) for c in _CONFIGS]
# The same rules, never on the native route.
_REFERENCE_BOOKS = [RuleBook(c.models, _LIMIT, REFERENCE) for c in _CONFIGS]
_RULE = OutputRule(on_violation="clamp", check_sum=True, top_k=1, labels=("x",))
_LABELS = label_table(_RULE.labels)
_registry = CollectorRegistry()
_metrics = GuardMetrics(_registry, model_names=["fuzz"], max_class_label_values=5)
_reference_metrics = GuardMetrics(
    CollectorRegistry(), model_names=["fuzz"], max_class_label_values=5
)
_calls = 0


def _wrap(tensor: bytes) -> bytes:
    """``tensor`` as the value of output ``out1`` in a PredictResponse."""
    entry = b"\x0a\x04out1" + b"\x12" + varint.encode_packed(np.array([len(tensor)])) + tensor
    return b"\x0a" + varint.encode_packed(np.array([len(entry)])) + entry


def _codec_path(body: bytes) -> None:
    """parse -> decode -> apply_rule -> set_tensor -> serialize, without the pipeline."""
    try:
        view = parse_predict_response(body)
    except GuardError:
        return
    for name in sorted(view.outputs.keys()):
        tensor = view.outputs[name]
        try:
            decoded = decode_tensor(tensor, _LIMIT)
            if decoded is None:
                continue
            values, encoding = decoded
            result = apply_rule(values, _RULE, _LABELS, "fuzz", name)
        except GuardError:
            continue
        if result.changed:
            set_tensor(tensor, result.values, encoding)
        for derived in result.derived:
            set_tensor(view.outputs[name + derived.suffix], derived.array, encoding)
    # What we wrote must parse again.
    parse_predict_response(view.SerializeToString())


def one_input(data: bytes) -> None:
    """Run one fuzz input; raises on anything but a :class:`GuardError`."""
    global _calls
    if not data:
        return
    selector, body = data[0], data[1:]
    if selector & 0x80:
        body = _wrap(body)
    book = _BOOKS[selector % len(_BOOKS)]
    spec = ModelSpecInfo("fuzz", "", None) if selector & 0x40 else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            guarded = guard_predict_response(body, spec, book, _metrics)
            outcome: Any = guarded and (guarded.body, guarded.action, guarded.violations)
        except GuardError as exc:
            guarded, outcome = None, (type(exc), exc.details)
        reference_book = _REFERENCE_BOOKS[selector % len(_BOOKS)]
        try:
            ref = guard_predict_response(body, spec, reference_book, _reference_metrics)
            expected: Any = ref and (ref.body, ref.action, ref.violations)
        except GuardError as exc:
            expected = (type(exc), exc.details)
        assert same_outcome(outcome, expected), "the native and the reference kernels differ"
        walk_agrees_with_protobuf(body)
        if guarded is not None:
            parse_predict_response(guarded.body)
            assert guarded.action in (Action.CLEAN, Action.OBSERVED, Action.CLAMPED)
            assert guarded.violations >= 0
        _codec_path(body)
        _calls += 1
        if _calls % 256 == 0:
            generate_latest(_registry)  # the custom histogram collector must export


def seeds() -> list[bytes]:
    """Well-formed inputs for every dtype, encoding, shape class and rule set.

    Built with the guard's own encoder (no TensorFlow needed to fuzz); the
    differential tests prove that encoder equal to TensorFlow's.
    """
    out: list[bytes] = []
    for dtype in (np.float16, np.float32, np.float64):
        for encoding in Encoding:
            for shape in ((), (3,), (2, 1), (2, 3), (1, 2, 2)):
                values = np.linspace(-0.5, 1.5, int(np.prod(shape))).astype(dtype)
                view = PredictResponseView()
                set_tensor(view.outputs["out1"], values.reshape(shape), encoding)
                set_tensor(view.outputs["out0"], values[::-1].reshape(shape), encoding)
                view.model_spec.name = "fuzz"
                view.model_spec.version.value = 1
                body = view.SerializeToString()
                selectors = (0, 1, 2, 3, 4, 0x40, 0x42, 0x43)
                out.extend(bytes([selector]) + body for selector in selectors)
                out.append(b"\x80" + view.outputs["out1"].SerializeToString())
    # Clean rows (in range, summing to 1): the native clean path's case.
    for dtype in (np.float32, np.float64):
        for encoding in Encoding:
            view = PredictResponseView()
            rows = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], dtype=dtype)
            set_tensor(view.outputs["out0"], rows, encoding)
            body = view.SerializeToString()
            out.extend(bytes([selector]) + body for selector in (0, 1, 3, 0x40, 0x43))
    return out


def main(argv: list[str] | None = None) -> None:
    """Start libFuzzer on :func:`one_input` (arguments are libFuzzer's).

    Without a corpus directory among the arguments, one is made in the temp dir
    and filled with :func:`seeds`.
    """
    import atheris

    args = list(sys.argv if argv is None else argv)
    if all(a.startswith("-") for a in args[1:]):
        corpus = Path(tempfile.mkdtemp(prefix="fuzz_wire_corpus_"))
        for i, seed in enumerate(seeds()):
            (corpus / f"seed{i:03d}").write_bytes(seed)
        args.append(str(corpus))
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
