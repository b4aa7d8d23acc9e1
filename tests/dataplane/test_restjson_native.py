"""The native tensor scan of REST bodies (``_walk.scan_tensor``) against restjson's
numpy scan, the reference: the same values bit for bit, the same kind, shape and
offsets, and, for any text the native scan does not read, the reference's answer.
Checked for the backend's TF-Serving writer, for dense tensors of hand-spelled
tokens, and for broken text."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from guard.dataplane.codec import restjson
from guard.dataplane.codec.restjson import NumberScan, RestJsonError, read_predict_response
from guard.dataplane.codec.restjson import outputs as restjson_outputs
from guard.dataplane.codec.restjson import structure as restjson_structure
from guard.dev.backend.json_tensor import predict_response
from tests.dataplane.test_restjson import (
    DT_DOUBLE,
    DT_FLOAT,
    DT_INT64,
    OUTPUTS_TWICE,
    SETTINGS,
    formats,
    shapes,
)
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
    span = restjson_structure._Span(0, len(text), "numeric")
    try:
        if native_only:
            assert scan is not None
            found = restjson_outputs._native_output(text, [span], False, scan)
            assert found is not None, "the native route reads it"
        else:
            found = restjson_outputs._numeric_output(text, [span], False, scan)
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


# ---------------------------------------------------------------------------
# Writing: the native writer's two loops against restjson's Python ones.

# Values spelled several ways, as an upstream other than TF Serving may write
# them: a derived float takes the text of the first value in its instance with
# the same bits, whichever spelling that is.
_SPELLINGS = {
    0.5: ["0.5", "0.50", "5e-1", "5.0E-1"],
    0.25: ["0.25", "2.5e-1"],
    1.0: ["1.0", "1e0", "1.00"],
    0.1: ["0.1", "0.100000001", "1e-1"],
    -0.0: ["-0.0", "-0e0"],
}
_LONG = "0.10000000000000001"  # 19 characters: the tensor reads as float64


def _writer() -> restjson.TextWriter:
    writer = native().rest_writer
    assert writer is not None
    return writer


def _spelled_rows(data: st.DataObject, batch: int, width: int, wide: bool) -> list[list[str]]:
    values = st.sampled_from(sorted(_SPELLINGS))
    rows = [[data.draw(st.sampled_from(_SPELLINGS[data.draw(values)])) for _ in range(width)]
            for _ in range(batch)]  # fmt: skip
    if wide:
        rows[0][0] = _LONG
    return rows


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 6), st.integers(0, 5), formats, st.booleans(), st.data())
def test_the_native_writer_writes_derived_outputs_as_python_does(
    batch: int, width: int, k: int, fmt: str, wide: bool, data: st.DataObject
) -> None:
    """Derived scores (taken from their instance, or not there at all),
    classes and labels, under ``guard_outputs`` of an unnamed output: the same
    text from the native writer as from Python's loops."""
    rows = _spelled_rows(data, batch, width, wide)
    key = "predictions" if fmt == "row" else "outputs"
    body = '{\n    "' + key + '": [' + ", ".join("[" + ", ".join(r) + "]" for r in rows) + "]\n}"
    by_python = read_predict_response(body.encode(), fmt)  # type: ignore[arg-type]
    by_native = read_predict_response(body.encode(), fmt, _scan(), writer=_writer())  # type: ignore[arg-type]
    values = by_python.outputs[None].values
    assert values.dtype == (np.float64 if wide else np.float32)
    picked = data.draw(hnp.arrays(np.int64, (batch, k), elements=st.integers(0, width - 1)))
    scores = np.take_along_axis(values, picked, axis=1)
    absent = data.draw(hnp.arrays(values.dtype, (batch,), elements=st.sampled_from([0.75, -2.0])))
    labels = np.array([f"c{i}\u00e9\n" for i in range(batch * k)], dtype=object).reshape(batch, k)
    items = [("p_top_k_score", scores), ("p_top_k_class", picked), ("p_top_k_label", labels),
             ("p_other", absent), ("p_score", values.max(axis=1))]  # fmt: skip
    assert by_native.guard_outputs_text(items) == by_python.guard_outputs_text(items)
    assert by_native.rewrite(derived={None: items}) == by_python.rewrite(derived={None: items})


