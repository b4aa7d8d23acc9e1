"""guard.dataplane.codec.restjson: reading TF Serving REST predict bodies in place, and
rewriting them.

Bodies come from the backend's TF-Serving writer (guard.dev.backend.json_tensor, no
TensorFlow) and from hand-rolled JSON with other spellings and whitespace;
``json.loads`` is the reference for every value read.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from guard.dataplane.codec import restjson
from guard.dataplane.codec.restjson import (
    GUARD_OUTPUTS_KEY,
    RestJsonError,
    decimal_texts,
    read_predict_response,
)
from guard.dataplane.codec.restjson import members as restjson_members
from guard.dataplane.codec.restjson import text as restjson_text
from guard.dev.backend.json_tensor import predict_response
from tests.native import native

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DT_FLOAT, DT_DOUBLE, DT_INT64, DT_BOOL, DT_STRING = 1, 2, 9, 10, 7
_F32 = struct.Struct("<f")

float32s = hnp.from_dtype(np.dtype(np.float32), allow_nan=True, allow_infinity=True)
finite32 = hnp.from_dtype(np.dtype(np.float32), allow_nan=False, allow_infinity=False)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)
formats = st.sampled_from(["row", "columnar"])


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values and shape, NaN equal to NaN (bit patterns aside)."""
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def loads_leaves(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [leaf for item in value for leaf in loads_leaves(item)]
    return [value]


def float32_of_double(d: float) -> float:
    """The reference reading of one JSON number as float32, via json.loads' double."""
    with np.errstate(over="ignore"):
        return float(np.float32(d))


def is_float32_midpoint(d: float) -> bool:
    f = float32_of_double(d)
    if f == d or math.isinf(f) or math.isnan(d):
        return False
    other = 2 * d - f
    try:
        return _F32.unpack(_F32.pack(other))[0] == other
    except OverflowError:
        return False


def assert_matches_loads(read: np.ndarray, kind: str, reference: list[Any]) -> None:
    """Values read equal json.loads' (as float32 for float32 outputs: json.loads gives
    a double, which only an exact float32 midpoint could round differently)."""
    flat = read.ravel()
    assert flat.size == len(reference)
    for got, want in zip(flat.tolist(), reference, strict=True):
        if kind == "float32":
            if is_float32_midpoint(want):
                continue  # restjson rounds the text itself here; the double cannot
            want = float32_of_double(want)
        elif kind == "float64":
            want = float(want)  # an integer token in a float output reads as a float
        assert got == want or (math.isnan(got) and math.isnan(want)), (got, want)


# --- TF Serving's float format ------------------------------------------------


def test_json_tensor_tests_six_digit_expectations() -> None:
    # tensorflow_serving/util/json_tensor_test.cc FromJsonSingleFloatTensorSixDigitPrecision
    values = np.array([9000000, 999999, 0.5, 0.0003, 0.00003, 555557.5], np.float32)
    assert decimal_texts(values) == ["9e+06", "999999.0", "0.5", "0.0003", "3e-05", "555557.5"]


def test_non_finite_and_signed_zero_and_doubles() -> None:
    values = np.array([np.nan, np.inf, 3, -np.inf, -0.0, 0.1, 1234567], np.float32)
    assert decimal_texts(values) == [
        "NaN", "Infinity", "3.0", "-Infinity", "-0.0", "0.1", "1234567.0",
    ]  # fmt: skip
    doubles = np.array([0.1, 1 / 3, 1e300, 2.0, 1e16])
    assert decimal_texts(doubles) == ["0.1", "0.33333333333333331", "1e+300", "2.0", "1e+16"]


@SETTINGS
@given(st.lists(float32s, min_size=1, max_size=50))
def test_float32_text_reads_back_as_the_same_float32(values: list[float]) -> None:
    array = np.array(values, np.float32)
    for value, text in zip(array.tolist(), decimal_texts(array), strict=True):
        if math.isnan(value):
            assert text == "NaN"
            continue
        assert len(text) <= 15 and text.count(".") <= 1
        digits = re.sub(r"e.*|[-.]", "", text).strip("0")
        assert len(digits) <= 9 or math.isinf(value)
        read = read_predict_response(('{"outputs": ' + text + "}").encode(), "columnar")
        assert read.outputs[None].kind == "float32"
        assert read.outputs[None].values.tobytes() == np.float32(value).tobytes()


# 1.00016e+10 lies halfway between these two float32s: each one's %.6g text.
_HALFWAY_PAIR = [10001599488.0, 10001600512.0]


@SETTINGS
@given(st.lists(float32s, min_size=1, max_size=8), st.sampled_from([np.float32, np.float64]))
def test_a_few_values_are_written_as_many_are(values: list[float], dtype: Any) -> None:
    """Up to eight values are read back one by one, more by numpy: the same texts."""
    for few in (np.array(values, dtype), np.array(_HALFWAY_PAIR, np.float32)):
        many = np.concatenate([few, np.zeros(9, few.dtype)])
        assert decimal_texts(few) == decimal_texts(many)[: len(few)]


def test_a_text_halfway_between_two_float32s_reads_back_as_one_of_them() -> None:
    """SimpleAtof rounds a tie to the even float32 (10001600512): its text
    stays the six digits' and the odd one's takes nine."""
    texts = decimal_texts(np.array(_HALFWAY_PAIR, np.float32))
    assert texts == ["1.00015995e+10", "1.00016e+10"]


# --- reading --------------------------------------------------------------


@SETTINGS
@given(shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=float32s)), formats)
def test_tf_serving_bodies_read_back_bit_for_bit(array: np.ndarray, fmt: str) -> None:
    body = predict_response([("scores", array, DT_FLOAT)], fmt)  # type: ignore[arg-type]
    out = read_predict_response(body, fmt).outputs[None]  # type: ignore[arg-type]
    assert out.name is None and out.kind == "float32"
    nan = np.isnan(array)
    assert out.values.shape == array.shape
    assert np.array_equal(np.isnan(out.values), nan)
    assert out.values[~nan].tobytes() == array[~nan].tobytes()
    reference = loads_leaves(json.loads(body)["predictions" if fmt == "row" else "outputs"])
    assert_matches_loads(out.values, out.kind, reference)


