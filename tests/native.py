"""The native kernels against the reference, for differential tests: which
kernels to inject, and the native walker checked against protobuf."""

from __future__ import annotations

import numpy as np

from guard.dataplane import kernels
from guard.dataplane.codec import varint
from guard.dataplane.codec.tensor import DT_DOUBLE, DT_FLOAT, DT_HALF, FLOAT_DTYPES
from guard.dataplane.codec.views import PredictResponseView, TypedPredictResponse
from guard.dataplane.kernels import REFERENCE, Native

__all__ = ["REFERENCE", "native", "same_outcome", "walk_agrees_with_protobuf"]

# The packed field holding each float dtype's values, in the view.
_VALUE_FIELD = {DT_FLOAT: "float_val", DT_DOUBLE: "double_val", DT_HALF: "half_val"}


def native() -> Native:
    """The native kernels; the tests need them built (``make`` builds them)."""
    assert kernels.NATIVE is not None, f"native modules not built: {kernels.MISSING}"
    return kernels.NATIVE


def same_outcome(a: object, b: object) -> bool:
    """Whether two routes guarded a response alike: the same ``(body, action,
    violations)`` or error, or, where a rule changed a tensor, the same action,
    violations and message. The walker's route writes the new values over the
    old ones and keeps the upstream's bytes; without the walker, protobuf
    serializes the message again, its map entries in its own order."""
    if a == b:
        return True
    if not (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 3):
        return False
    if not (isinstance(a[0], bytes) and isinstance(b[0], bytes)) or a[1:] != b[1:]:
        return False
    return bool(PredictResponseView.FromString(a[0]) == PredictResponseView.FromString(b[0]))


def walk_agrees_with_protobuf(body: bytes) -> bool:
    """Whether the native walker took ``body``; when it did, assert that protobuf
    parses it too (the view and the typed view) and reads the same layout."""
    walked = native().walk(body)
    if walked is None:
        return False
    view = PredictResponseView.FromString(body)  # raises if the walker took bad bytes
    typed = TypedPredictResponse.FromString(body)
    spec_bytes, in_order, layout = walked
    assert in_order == tuple(layout.values()) and all(e[0] == n for n, e in layout.items())
    assert (spec_bytes is not None) == view.HasField("model_spec")
    if spec_bytes is not None:
        assert PredictResponseView.FromString(b"\x12" + _len(spec_bytes) + spec_bytes) == (
            PredictResponseView(model_spec=view.model_spec)
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
            assert varint.decode_packed(located).size == len(typed_values)
        elif field:  # nothing sent unpacked: the typed view reads the same values
            dt = FLOAT_DTYPES[dtype].numpy
            expected = np.asarray(typed_values, dtype=dt)
            assert np.array_equal(np.frombuffer(located, dtype=dt), expected, equal_nan=True)
    return True


def _len(payload: bytes) -> bytes:
    return varint.encode(len(payload))
