"""The native tensor scan of REST bodies (``_walk.scan_tensor``) against restjson's
numpy scan, the reference: the same values bit for bit, the same kind, shape and
offsets, and, for any text the native scan does not read, the reference's answer.
Checked for the backend's TF-Serving writer, for dense tensors of hand-spelled
tokens, and for broken text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from guard.dataplane.codec import restjson
from guard.dataplane.codec.restjson import NumberScan, RestJsonError, read_predict_response
from guard.dev.backend.json_tensor import predict_response
from tests.dataplane.test_restjson import DT_DOUBLE, DT_FLOAT, DT_INT64, SETTINGS, formats, shapes
from tests.native import native

_SPACES = st.sampled_from(["", " ", "\n", "\n    ", "\t", "\r\n"])
_SPECIAL = st.sampled_from(["NaN", "Infinity", "-Infinity", "-0", "0", "-0.0", "1e400", "-1e-400"])
_ODD = st.text("0123456789.-+eEN", min_size=1, max_size=20)
_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
_SPELLED = _FLOATS.flatmap(
    lambda x: st.sampled_from([repr(x), f"{x:.9g}", f"{x:.6g}", f"{x:e}", f"{x:.17E}"])
)
_INTS = st.integers(-(2**63) + 1, 2**63 - 1).map(str)
_BIG_INTS = st.integers(2**63, 10**30).map(lambda k: str(k * (-1) ** (k % 2)))
_NUMBERS = st.one_of(_SPELLED, _INTS, _SPECIAL, _BIG_INTS)
_SEPARATORS = st.sampled_from([" ", ",", ", ", "\n", "[", "]", "],[", "\t"])

Outcome = tuple[bytes, str, tuple[int, ...], list[int], list[int]] | str | None


def _scan() -> NumberScan:
    scan = native().number_scan
    assert scan is not None
    return scan


def _outcome(text: bytes, scan: NumberScan | None, *, native_only: bool = False) -> Outcome:
    """What restjson makes of ``text`` as one output's value: the values' bits
    (every NaN alike), kind, shape and token offsets, a refusal, or None (not
    numeric). ``native_only``: what the native route alone makes of it."""
    span = restjson._Span(0, len(text), "numeric")
    try:
        if native_only:
            assert scan is not None
            found = restjson._native_output(text, [span], False, scan)
            assert found is not None, "the native route reads it"
        else:
            found = restjson._numeric_output(text, [span], False, scan)
    except RestJsonError as exc:
        return f"refused: {exc}"
    if found is None:
        return None
    values, kind, starts, ends = found
    if values.dtype.kind == "f":
        values = values.copy()
        values[np.isnan(values)] = np.nan
    return values.tobytes(), kind, values.shape, starts.tolist(), ends.tolist()


def _nested(tokens: Sequence[str], shape: tuple[int, ...], spaces: Sequence[str]) -> str:
    """Row-major ``tokens`` as nested JSON lists of ``shape``, spaced by ``spaces``."""
    if not shape:
        return tokens[0]
    step = len(tokens) // shape[0]
    items = [_nested(tokens[i * step : (i + 1) * step], shape[1:], spaces) for i in range(shape[0])]
    space = spaces[len(tokens) % len(spaces)]
    return "[" + space + ("," + space).join(items) + space + "]"


@SETTINGS
@given(
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4),
    st.data(),
    st.lists(_SPACES, min_size=1, max_size=4),
)
def test_the_native_scan_reads_dense_tensors_as_the_reference_does(
    shape: tuple[int, ...], data: st.DataObject, spaces: list[str]
) -> None:
    size = int(np.prod(shape, dtype=np.int64))
    tokens = data.draw(st.lists(_NUMBERS, min_size=size, max_size=size))
    text = _nested(tokens, shape, spaces).encode()
    scanned = _scan()(text, 0, len(text))
    assert scanned is not None, "the native scan reads every dense tensor of JSON numbers"
    assert scanned[5] == shape and scanned[6] == len(text)
    assert _outcome(text, _scan(), native_only=True) == _outcome(text, None)


@SETTINGS
@given(st.lists(st.tuples(st.one_of(_NUMBERS, _ODD), _SEPARATORS), min_size=0, max_size=40))
def test_broken_text_gets_the_reference_answer(tokens: list[tuple[str, str]]) -> None:
    text = ("[" + "".join(t + sep for t, sep in tokens) + "]").encode()
    assert _outcome(text, _scan()) == _outcome(text, None)


@pytest.mark.parametrize(
    "text",
    ["01", "1.", ".5", "+1", "1e", "--1", "NaNa", "-NaN", "1.0e+", "[]", "[[]]", "[1,]", "[,1]",
     "[1 2]", "[[1],2]", "[1,[2]]", "[[1,2],[3]]", "[1]]", "[[1]", "[1],", '["a"]', "[{}]"],
)  # fmt: skip
def test_what_the_native_scan_will_not_read_goes_to_the_reference(text: str) -> None:
    data = text.encode()
    scanned = _scan()(data, 0, len(data))
    assert scanned is None or scanned[6] != len(data)
    assert _outcome(data, _scan()) == _outcome(data, None)


def test_the_native_scan_stops_where_the_tensor_ends() -> None:
    text = b'{"outputs": [[1.5, 2], [3, -4e-2]], "more": [9]}'
    start = text.index(b"[")
    scanned = _scan()(text, start, len(text))
    assert scanned is not None
    assert scanned[6] == text.index(b"]]") + 2
    assert np.frombuffer(scanned[0]).tolist() == [1.5, 2.0, 3.0, -0.04]
    assert scanned[5] == (2, 2)


@SETTINGS
@given(
    st.sampled_from([(np.float32, DT_FLOAT), (np.float64, DT_DOUBLE), (np.int64, DT_INT64)]),
    shapes,
    formats,
    st.booleans(),
    st.data(),
)
def test_both_routes_read_tf_serving_bodies_alike(
    dtype: tuple[type, int], shape: tuple[int, ...], fmt: str, named: bool, data: st.DataObject
) -> None:
    array = data.draw(hnp.arrays(dtype[0], shape))
    outputs = [("scores", array, dtype[1])]
    if named:  # two outputs: row format names them per instance
        outputs.append(("more", array[..., ::-1].copy(), dtype[1]))
    body = predict_response(outputs, fmt)  # type: ignore[arg-type]
    by_numpy = read_predict_response(body, fmt)  # type: ignore[arg-type]
    by_native = read_predict_response(body, fmt, _scan())  # type: ignore[arg-type]
    assert by_numpy.outputs.keys() == by_native.outputs.keys()
    for key, a in by_numpy.outputs.items():
        b = by_native.outputs[key]
        assert a.kind == b.kind and a.values.dtype == b.values.dtype
        assert a.values.shape == b.values.shape
        assert a.values.tobytes() == b.values.tobytes() or np.array_equal(
            a.values, b.values, equal_nan=True
        )
        where_a, where_b = by_numpy._where[key], by_native._where[key]
        assert where_a.starts is not None and where_b.starts is not None
        assert where_a.ends is not None and where_b.ends is not None
        assert where_a.starts.tolist() == where_b.starts.tolist()
        assert where_a.ends.tolist() == where_b.ends.tolist()
        assert where_a.after == where_b.after
    assert by_numpy._root_after == by_native._root_after
    assert by_numpy._root_keys == by_native._root_keys
    assert by_numpy._names_per_instance == by_native._names_per_instance
    # One output: the native read takes its shortcut (one scan of the whole body).
    single = restjson.scan_single_output(body, fmt, _scan())  # type: ignore[arg-type]
    assert (single is not None) == (not named and array.size > 0)
    if single is not None:
        # Where the scan vouches for float32 tokens, they are the values themselves.
        values = restjson.float32_values(single)
        if values is not None:
            assert by_numpy.outputs[None].kind == "float32"
            assert bytes(values) == by_numpy.outputs[None].values.tobytes()


@pytest.mark.parametrize(
    "body",
    [b'{"predictions": [[0.5]], "more": 1}', b'{"predictions": [[0.5]]} x',
     b'{"predictions": [[0.5]]', b'{"predictions": [[0.5]]}}', b'{"predictions": [[0.5], [1]] ]}',
     b'{"predictions": [[0.5],]}', b'{"outputs": [[0.5]]}',
     b'{"predictions": [[0.5]], "predictions": [[2]]}', b'{"predictions" [[0.5]]}',
     b'{"predictions": [[0.5], ["a"]]}', b'{"predictions": []}',
     b'\xef\xbb\xbf{"predictions": [[0.5]]}', b'{"predictions": [[0.5]]}\n\n'],
)  # fmt: skip
def test_the_one_output_shortcut_leaves_any_other_body_to_the_general_reader(body: bytes) -> None:
    """Bodies like a one-output answer but not one: the shortcut declines
    (or, for trailing space, reads it) and both routes give the same answer."""
    single = restjson.scan_single_output(body, "row", _scan())
    assert (single is not None) == body.endswith(b"}\n\n")

    def read(scan: NumberScan | None) -> object:
        try:
            found = read_predict_response(body, "row", scan)
        except RestJsonError as exc:
            return str(exc)
        return {k: (o.kind, o.values.tolist()) for k, o in found.outputs.items()}

    assert read(_scan()) == read(None)


def test_the_native_scan_grows_its_arrays_for_short_tokens() -> None:
    """Room is guessed at one token per 8 bytes; "0,1" packs one per 2."""
    numbers = [i % 10 for i in range(100_000)]
    text = ("[" + ",".join(map(str, numbers)) + "]").encode()
    scanned = _scan()(text, 0, len(text))
    assert scanned is not None
    assert scanned[5] == (100_000,) and scanned[6] == len(text)
    assert np.frombuffer(scanned[4] or b"", np.int64).tolist() == numbers
    assert np.frombuffer(scanned[1], np.int64).tolist() == list(range(1, len(text) - 1, 2))
    assert _outcome(text, _scan(), native_only=True) == _outcome(text, None)


@pytest.mark.parametrize(
    "text",
    ["[1e-40, 0.5]", "[-1.4e-45, 2.5]", "[1.17549435e-38]", "[3.40282347e38]", "[3.4028236e38]",
     "[7e-46, 1]", "[16777217, 0.5]", "[1, 2, 3]", "[1, 2.5]", "[1.00000006]"],
)  # fmt: skip
def test_float32_edges_read_alike(text: str) -> None:
    """Subnormals, float32's extremes, ties from the text: float32 or float64 as
    the reference decides, and the same values."""
    data = text.encode()
    assert _outcome(data, _scan(), native_only=True) == _outcome(data, None)


def test_an_array_where_a_key_belongs_is_refused_by_both_routes() -> None:
    """Found by the fuzzer: the reference took ``[0.2, 1.5],\\n[0.2, 1.5]`` (two
    arrays, the second where a key belongs) for one output's value."""
    body = (
        b'{\n    "predictions": [\n        {\n            "out1": [0.2, 1.5],\n[0.2, 1.5],\n'
        b'            "out0": [0.2]\n }\n    ]\n}'
    )
    for scan in (_scan(), None):
        with pytest.raises(RestJsonError):
            read_predict_response(body, "row", scan)