@SETTINGS
@given(
    st.integers(1, 4).flatmap(
        lambda batch: st.tuples(
            hnp.arrays(np.float32, (batch, 3), elements=float32s),
            hnp.arrays(np.float64, (batch,), elements=st.floats(allow_nan=False)),
            hnp.arrays(np.int64, (batch, 2)),
            hnp.arrays(np.bool_, (batch,)),
        )
    ),
    formats,
)
def test_several_outputs_of_several_dtypes(arrays: tuple[np.ndarray, ...], fmt: str) -> None:
    scores, total, ids, flag = arrays
    labels = np.array([f"l{i}".encode() for i in range(len(flag))], dtype=object)
    outputs = [
        ("flag", flag, DT_BOOL), ("ids", ids, DT_INT64), ("label", labels, DT_STRING),
        ("label_bytes", labels, DT_STRING), ("scores", scores, DT_FLOAT),
        ("total", total, DT_DOUBLE),
    ]  # fmt: skip
    body = predict_response(outputs, fmt)  # type: ignore[arg-type]
    read = read_predict_response(body, fmt)  # type: ignore[arg-type]
    assert not read.unnamed and list(read.outputs) == [name for name, _, _ in outputs]
    assert same(read.outputs["scores"].values, scores)
    assert read.outputs["scores"].kind == "float32"
    # A double whose every value prints in 6 digits reads as float32 (see restjson).
    total_out = read.outputs["total"]
    doc = json.loads(body)
    texts = [p["total"] for p in doc["predictions"]] if fmt == "row" else doc["outputs"]["total"]
    assert_matches_loads(total_out.values, total_out.kind, texts)
    if any(len(t) > 15 for t in decimal_texts(total)):
        assert total_out.kind == "float64" and total_out.values.tolist() == total.tolist()
    assert read.outputs["ids"].kind == "int" and np.array_equal(read.outputs["ids"].values, ids)
    assert read.outputs["flag"].kind == "bool"
    assert read.outputs["flag"].values.tolist() == flag.tolist()
    assert read.outputs["label"].values.tolist() == [b.decode() for b in labels]
    assert read.outputs["label_bytes"].values.tolist() == labels.tolist()


def _token(value: float, style: int) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if style == 0:
        return repr(value)
    if style == 1:
        return f"{value:.3E}"
    if style == 2 and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.9g}"