@SETTINGS
@given(st.integers(1, 10), st.integers(1, 4), formats, st.data())
def test_the_native_writer_writes_next_to_named_outputs_as_python_does(
    batch: int, width: int, fmt: str, data: st.DataObject
) -> None:
    """Two named outputs (row format: one object per instance): members added
    next to one of them, the same bytes from both writers."""
    scores = data.draw(hnp.arrays(np.float32, (batch, width), elements=st.sampled_from(
        [0.5, 0.25, 1.0, -0.0, 3.0])))  # fmt: skip
    body = predict_response(
        [("scores", scores, DT_FLOAT), ("ids", np.arange(batch, dtype=np.int64), DT_INT64)],
        fmt,  # type: ignore[arg-type]
    )
    by_python = read_predict_response(body, fmt)  # type: ignore[arg-type]
    by_native = read_predict_response(body, fmt, _scan(), writer=_writer())  # type: ignore[arg-type]
    top = np.sort(scores, axis=1)[:, ::-1]
    items = [("scores_top", top), ("scores_class", np.argsort(-scores, axis=1, kind="stable"))]
    derived: dict[str | None, list[tuple[str, np.ndarray]]] = {"scores": items}
    assert by_native.rewrite(derived=derived) == by_python.rewrite(derived=derived)


def test_row_members_joins_each_instance_and_declines_wide_characters() -> None:
    rows = _writer().row_members(
        [(', "a": ', ["1", "2", "3", "4"], 2, True), (', "b": ', ['"x\u00e9"', '"y"'], 1, False),
         (', "c": ', [], 0, True)],
        2,
    )  # fmt: skip
    assert rows == [', "a": [1, 2], "b": "x\u00e9", "c": []', ', "a": [3, 4], "b": "y", "c": []']
    assert rows is not None and not rows[0].isascii() and rows[1].isascii()
    assert _writer().row_members([(', "a": ', ['"\u0100"'], 1, False)], 1) is None
    assert _writer().row_members([], 3) == ["", "", ""]


