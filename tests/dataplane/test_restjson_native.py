"""The native scan of REST numbers (``_walk.scan_numbers``) against restjson's numpy
scan, the reference: the same values bit for bit, the same offsets, the same
integer reading, and the same refusals, for the backend's TF-Serving writer and for
hand-made tokens."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from guard.dataplane.codec import restjson
from guard.dataplane.codec.restjson import RestJsonError, read_predict_response
from guard.dev.backend.json_tensor import predict_response
from tests.dataplane.test_restjson import DT_DOUBLE, DT_FLOAT, DT_INT64, SETTINGS, formats, shapes
from tests.native import native

_SEPARATORS = st.sampled_from([" ", ",", ", ", "\n", "[", "]", "],[", "\t"])
_SPECIAL = st.sampled_from(["NaN", "Infinity", "-Infinity", "-0", "0", "-0.0", "1e400", "-1e-400"])
_ODD = st.text("0123456789.-+eEN", min_size=1, max_size=20)
_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
_SPELLED = _FLOATS.flatmap(
    lambda x: st.sampled_from([repr(x), f"{x:.9g}", f"{x:.6g}", f"{x:e}", f"{x:.17E}"])
)
_INTS = st.integers(-(2**63) + 1, 2**63 - 1).map(str)
_BIG_INTS = st.integers(2**63, 10**30).map(lambda k: str(k * (-1) ** (k % 2)))
_TOKENS = st.one_of(_SPELLED, _INTS, _SPECIAL, _ODD, _BIG_INTS)


def _scan(region: bytes, native_scan: restjson.NumberScan | None) -> restjson._Numbers | str:
    try:
        return restjson._scan_native(region, native_scan)
    except RestJsonError as exc:
        return f"refused: {exc}"


def _bits(values: np.ndarray) -> np.ndarray:
    """float64 bit patterns, every NaN alike."""
    out = values.copy()
    out[np.isnan(out)] = np.nan
    return out.view(np.int64)


@SETTINGS
@given(st.lists(st.tuples(_TOKENS, _SEPARATORS), min_size=0, max_size=40))
def test_the_native_scan_reads_every_token_as_the_numpy_scan_does(
    tokens: list[tuple[str, str]],
) -> None:
    text = "[" + "".join(t + sep for t, sep in tokens) + "]"
    region = restjson._PAD + text.encode() + restjson._PAD
    by_numpy = _scan(region, None)
    by_native = _scan(region, native().number_scan)
    if isinstance(by_numpy, str) or isinstance(by_native, str):
        assert by_native == by_numpy
        return
    assert np.array_equal(_bits(by_native.values), _bits(by_numpy.values))
    assert by_native.starts.tolist() == by_numpy.starts.tolist()
    assert by_native.ends.tolist() == by_numpy.ends.tolist()
    assert by_native.integral == by_numpy.integral
    if by_numpy.ints is None:
        assert by_native.ints is None
    else:
        assert by_native.ints is not None
        assert by_native.ints.tolist() == by_numpy.ints.tolist()


@SETTINGS
@given(
    st.sampled_from([(np.float32, DT_FLOAT), (np.float64, DT_DOUBLE), (np.int64, DT_INT64)]),
    shapes,
    formats,
    st.data(),
)
def test_both_routes_read_tf_serving_bodies_alike(
    dtype: tuple[type, int], shape: tuple[int, ...], fmt: str, data: st.DataObject
) -> None:
    array = data.draw(hnp.arrays(dtype[0], shape))
    body = predict_response([("scores", array, dtype[1])], fmt)  # type: ignore[arg-type]
    by_numpy = read_predict_response(body, fmt)  # type: ignore[arg-type]
    by_native = read_predict_response(body, fmt, native().number_scan)  # type: ignore[arg-type]
    a, b = by_numpy.outputs[None], by_native.outputs[None]
    assert a.kind == b.kind and a.values.dtype == b.values.dtype
    assert a.values.shape == b.values.shape
    assert a.values.tobytes() == b.values.tobytes() or np.array_equal(
        a.values, b.values, equal_nan=True
    )
    where_a, where_b = by_numpy._where[None], by_native._where[None]
    assert where_a.starts is not None and where_b.starts is not None
    assert where_a.starts.tolist() == where_b.starts.tolist()


@pytest.mark.parametrize("text", ["01", "1.", ".5", "+1", "1e", "--1", "NaNa", "-NaN", "1.0e+"])
def test_what_the_native_scan_will_not_read_goes_to_the_reference(text: str) -> None:
    region = restjson._PAD + f"[{text}]".encode() + restjson._PAD
    scan = native().number_scan
    assert scan is not None
    assert scan(region) is None
    assert _scan(region, native().number_scan) == _scan(region, None)