@SETTINGS
@given(
    st.lists(
        st.tuples(st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(0, 3)),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([", ", ",", " ,\n  ", "\t,"]),
    st.integers(1, 4),
)
def test_other_spellings_and_whitespace_match_json_loads(
    values: list[tuple[float, int]], separator: str, width: int
) -> None:
    tokens = [_token(v, style) for v, style in values]
    assume(not all(re.fullmatch(r"-?\d+", t) for t in tokens))  # an int output otherwise
    rows = [tokens[i : i + width] for i in range(0, len(tokens), width)]
    if len(rows[-1]) != width:
        rows = rows[:-1] or [tokens[:width]]
        width = len(rows[0])
    text = "[" + separator.join("[" + separator.join(r) + "]" for r in rows) + "]"
    body = ('{"predictions" :\n' + text + "  }").encode()
    out = read_predict_response(body, "row").outputs[None]
    assert out.values.shape == (len(rows), width)
    assert_matches_loads(out.values, out.kind, loads_leaves(json.loads(body)["predictions"]))


@pytest.mark.parametrize("fmt", ["row", "columnar"])
def test_a_body_of_many_chunks(fmt: str) -> None:
    # Bodies over 256 KiB are scanned in pieces cut between tokens.
    rng = np.random.default_rng(7)
    array = rng.standard_normal((700, 201)).astype(np.float32) * np.float32(1e-3)
    array[::37, ::11] = np.nan
    array[::53, 5] = np.inf
    array[1, :] = rng.integers(-(2**20), 2**20, 201).astype(np.float32)  # whole numbers
    body = predict_response([("p", array, DT_FLOAT)], fmt)  # type: ignore[arg-type]
    assert len(body) > 4 * 2**18
    out = read_predict_response(body, fmt).outputs[None]  # type: ignore[arg-type]
    assert out.kind == "float32" and same(out.values, array)
    nan = np.isnan(array)
    assert out.values[~nan].tobytes() == array[~nan].tobytes()
    doubles = np.concatenate([array.astype(np.float64).ravel() / 3, [0.1, 1e300]])
    body = predict_response([("d", doubles, DT_DOUBLE)], fmt)  # type: ignore[arg-type]
    out = read_predict_response(body, fmt).outputs[None]  # type: ignore[arg-type]
    assert out.kind == "float64" and same(out.values, doubles)


@SETTINGS
@given(st.lists(st.text("0123456789.-+eE", min_size=1, max_size=18), min_size=1, max_size=12))
def test_odd_tokens_are_read_as_json_loads_reads_them_or_refused(tokens: list[str]) -> None:
    body = ('{"predictions": [' + ", ".join(tokens) + "]}").encode()
    try:
        reference = json.loads(body)["predictions"]
    except ValueError:
        reference = None  # restjson may be more lenient ("01") but must not crash
    try:
        out = read_predict_response(body, "row").outputs[None]
    except RestJsonError:
        assert reference is None
        return
    if reference is not None:
        assert_matches_loads(out.values, out.kind, reference)


def test_long_tokens_read_as_float64() -> None:
    body = b'{"predictions": [0.30000000000000004, 1e-300, 0.5]}'
    out = read_predict_response(body, "row").outputs[None]
    assert out.kind == "float64"
    assert out.values.tolist() == [0.30000000000000004, 1e-300, 0.5]


def test_integer_and_string_and_b64_outputs() -> None:
    body = b'{"outputs": {"ids": [[1, -2], [3, 40000000000]], "b_bytes": [{"b64": "aGk="}]}}'
    read = read_predict_response(body, "columnar")
    assert read.outputs["ids"].kind == "int"
    assert read.outputs["ids"].values.tolist() == [[1, -2], [3, 40000000000]]
    assert read.outputs["b_bytes"].kind == "bytes"
    assert read.outputs["b_bytes"].values.tolist() == [b"hi"]


@SETTINGS
@given(
    st.sampled_from([(np.int64, -3, 20_000), (np.int32, 0, 300), (np.uint16, 0, 20_000)]).flatmap(
        lambda t: hnp.arrays(
            t[0],
            hnp.array_shapes(min_dims=1, max_dims=2, max_side=90),
            elements=st.integers(t[1], t[2]),
        )
    )
)
def test_integers_are_written_as_str_writes_them(values: np.ndarray) -> None:
    """Class indices come from a table of texts (large batches of small,
    non-negative ints); every other integer from ``str``. The table stays
    below its bound whatever the values."""
    assert restjson.value_texts(values) == [str(v) for v in values.ravel().tolist()]
    assert len(restjson_text._INT_TEXTS) <= restjson_text._INT_TABLE_MAX


@pytest.mark.parametrize(
    "body",
    [
        b'{"predictions": [1, 2',
        b'{"predictions": [[1, 2], [3]]}',
        b'{"predictions": [1.2.3]}',
        b'{"predictions": [1-2]}',
        b'{"outputs": [1]}',
        b"[1]",
    ],
)
def test_bodies_that_are_not_predict_responses(body: bytes) -> None:
    with pytest.raises(RestJsonError):
        read_predict_response(body, "row")


# --- rewriting --------------------------------------------------------------

TOKEN = re.compile(rb"-?(?:\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|NaN|Infinity)")


@SETTINGS
@given(
    shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=finite32)),
    formats,
    st.data(),
)
def test_untouched_values_keep_their_exact_text(
    array: np.ndarray, fmt: str, data: st.DataObject
) -> None:
    body = predict_response([("p", array, DT_FLOAT)], fmt)  # type: ignore[arg-type]
    read = read_predict_response(body, fmt)  # type: ignore[arg-type]
    mask = data.draw(hnp.arrays(np.bool_, array.shape))
    changed = np.where(mask, np.clip(array, -1, 1) + np.float32(0.25), array).astype(np.float32)
    new = read.rewrite(changed={None: changed})
    old_tokens, new_tokens = TOKEN.findall(body), TOKEN.findall(new)
    assert len(old_tokens) == len(new_tokens) == array.size
    differs = (changed != array).ravel()
    expected = decimal_texts(changed.ravel())
    for i, (old, tok) in enumerate(zip(old_tokens, new_tokens, strict=True)):
        assert tok == (expected[i].encode() if differs[i] else old)
    assert TOKEN.sub(b"#", body) == TOKEN.sub(b"#", new)  # everything else byte for byte
    assert same(read_predict_response(new, fmt).outputs[None].values, changed)  # type: ignore[arg-type]