@pytest.mark.parametrize(
    "columns, error",
    [([(', "a": ', ["1"], 2, True)], ValueError), ([(', "a": ', ["1", "2"], 2, False)], ValueError),
     ([(', "a": ', [1, 2], 1, False)], TypeError), ([(', "a": ', ("1", "2"), 1, False)], TypeError),
     ([(', "a": ', ["1", "2"], -1, True)], ValueError), ([("h", ["1"])], TypeError),
     ([[', "a": ', ["1", "2"], 1, False]], TypeError)],
)  # fmt: skip
def test_row_members_refuses_columns_that_do_not_fill_the_batch(
    columns: list[tuple[object, ...]], error: type[Exception]
) -> None:
    with pytest.raises(error):
        _writer().row_members(columns, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("sign", ["", "-", "+"])
def test_exponents_of_any_length_read_as_float_reads_them(sign: str) -> None:
    """Found (a red-team pass, UBSan): the fast path summed every exponent
    digit before refusing more than four, and 19 or more overflowed a long
    (undefined behaviour, on text from the upstream); it now stops at five."""
    for digits in range(1, 41):
        text = f"[1e{sign}{'9' * digits}, 2.5e{sign}{'0' * digits}1]".encode()
        scanned = _scan()(text, 0, len(text))
        assert scanned is not None, text
        got = np.frombuffer(scanned[0], np.float64).tolist()
        want = [float(f"1e{sign}{'9' * digits}"), float(f"2.5e{sign}{'0' * digits}1")]
        assert got == want, (text, got, want)


def test_reuse_texts_finds_the_first_equal_value_and_checks_its_inputs() -> None:
    body = b"[[0.50, 5e-1, 1], [2, 2.0, 0.5]]"
    scanned = _scan()(body, 0, len(body))
    assert scanned is not None
    pool = np.array([[0.5, 0.5, 1.0], [2.0, 2.0, 0.5]], np.float32)
    derived = np.array([[0.5, 7.0], [2.0, 0.5]], np.float32)
    starts, ends = np.frombuffer(scanned[1], np.int64), np.frombuffer(scanned[2], np.int64)
    reuse = _writer().reuse_texts
    assert reuse(body, starts, ends, pool, derived, 2, 4) == (["0.50", None, "2", "0.5"], 1)
    wide = pool.astype(np.float64)
    assert reuse(body, starts, ends, wide, derived.astype(np.float64), 2, 8)[0][0] == "0.50"
    with pytest.raises(ValueError, match="batch rows"):
        reuse(body, starts, ends, pool, derived, 4, 4)  # 3 values a row do not split in 4
    with pytest.raises(ValueError, match="batch rows"):
        reuse(body, starts, ends, pool, derived, 2, 3)
    with pytest.raises(ValueError, match="batch rows"):
        reuse(body, starts, ends, pool, derived, 2**62, 8)  # batch x width would overflow
    with pytest.raises(ValueError, match="one start and one end"):
        reuse(body, starts[:4], ends, pool, derived, 2, 4)
    beyond = ends + len(body)
    with pytest.raises(ValueError, match="outside the body"):
        reuse(body, starts, beyond, pool, derived, 2, 4)


@given(
    width=st.sampled_from([4, 8]),
    batch=st.integers(1, 3),
    n=st.integers(1, 41),
    m=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_reuse_texts_agrees_with_a_first_match_search_across_its_blocks(
    width: int, batch: int, n: int, m: int, seed: int
) -> None:
    """Rows shorter and longer than the search's blocks of eight, with values
    repeated (the first is taken), absent, or -0.0 beside 0.0 (other bits)."""
    rng = np.random.default_rng(seed)
    dtype = np.float32 if width == 4 else np.float64
    choices = np.array([0.0, -0.0, 0.25, 1.5, -3.0, 7.0], dtype)
    pool = rng.choice(choices[:4], size=(batch, n)).astype(dtype)
    derived = rng.choice(choices, size=(batch, m)).astype(dtype)
    tokens = [f"t{t}" for t in range(batch * n)]
    body = ",".join(tokens).encode()
    starts = np.cumsum([0] + [len(t) + 1 for t in tokens[:-1]]).astype(np.int64)
    ends = starts + np.array([len(t) for t in tokens], np.int64)
    bits = np.dtype(f"u{width}")
    want = []
    for row in range(batch):
        for value in derived[row].view(bits):
            hits = np.flatnonzero(pool[row].view(bits) == value)
            want.append(tokens[row * n + int(hits[0])] if hits.size else None)
    got = _writer().reuse_texts(body, starts, ends, pool, derived, batch, width)
    assert got == (want, want.count(None))


# ---------------------------------------------------------------------------
# Skipping what is not a numeric tensor.

_JSONISH = st.lists(
    st.sampled_from(["[", "]", "{", "}", '"', '\\"', "\\\\", '"a"', '"]"', ",", "1", " ", ":"]),
    max_size=40,
).map("".join)


def _skip() -> restjson.ValueSkip:
    skip = native().value_skip
    assert skip is not None
    return skip


@SETTINGS
@given(_JSONISH, st.sampled_from(["[", "{"]))
def test_the_native_skip_ends_values_where_the_reference_does(text: str, head: str) -> None:
    data = (head + text).encode()
    assert _skip()(data, 0) == restjson_structure._skip_value(data, 0)


@pytest.mark.parametrize(
    "text, end",
    [('["]", "\\"", [1, {"a": "}"}]] tail', 28), ("[}", -1), ('["a]', -1), ("[[]", -1),
     ("[" * 512 + "]" * 512, 1024), ("[" * 513 + "]" * 513, -1), ("{}", 2), ("1", -1),
     ('"a"', -1), ("", -1)],
)  # fmt: skip
def test_skip_matches_brackets_by_kind_and_bounds_the_depth(text: str, end: int) -> None:
    data = text.encode()
    assert _skip()(data, 0) == end
    if data:
        assert restjson_structure._skip_value(data, 0) == end


def _hostile(instance: bytes, count: int) -> bytes:
    return b'{"predictions": [' + b",".join([instance] * count) + b"]}"


@pytest.mark.parametrize(
    "instance, count, kind",
    [(b'"a"', 4_000_000, "unread"), (b'{"b64": "YQ=="}', 1_000_000, "unread"),
     (b"[]", 4_000_000, "unread"), (b"{}", 4_000_000, "refused")],
)  # fmt: skip
def test_huge_non_numeric_outputs_are_read_in_bounded_time_and_memory(
    instance: bytes, count: int, kind: str
) -> None:
    """A non-numeric output over 1 MiB is not read, and the walk visits at
    most 65,536 values: the reader's CPU and allocations stay far below what
    reading such a body whole takes (16-20 s and 0.3-1.4 GB before)."""
    body = _hostile(instance, count)

    def read() -> str:
        try:
            return read_predict_response(body, "row", _scan(), skip=_skip()).outputs[None].kind
        except RestJsonError as exc:
            assert "more than 65536 objects, members and elements" in str(exc)
            return "refused"

    started = time.thread_time()
    found = read()
    cpu = time.thread_time() - started
    tracemalloc.start()  # a second read, traced (tracing slows it down)
    try:
        assert read() == found
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == kind
    assert cpu < 1.5, f"{cpu:.2f} s of CPU"
    assert peak < 2.5 * len(body), f"{peak / 1e6:.0f} MB allocated for {len(body) / 1e6:.0f} MB"


@pytest.mark.parametrize("native_route", [False, True])
@pytest.mark.parametrize("filler", [b"a" * 2_000_000, b'\\"' * 1_000_000])
def test_a_long_string_is_read_in_memory_of_its_own_size(native_route: bool, filler: bytes) -> None:
    """Red team: the string pattern kept state for every byte of a string,
    120-150 bytes each: this 2 MB string took 120-290 MB on either route (an
    upstream answer of one 16 MB string, 2 GB). Now what is left is the
    string itself, decoded."""
    body = b'{"predictions": [{"y": [0.5], "s": "' + filler + b'"}]}'
    args = (_scan(), None, None, _skip()) if native_route else ()
    tracemalloc.start()
    try:
        read = read_predict_response(body, "row", *args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert read.outputs["y"].values.tolist() == [[0.5]]
    assert peak < 5 * len(body), f"{peak / 1e6:.0f} MB allocated for {len(body) / 1e6:.0f} MB"


@pytest.mark.parametrize("instance", [b'"a"', b'{"b64": "YQ=="}', b"{}", b"[]", b"true"])
def test_both_routes_read_large_non_numeric_outputs_alike(instance: bytes) -> None:
    body = _hostile(instance, 300_000)

    def read(native_route: bool) -> object:
        try:
            found = read_predict_response(
                body,
                "row",
                _scan() if native_route else None,
                skip=_skip() if native_route else None,
            )
        except RestJsonError as exc:
            return str(exc)
        return {k: (o.kind, o.values.shape) for k, o in found.outputs.items()}

    assert read(True) == read(False)


_LEAVES = st.one_of(
    st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False),
    st.text(",[{ ", max_size=4), st.booleans(),
)  # fmt: skip
_DOCS = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text("ab,", max_size=3), inner, max_size=4)
    ),
    max_leaves=40,
)


