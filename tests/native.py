"""Switching the native modules off, for differential tests, and checking the
native walker against protobuf."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import ModuleType

import numpy as np

from guard.dataplane import rules, wire

# The packed field holding each float dtype's values, in the view.
_VALUE_FIELD = {wire.DT_FLOAT: "float_val", wire.DT_DOUBLE: "double_val", wire.DT_HALF: "half_val"}


@contextmanager
def _switched_off(owner: ModuleType, name: str) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, None)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def without_rank() -> AbstractContextManager[None]:
    """Run the rule engine without its native clean path (``guard.dataplane._rank``).

    Rule books made inside it never get a fast lane (their lane caches remember
    that there was none), so keep such books apart from the others.
    """
    return _switched_off(rules, "_rank")


def without_walk() -> AbstractContextManager[None]:
    """Read every response with protobuf, not the native walker (``guard.dataplane._walk``)."""
    return _switched_off(wire, "_walk")


@contextmanager
def pure_python() -> Iterator[None]:
    """Run the data plane as an install without a C compiler would: neither
    native module. The note on :func:`without_rank` applies."""
    with without_rank(), without_walk():
        yield


def walk_agrees_with_protobuf(body: bytes) -> bool:
    """Whether the native walker took ``body``; when it did, assert that protobuf
    parses it too (the view and the typed view) and reads the same layout."""
    assert wire._walk is not None, "guard.dataplane._walk is not built"
    walked = wire._walk.walk_predict_response(body)
    if walked is None:
        return False
    view = wire.PredictResponseView.FromString(body)  # raises if the walker took bad bytes
    typed = wire.TypedPredictResponse.FromString(body)
    spec_bytes, in_order, layout = walked
    assert in_order == tuple(layout.values()) and all(e[0] == n for n, e in layout.items())
    assert (spec_bytes is not None) == view.HasField("model_spec")
    if spec_bytes is not None:
        assert wire.PredictResponseView.FromString(b"\x12" + _len(spec_bytes) + spec_bytes) == (
            wire.PredictResponseView(model_spec=view.model_spec)
        )
    assert set(layout) == set(view.outputs.keys())
    for name, (_, dtype, shape, from_content, offset, length) in layout.items():
        tensor = view.outputs[name]
        assert dtype == tensor.dtype
        assert shape == tuple(d.size for d in tensor.tensor_shape.dim)
        assert not tensor.tensor_shape.unknown_rank
        located = body[offset : offset + length]
        if from_content:
            assert located and located == tensor.tensor_content
            continue
        assert not tensor.tensor_content
        field = _VALUE_FIELD.get(dtype)
        assert located == (b"".join(getattr(tensor, field)) if field else b"")
        typed_values = getattr(typed.outputs[name], field) if field else []
        if field == "half_val":
            assert wire.decode_varints(located).size == len(typed_values)
        elif field:  # nothing sent unpacked: the typed view reads the same values
            dt = wire.FLOAT_DTYPES[dtype].numpy
            expected = np.asarray(typed_values, dtype=dt)
            assert np.array_equal(np.frombuffer(located, dtype=dt), expected, equal_nan=True)
    return True


def _len(payload: bytes) -> bytes:
    return wire._varint(len(payload))