@SETTINGS
@given(
    st.integers(0, 5).flatmap(lambda b: hnp.arrays(np.float32, (b, 4), elements=finite32)),
    formats,
)
def test_derived_outputs_of_an_unnamed_output(probs: np.ndarray, fmt: str) -> None:
    assume(fmt == "columnar" or probs.shape[0] > 0)
    body = predict_response([("probs", probs, DT_FLOAT)], fmt)  # type: ignore[arg-type]
    read = read_predict_response(body, fmt)  # type: ignore[arg-type]
    assert read.unnamed
    classes = probs.argmax(axis=1) if probs.size else np.zeros(0, np.int64)
    labels = np.array([f"c{c}".encode() for c in classes], dtype=object)
    score = probs.max(axis=1) if probs.size else np.zeros(0, np.float32)
    derived = [("probs_class", classes), ("probs_label", labels), ("probs_score", score)]
    doc = json.loads(read.rewrite(derived={None: derived}))
    key = "predictions" if fmt == "row" else "outputs"
    assert list(doc) == [key, GUARD_OUTPUTS_KEY]
    assert doc[key] == json.loads(body)[key]
    if fmt == "row":
        assert doc[GUARD_OUTPUTS_KEY] == [
            {"probs_class": int(c), "probs_label": lab.decode(), "probs_score": doc_score(s)}
            for c, lab, s in zip(classes, labels, score, strict=True)
        ]
    else:
        assert doc[GUARD_OUTPUTS_KEY] == {
            "probs_class": classes.tolist(),
            "probs_label": [lab.decode() for lab in labels],
            "probs_score": [doc_score(s) for s in score],
        }


def doc_score(value: np.float32) -> float:
    """What json.loads gives back for a float32 written the TF way."""
    return float(decimal_texts(np.array([value], np.float32))[0])


@SETTINGS
@given(st.integers(1, 4).flatmap(lambda b: hnp.arrays(np.float32, (b, 3), elements=finite32)))
def test_derived_outputs_sit_next_to_their_named_source(scores: np.ndarray) -> None:
    ids = np.arange(scores.shape[0], dtype=np.int64)
    outputs = [("ids", ids, DT_INT64), ("scores", scores, DT_FLOAT)]
    derived = [("scores_class", scores.argmax(axis=1)), ("scores_top", np.sort(scores)[:, ::-1])]
    for fmt in ("row", "columnar"):
        body = predict_response(outputs, fmt)  # type: ignore[arg-type]
        new = read_predict_response(body, fmt).rewrite(derived={"scores": derived})  # type: ignore[arg-type]
        doc = json.loads(new)
        if fmt == "row":
            for i, instance in enumerate(doc["predictions"]):
                assert list(instance) == ["ids", "scores", "scores_class", "scores_top"]
                assert instance["scores_class"] == int(derived[0][1][i])
                assert np.float32(instance["scores_top"]).tolist() == derived[1][1][i].tolist()
        else:
            assert list(doc["outputs"]) == ["ids", "scores", "scores_class", "scores_top"]
            assert doc["outputs"]["scores_class"] == derived[0][1].tolist()
        assert GUARD_OUTPUTS_KEY not in doc