def _numbers_in(doc: object) -> int:
    if isinstance(doc, list):
        return sum(map(_numbers_in, doc))
    if isinstance(doc, dict):
        return sum(map(_numbers_in, doc.values()))
    return int(isinstance(doc, int | float) and not isinstance(doc, bool))


@SETTINGS
@given(_DOCS, st.sampled_from([None, 0, 4]), st.integers(0, 60))
def test_numbers_at_most_bounds_the_numbers_of_any_json_text(
    doc: object, indent: int | None, enough: int
) -> None:
    """The bound the guard checks against max_message_mb before reading a
    body: never below the numbers there are; where the loose count ('[', ','
    and ':') passes ``enough``, the numbers outside strings exactly; the same
    natively."""
    text = json.dumps({"predictions": doc}, indent=indent).encode()
    bound = restjson.numbers_at_most(text, enough)
    loose = text.count(b"[") + text.count(b",") + text.count(b":")
    assert bound == (loose if loose <= enough else _numbers_in(doc))
    counted = native().numbers_at_most
    assert counted is not None and counted(text, enough) == bound


def test_the_loose_count_takes_every_byte_natively() -> None:
    """The 16-byte blocks and the tail, on texts of every length up to 600,
    and a text of commas only, past the 255 blocks a byte lane can sum."""
    counted = native().numbers_at_most
    assert counted is not None
    for n in range(600):
        text = (b"[1,:" * 150)[:n]
        assert counted(text, 10**9) == text.count(b"[") + text.count(b",") + text.count(b":")
    every = b"," * (16 * 255 * 3 + 5)  # every lane full, past 255 blocks: no byte sum wraps
    assert counted(every, 10**9) == len(every)


