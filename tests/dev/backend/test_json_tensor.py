"""guard.dev.backend.json_tensor against the texts tensorflow/serving and rapidjson v1.1.0 give.

No TensorFlow and no server: the expected strings follow json_tensor.cc,
json_tensor_test.cc and rapidjson's reader/writer (see docs/backend.md, REST).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from guard.dev.backend import json_tensor as jt

F, D, I32, U8, I64, S, B = (
    jt.DT_FLOAT, jt.DT_DOUBLE, jt.DT_INT32, jt.DT_UINT8, jt.DT_INT64, jt.DT_STRING, jt.DT_BOOL,
)  # fmt: skip


def error(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(jt.JsonTensorError) as info:
        fn(*args, **kwargs)
    return info.value.code.name, info.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "The document is empty"),  # TF's own check, no offset
        (b"  \n", "The document is empty. at offset: 3"),
        (b"]", "The document is empty. at offset: 0"),
        (b"instances = [1, 2]", "Invalid value. at offset: 0"),
        (b'{"a": [1, 2', "Missing a comma or ']' after an array element. at offset: 11"),
        (b'{"a": [1,]}', "Invalid value. at offset: 9"),
        (b'{"a" 1}', "Missing a colon after a name of object member. at offset: 5"),
        (b'{"a": 1,}', "Missing a name for object member. at offset: 8"),
        (b'{"a": 1 "b": 2}', "Missing a comma or '}' after an object member. at offset: 8"),
        (b'{"a": tru}', "Invalid value. at offset: 9"),
        (b'{"a": "x\\q"}', "Invalid escape character in string. at offset: 8"),
        (b'{"a": "x\ty"}', "Invalid escape character in string. at offset: 8"),
        (b'{"a": "x', "Missing a closing quotation mark in string. at offset: 8"),
        (b'{"a": "\\u12g4"}', "Incorrect hex digit after \\u escape in string. at offset: 7"),
        (b'{"a": "\\ud800x"}', "The surrogate pair in string is invalid. at offset: 7"),
        (b'{"a": 1.}', "Miss fraction part in number. at offset: 8"),
        (b'{"a": 1e}', "Miss exponent in number. at offset: 8"),
        (b'{"a": 1e400}', "Number too big to be stored in double. at offset: 6"),
        (b'{"a": Nan}', "Invalid value. at offset: 8"),
        (b'{"a": [1\x00]}', "Missing a comma or ']' after an array element. at offset: 8"),
    ],
)  # fmt: skip
def test_parse_errors_are_rapidjsons(body: bytes, message: str) -> None:
    assert error(jt.parse_json, body) == ("INVALID_ARGUMENT", "JSON Parse error: " + message)


def test_what_rapidjson_accepts_beyond_json() -> None:
    assert jt.parse_json(b'{"instances": [1]}trailing junk') == {"instances": [1]}
    assert jt.parse_json(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}
    values = jt.parse_json(b"[Inf, -Inf, Infinity, -Infinity, NaN, -NaN]")
    assert values[:4] == [math.inf, -math.inf, math.inf, -math.inf]
    assert math.isnan(values[4]) and math.isnan(values[5])
    assert jt.parse_json(b'{"a": 1, "a": 2}') == {"a": 1}  # FindMember finds the first
    lone = jt.parse_json(b'["\\udc80", "\\ud83d\\ude00"]')
    assert [s.encode("utf-8", "surrogateescape") for s in lone] == [
        b"\xed\xb2\x80",  # v1.1.0 encodes a lone low surrogate as it is
        "\U0001f600".encode(),
    ]
    assert jt.parse_json(b"[18446744073709551615, 18446744073709551616]") == [
        2**64 - 1,
        float(2**64),
    ]


def test_debug_strings() -> None:
    assert jt.debug_string({"a": [1, 2.5, "x"], "b": {}}) == (
        '{\n    "a": [1, 2.5, "x"],\n    "b": {}\n}'
    )
    assert jt.debug_string([1.0, 1e21, 1e-7, 0.001, -0.0, 1e22]) == (
        "[1.0, 1e21, 1e-7, 0.001, -0.0, 1e22]"
    )
    assert jt.debug_string([1, math.nan, 2]) == "[1, "  # Writer::Double fails on NaN
    long = jt.debug_string(list(range(200)))
    assert long.startswith("[0, 1, 2") and not long.endswith("]")
    assert 256 <= len(long) < 262  # stops once 256 bytes are written
    assert jt.debug_string('a\x01"\\/é') == '"a\\u0001\\"\\\\/é"'


def test_row_format_errors() -> None:
    two = {"a": F, "b": F}
    assert error(jt.predict_inputs, {"instances": [[1.0]]}, two) == (
        "INVALID_ARGUMENT",
        "instances is a plain list, but expecting list of objects as multiple input tensors "
        "required as per tensorinfo_map",
    )
    assert error(jt.predict_inputs, {"instances": [{"a": 1, "z": 2}]}, two)[1] == (
        "Failed to process element: 0 key: z of 'instances' list. Error: INVALID_ARGUMENT: "
        "JSON object: does not have named input: z"
    )
    assert error(jt.predict_inputs, {"instances": [{"a": 1, "b": 1}, [1]]}, two)[1] == (
        "Expecting object but got list at item 1 of input list"
    )
    assert error(jt.predict_inputs, {"instances": [[1], {"x": 1}]}, {"x": F})[1] == (
        "Expecting value/list but got object at item 1 of input list"
    )
    prefix = "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: "
    assert error(jt.predict_inputs, {"instances": [[1, [2]]]}, {"x": F})[1] == (
        prefix + "Encountered list at unexpected level: 1 expected < 1"
    )
    # TF prints level + 1 against the rank, hence "level: 2 ... Expected at level: 2".
    assert error(jt.predict_inputs, {"instances": [[[1], 2]]}, {"x": F})[1] == (
        prefix + "JSON Value: 2 found at incorrect level: 2 in the JSON DOM. Expected at level: 2"
    )


def test_values_by_dtype() -> None:
    def one(value: Any, dtype: int) -> Any:
        tensors, _ = jt.predict_inputs({"inputs": value}, {"x": dtype}, literals=True)
        return tensors["x"]

    assert one([1, 2.5], F).dtype == np.float32
    assert one([300], U8).tolist() == [44]  # int_val holds it; the cast wraps
    assert one([2**40], I64).tolist() == [2**40]
    assert one([True, False], B).tolist() == [True, False]
    assert one(["hi", {"b64": "aGk="}], S).tolist() == [b"hi", b"hi"]
    assert (
        error(one, [1.0], I32)[1] == "JSON Value: 1.0 Type: Number is not of expected type: int32"
    )
    assert error(one, [2**31], I32)[1] == (
        "JSON Value: 2147483648 Type: Number is not of expected type: int32"
    )
    assert error(one, [1], B)[1] == "JSON Value: 1 Type: Number is not of expected type: bool"
    assert error(one, [None], F)[1] == "JSON Value: null Type: Null is not of expected type: float"
    assert error(one, [{"b64": "a", "c": 1}], S)[1] == (
        'JSON Value: {\n    "b64": "a",\n    "c": 1\n} not formatted correctly for base64 data'
    )
    assert error(one, [{"b64": "!!"}], S)[1] == "Unable to base64 decode"
    assert error(one, [1.0], 19) == ("UNIMPLEMENTED", "Conversion of JSON Value: 1.0 to type: half")


def test_columnar_objects_ignore_extra_keys_and_name_the_missing() -> None:
    tensors, fmt = jt.predict_inputs({"inputs": {"a": [1.0], "zzz": "ignored"}}, {"a": F})
    assert fmt == "columnar" and tensors["a"].tolist() == [1.0]
    assert error(jt.predict_inputs, {"inputs": {"b": [1]}}, {"a": F})[1] == (
        "Missing named input: a in 'inputs' object."
    )


def test_responses() -> None:
    ints = np.array([[1, 2], [3, 4]], np.int64)
    assert jt.predict_response([("x", ints, I64)], "row") == (
        b'{\n    "predictions": [[1, 2], [3, 4]\n    ]\n}'
    )
    assert jt.predict_response([("x", np.zeros((0, 2), np.float32), F)], "row") == (
        b'{\n    "predictions": []\n}'
    )
    assert jt.predict_response([("x", np.array(2.5, np.float64), D)], "columnar") == (
        b'{\n    "outputs": 2.5\n}'
    )
    assert error(jt.predict_response, [], "row")[1] == "Cannot convert empty tensor map to JSON"
    assert error(
        jt.predict_response,
        [("a", np.zeros((2, 1), np.float32), F), ("b", np.zeros((3,), np.float32), F)],
        "row",
    )[1] == ("Tensor name: b has inconsistent batch size: 3 expecting: 2")
    # An empty tensor of a dtype the writer lacks passes: no value is ever written.
    assert jt.predict_response([("h", np.zeros((0,), np.float16), 19)], "columnar")
    assert jt.error_body("a\nb") == b'{\n    "error": "a\\nb"\n}'