def test_derived_text_is_laid_out_like_tf_serving() -> None:
    scores = np.array([[0.5, 0.25]], np.float32)
    body = predict_response(
        [("a", np.array([1], np.int64), DT_INT64), ("s", scores, DT_FLOAT)], "row"
    )
    new = read_predict_response(body, "row").rewrite(derived={"s": [("s_class", np.array([0]))]})
    expected = predict_response(
        [
            ("a", np.array([1], np.int64), DT_INT64),
            ("s", scores, DT_FLOAT),
            ("s_class", np.array([0], np.int64), DT_INT64),
        ],
        "row",
    )
    assert new == expected


def test_a_derived_name_that_exists_is_refused() -> None:
    outputs: list[tuple[str, Any, int]] = [
        ("s", np.zeros((1, 2), np.float32), DT_FLOAT),
        ("s_class", np.zeros(1), DT_DOUBLE),
    ]
    read = read_predict_response(predict_response(outputs, "row"), "row")
    with pytest.raises(RestJsonError, match="would replace"):
        read.rewrite(derived={"s": [("s_class", np.zeros(1, np.int64))]})
    with pytest.raises(RestJsonError, match="instances"):
        read.rewrite(derived={"s": [("s_top", np.zeros(3, np.int64))]})


def test_a_clean_response_comes_back_unchanged() -> None:
    body = predict_response([("p", np.array([[0.1, 0.9]], np.float32), DT_FLOAT)], "row")
    read = read_predict_response(body, "row")
    assert read.rewrite() is body
    assert read.rewrite(changed={None: read.outputs[None].values.copy()}) == body


@SETTINGS
@given(
    st.integers(0, 20).flatmap(
        lambda b: st.tuples(
            st.just(b),
            hnp.arrays(np.float32, st.sampled_from([(b,), (b, 3), (b, 2, 2)]), elements=float32s),
            hnp.arrays(
                np.int64,
                st.sampled_from([(b,), (b, 0), (b, 2)]),
                elements=st.integers(-(2**63), 2**63 - 1),
            ),
        )
    )
)
def test_small_and_large_batches_write_instance_members_alike(
    case: tuple[int, np.ndarray, np.ndarray],
) -> None:
    # A small batch is joined directly, a large one through a template: the
    # same members either way, whatever the batch size.
    batch, scores, classes = case
    labels = np.array([f"c%{i}\n".encode() for i in range(batch)], dtype=object)
    items = [("s%_score", scores), ("s_class", classes), ("s_label", labels)]
    members = restjson_members  # where _row_members reads _SMALL_BATCH
    direct = members._row_members(items, batch, members._plain_texts, members._MEMBER)
    small, members._SMALL_BATCH = members._SMALL_BATCH, -1  # hypothesis: no monkeypatch
    try:
        templated = members._row_members(items, batch, members._plain_texts, members._MEMBER)
    finally:
        members._SMALL_BATCH = small
    assert direct == templated
    assert len(direct) == batch


def test_only_short_strings_are_kept_in_the_json_string_cache() -> None:
    """Names and labels repeat; error messages and model strings must not
    fill the cache with long keys."""
    cache = restjson_text._cached_json_string
    long = "guard: " + "x" * 200 + '"\\\x01'
    before = cache.cache_info().currsize
    assert json.loads(restjson.json_string(long)) == long
    assert cache.cache_info().currsize == before
    assert json.loads(restjson.json_string('a "label"')) == 'a "label"'
    assert restjson.json_string('a "label"') == restjson_text._json_string('a "label"')
    info = cache.cache_info()
    assert info.maxsize == 1024 and info.currsize <= 1024


# --- hostile upstream answers -----------------------------------------------
# json.loads is the client: what it reads from each body is what the guard
# must have checked, or the body is refused.