# --- hostile upstream answers, on both routes --------------------------------


def _both_routes(body: bytes, fmt: str) -> tuple[object, object]:
    """What each route makes of ``body``: each output's kind and values, or the refusal."""

    def read(native_route: bool) -> object:
        try:
            found = read_predict_response(
                body,
                fmt,  # type: ignore[arg-type]
                _scan() if native_route else None,
                writer=native().rest_writer if native_route else None,
                skip=_skip() if native_route else None,
            )
        except RestJsonError as exc:
            return f"refused: {exc}"
        return {k: (o.kind, o.values.tolist()) for k, o in found.outputs.items()}

    return read(True), read(False)


@pytest.mark.parametrize("body, fmt, held", OUTPUTS_TWICE)
def test_both_routes_refuse_an_output_written_twice(body: bytes, fmt: str, held: str) -> None:
    assert restjson.scan_single_output(body, fmt, _scan()) is None  # type: ignore[arg-type]
    by_native, by_numpy = _both_routes(body, fmt)
    assert by_native == by_numpy
    assert isinstance(by_native, str) and held in by_native
    assert json.loads(body) != json.loads(body, object_pairs_hook=lambda p: dict(reversed(p))) or (
        held.startswith("both")
    )


@pytest.mark.parametrize(
    "token", ["7" * 20, "-" + "7" * 63, "7" * 64, "-" + "9" * 400, "7" * 5000, "1" + "0" * 4400]
)
@pytest.mark.parametrize("fmt", ["row", "columnar"])
def test_both_routes_read_integers_past_int64_as_json_loads_floats_them(
    token: str, fmt: str
) -> None:
    """Up to 63 characters the native scan reads them (strtod), past that numpy."""
    key = "predictions" if fmt == "row" else "outputs"
    body = ('{"' + key + '": [[' + token + "], [0.25]]}").encode()
    by_native, by_numpy = _both_routes(body, fmt)
    assert by_native == by_numpy == {None: ("float64", json.loads(body, parse_int=float)[key])}
    scanned = _scan()(body, body.index(b"["), len(body))
    assert (scanned is not None) == (len(token) <= 63)


def test_both_routes_refuse_bad_base64() -> None:
    body = b'{"outputs": {"p": [[0.5]], "b_bytes": [{"b64": "YWJj2"}]}}'
    by_native, by_numpy = _both_routes(body, "columnar")
    assert by_native == by_numpy
    assert isinstance(by_native, str) and "bad base64" in by_native