_TWICE, _BOTH = "'predictions' twice", "both 'predictions' and 'outputs'"
OUTPUTS_TWICE = [
    (b'{"predictions": [[0.5], [0.2]], "predictions": [[1.9], [-5]]}', "row", _TWICE),
    (b'{"predictions": [[1.9], [-5]], "predictions": [[0.5], [0.2]]}', "row", _TWICE),
    (b'{"outputs": [[0.5], [0.2]], "outputs": [[1.9], [-5]]}', "columnar", "'outputs' twice"),
    (b'{"predictions": [[0.5]], "predict\\u0069ons": [[1.9]]}', "row", _TWICE),
    (b'{"predictions": [[0.5]], "outputs": [[1.9]]}', "row", _BOTH),
    (
        b'{"outputs": [[1.9]], "predictions": [[0.5]]}',
        "columnar",
        "both 'outputs' and 'predictions'",
    ),
    (b'{"outputs": {"p": [[0.5]], "p": [[1.9]]}}', "columnar", "output 'p' is named twice"),
    (b'{"predictions": [{"p": [0.5], "p": [1.9]}]}', "row", "output 'p' is named twice"),
]


@pytest.mark.parametrize("body, fmt, held", OUTPUTS_TWICE)
def test_an_output_written_twice_is_refused(body: bytes, fmt: str, held: str) -> None:
    """json.loads keeps the last of two equal keys, rapidjson the first: which
    one a client reads is unknown, so neither may pass as checked."""
    with pytest.raises(RestJsonError) as caught:
        read_predict_response(body, fmt)  # type: ignore[arg-type]
    assert held in str(caught.value) and "cannot tell which one the client reads" in str(
        caught.value
    )
    first_wins = json.loads(body, object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    last_wins = json.loads(body)
    assert first_wins != last_wins or set(last_wins) == {"predictions", "outputs"}


@pytest.mark.parametrize(
    "body, fmt",
    [(b'{"predictions": [[0.5]], "Predictions": [[1.9]]}', "row"),
     (b'{"PREDICTIONS": [[1.9]], "predictions": [[0.5]]}', "row"),
     (b'{"predictions": [[0.5]], "prediction\\u017f": [[1.9]]}', "row"),  # long s folds to s
     (b'{"outputs": [[0.5]], "\\u212aoutputs": [], "OUTPUTS": [[1.9]]}', "columnar")],
)  # fmt: skip
def test_an_output_member_in_other_case_is_refused(body: bytes, fmt: str) -> None:
    """Red team: Go's encoding/json matches member names without regard to
    case (Unicode folding) and keeps the last, so a Go client read 1.9 where
    the guard checked 0.5. Each body here reads otherwise to a folding reader."""
    exact = json.loads(body)[_ROOT[fmt]]
    for order in (1, -1):  # folding readers that keep the last member, or the first

        def fold(pairs: list[tuple[str, Any]], order: int = order) -> dict[str, Any]:
            return {k.casefold(): v for k, v in pairs[::order]}

        if json.loads(body, object_pairs_hook=fold)[_ROOT[fmt]] != exact:
            break
    else:
        raise AssertionError("every folding reader reads what the guard reads")
    with pytest.raises(RestJsonError, match="both '"):
        read_predict_response(body, fmt)  # type: ignore[arg-type]


_ROOT = {"row": "predictions", "columnar": "outputs"}


@pytest.mark.parametrize(
    "body, fmt",
    [(b'{"outputs": {"p": [[0.5]], "P": [[1.9]]}}', "columnar"),
     (b'{"predictions": [{"P": [1.9], "p": [0.5]}]}', "row")],
)  # fmt: skip
def test_output_names_that_differ_only_in_case_are_refused(body: bytes, fmt: str) -> None:
    """Red team: 'p' and 'P' passed as two outputs, the guard checking p's
    0.5, while a reader that folds case (Go's encoding/json, keeping the
    last member) read 1.9 as p."""

    def p_read(body: bytes, order: int) -> Any:
        def fold(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            return {k.casefold(): v for k, v in pairs[::order]}

        outputs = json.loads(body, object_pairs_hook=fold)[_ROOT[fmt]]
        return (outputs if fmt == "columnar" else outputs[0])["p"]

    exact = json.loads(body)[_ROOT[fmt]]
    assert {str(p_read(body, 1)), str(p_read(body, -1))} != {
        str((exact if fmt == "columnar" else exact[0])["p"])
    }
    with pytest.raises(RestJsonError, match="differ only in case"):
        read_predict_response(body, fmt)  # type: ignore[arg-type]


@pytest.mark.parametrize("tail", [b' {"predictions": [[1.9]]}', b"\0", b"\n\n[1.9]", b"x"])
@pytest.mark.parametrize("single", [False, True])
def test_anything_but_whitespace_after_the_root_is_refused(tail: bytes, single: bool) -> None:
    """Red team: a second document after the first passed as checked; stream
    readers (jq, raw_decode loops) read it, and json.loads refuses the body."""
    body = b'{"predictions": [[0.5], [0.25]]}' + tail
    with pytest.raises(json.JSONDecodeError, match="Extra data"):
        json.loads(body)
    scan = native().number_scan if single else None
    with pytest.raises(RestJsonError, match="goes on after its JSON object"):
        read_predict_response(body, "row", scan)
    assert read_predict_response(body[: -len(tail)] + b" \r\n", "row", scan).outputs


def test_other_keys_twice_leave_the_output_as_json_loads_reads_it() -> None:
    body = b'{"predictions": [[0.5], [0.25]], "x": 1, "x": [2], "guard_x": {}}'
    out = read_predict_response(body, "row").outputs[None]
    assert out.values.tolist() == json.loads(body)["predictions"]


@pytest.mark.parametrize("digits", [20, 400, 4301, 5000, 100_000])
@pytest.mark.parametrize("sign", ["", "-"])
def test_integers_past_int64_read_as_the_float_of_their_text(digits: int, sign: str) -> None:
    """No int() of the digits: past 4,300 it raises ValueError, and past 309
    digits float(int) overflows. Their value is float64's (inf past its range)."""
    token = sign + "7" * digits
    body = ('{"predictions": [[' + token + "], [0.25]]}").encode()
    out = read_predict_response(body, "row").outputs[None]
    reference = json.loads(body, parse_int=float)["predictions"]
    assert out.kind == "float64"
    assert out.values.tolist() == reference
    assert math.isinf(reference[0][0]) == (digits > 308)


def test_an_integer_output_with_one_integer_past_int64_is_float64() -> None:
    body = b'{"outputs": [1, 2, 77777777777777777777, -3]}'
    out = read_predict_response(body, "columnar").outputs[None]
    assert out.kind == "float64"
    assert out.values.tolist() == json.loads(body, parse_int=float)["outputs"]
    assert (
        read_predict_response(body.replace(b"77777777777777777777", b"4"), "columnar")
        .outputs[None]
        .kind
        == "int"
    )


def test_a_ten_megabyte_number_costs_what_reading_ten_megabytes_costs() -> None:
    """Its digits were searched for their end one by one: 0.9 s of CPU."""
    for token in (b"7" * 10_000_000, b"0." + b"7" * 10_000_000):
        body = b'{"predictions": [[' + token + b"], [0.25]]}"
        started = time.thread_time()
        out = read_predict_response(body, "row").outputs[None]
        cpu = time.thread_time() - started
        assert out.values.tolist() == json.loads(body, parse_int=float)["predictions"]
        assert cpu < 0.5, f"{cpu:.2f} s of CPU"


@pytest.mark.parametrize("text", ["Y", "YWJj2", "YQ=a", "é"])
def test_bad_base64_is_refused(text: str) -> None:
    body = json.dumps({"outputs": {"p": [[0.5]], "b_bytes": [{"b64": text}]}}).encode()
    with pytest.raises(RestJsonError, match="bad base64"):
        read_predict_response(body, "columnar")


def test_an_upstream_guard_outputs_member_is_kept_unless_the_guard_would_write_one() -> None:
    body = b'{"predictions": [[0.9], [0.2]], "guard_outputs": [{"p_class": [0]}, {}]}'
    read = read_predict_response(body, "row")
    assert read.guard_outputs_taken
    assert not read_predict_response(b'{"predictions": [[0.9]]}', "row").guard_outputs_taken
    clamped = read.rewrite(changed={None: np.array([[0.5], [0.2]], np.float32)})
    assert json.loads(clamped) == {**json.loads(body), "predictions": [[0.5], [0.2]]}
    with pytest.raises(RestJsonError, match="already has a top-level 'guard_outputs' member"):
        read.rewrite(derived={None: [("p_class", np.array([1, 0]))]})
