"""JSON <-> tensors for the local backend's REST API, as tensorflow/serving does it.

Requests follow ``util/json_tensor.cc``'s ``FillPredictRequestFromJson`` (row
``"instances"`` or columnar ``"inputs"``, ``"signature_name"``), parsed with the
semantics of the rapidjson release TF Serving pins (v1.1.0, with
``kParseIterativeFlag | kParseNanAndInfFlag | kParseStopWhenDoneFlag``);
responses follow ``MakeJsonFromTensors`` and errors ``MakeJsonFromStatus``.
Error texts are TF Serving's, including rapidjson's parse messages and its
256-byte debug rendering of the offending JSON value.

TensorFlow-free: dtypes are TF's ``DataType`` enum numbers, tensors are numpy
arrays. Value formatting (floats, strings, the pretty layout) is shared with the
proxy's reader in :mod:`guard.dataplane.codec.restjson`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal

import grpc
import numpy as np

from guard.dataplane.codec.restjson import INDENT, json_string, nest_text, value_texts

__all__ = [
    "JsonTensorError",
    "RequestFormat",
    "debug_string",
    "error_body",
    "parse_json",
    "predict_inputs",
    "predict_response",
    "signature_name",
]

Array = np.ndarray[Any, Any]
RequestFormat = Literal["row", "columnar"]

# tensorflow/core/framework/types.proto
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_INT64, DT_BOOL, DT_UINT32, DT_UINT64 = 9, 10, 22, 23
_DTYPE_NAMES = {
    1: "float", 2: "double", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
    8: "complex64", 9: "int64", 10: "bool", 11: "qint8", 12: "quint8", 13: "qint32",
    14: "bfloat16", 15: "qint16", 16: "quint16", 17: "uint16", 18: "complex128",
    19: "half", 20: "resource", 21: "variant", 22: "uint32", 23: "uint64",
}  # fmt: skip
_NUMPY = {
    DT_FLOAT: np.float32, DT_DOUBLE: np.float64, DT_INT32: np.int32, DT_UINT8: np.uint8,
    DT_INT16: np.int16, DT_INT8: np.int8, DT_INT64: np.int64, DT_BOOL: np.bool_,
    DT_UINT32: np.uint32, DT_UINT64: np.uint64,
}  # fmt: skip
_WRITABLE = {*_NUMPY, DT_STRING}  # AddSingleValueAndAdvance's cases
_DEBUG_LIMIT = 256  # kMaxJsonDebugStringBytes


def dtype_name(dtype: int) -> str:
    """TensorFlow's DataTypeString spelling."""
    return _DTYPE_NAMES.get(dtype, f"unknown dtype enum {dtype}")


class JsonTensorError(Exception):
    """A request or response that TF Serving rejects, with its status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> JsonTensorError:
    return JsonTensorError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _status_text(error: JsonTensorError) -> str:
    """absl::Status::ToString(): ``CODE_NAME: message``."""
    return f"{error.code.name}: {error.message}"


# ---------------------------------------------------------------------------
# Parsing: Python's json for the common case, an emulation of rapidjson v1.1.0
# for everything else (its error messages and offsets, and what it accepts that
# Python's json does not: Inf, -NaN, lone low surrogates, ...).

_PARSE_MESSAGES = {
    "empty": "The document is empty.",
    "value": "Invalid value.",
    "name": "Missing a name for object member.",
    "colon": "Missing a colon after a name of object member.",
    "member": "Missing a comma or '}' after an object member.",
    "element": "Missing a comma or ']' after an array element.",
    "hex": "Incorrect hex digit after \\u escape in string.",
    "surrogate": "The surrogate pair in string is invalid.",
    "escape": "Invalid escape character in string.",
    "quote": "Missing a closing quotation mark in string.",
    "big": "Number too big to be stored in double.",
    "fraction": "Miss fraction part in number.",
    "exponent": "Miss exponent in number.",
}
# Bodies Python's json would read differently from rapidjson: surrogate escapes,
# numbers with huge exponents or 20+ digit integers, embedded NULs.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_NUMBER_SHAPES = bytes(
    ord("0") if chr(c) in "0123456789" else ord("e") if chr(c) in "eE"
    else ord("s") if chr(c) in "+-" else ord(".") if c == 0x2E else ord(" ")
    for c in range(256)
)  # fmt: skip


def _needs_rapidjson(body: bytes) -> bool:
    """Cheap byte scans (no regex over the numbers: that backtracks on every digit)."""
    if b"\x00" in body or (b"\\u" in body and _SURROGATE_ESCAPE.search(body)):
        return True
    shapes = body.translate(_NUMBER_SHAPES)
    return b"e000" in shapes or b"es000" in shapes or _long_integer(shapes)


def _long_integer(shapes: bytes) -> bool:
    """A run of 20+ digits that is a whole integer token (not a fraction's digits)."""
    at = shapes.find(b"0" * 20)
    while at >= 0:
        start, end = at, at + 20
        while start > 0 and shapes[start - 1] == 0x30:
            start -= 1
        while end < len(shapes) and shapes[end] == 0x30:
            end += 1
        before = shapes[start - 1] if start else 0x20
        after = shapes[end] if end < len(shapes) else 0x20
        if before != 0x2E and after not in (0x2E, 0x65):
            return True
        at = shapes.find(b"0" * 20, end)
    return False


_LITERALS = re.compile(rb"true|false|null")


class _ParseError(Exception):
    def __init__(self, kind: str, offset: int) -> None:
        super().__init__(kind)
        self.kind = kind
        self.offset = offset


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)  # rapidjson's FindMember returns the first
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_first_wins)


def parse_json(body: bytes) -> Any:
    """The JSON document in ``body``, or INVALID_ARGUMENT with TF Serving's message.

    Strings come back as ``str`` holding the raw bytes (``surrogateescape``);
    integers as ``int``, other numbers as ``float``, objects as ``dict`` (the first
    of duplicate keys wins). Anything after the root value is ignored.
    """
    if not body:
        raise _invalid("JSON Parse error: The document is empty")
    start = 3 if body.startswith(b"\xef\xbb\xbf") else 0  # rapidjson skips a UTF-8 BOM
    try:
        if not _needs_rapidjson(body):
            try:
                return _python_json(body, start)
            except ValueError:
                pass  # rapidjson decides: its error, or what it accepts beyond JSON
        return _RapidJson(body, start).parse()
    except _ParseError as exc:
        message = _PARSE_MESSAGES[exc.kind]
        raise _invalid(f"JSON Parse error: {message} at offset: {exc.offset}") from None
    except RecursionError:
        raise _invalid("JSON Parse error: nesting too deep for the local backend") from None


def _python_json(body: bytes, start: int) -> Any:
    text = body[start:].decode("utf-8", "surrogateescape")
    i = len(text) - len(text.lstrip(" \t\n\r"))
    if i == len(text):
        raise ValueError("empty")
    return _DECODER.raw_decode(text, i)[0]


class _RapidJson:
    """A byte-level emulation of rapidjson v1.1.0's iterative reader."""

    def __init__(self, data: bytes, start: int) -> None:
        nul = data.find(b"\x00", start)  # a NUL ends rapidjson's input stream
        self.data = data if nul < 0 else data[:nul]
        self.i = start

    def peek(self) -> int:
        return self.data[self.i] if self.i < len(self.data) else 0

    def ws(self) -> int:
        while self.peek() in (0x20, 0x0A, 0x0D, 0x09):
            self.i += 1
        return self.peek()

    def fail(self, kind: str, offset: int | None = None) -> _ParseError:
        return _ParseError(kind, self.i if offset is None else offset)

    def parse(self) -> Any:
        c = self.ws()
        if c == 0 or c in b"]}:,":
            raise self.fail("empty")
        return self.value()

    def value(self) -> Any:
        c = self.peek()
        if c == 0x7B:
            return self.object()
        if c == 0x5B:
            return self.array()
        if c == 0x22:
            return self.string()
        if c in b"tfn":
            return self.literal()
        return self.number()

    def object(self) -> dict[str, Any]:
        self.i += 1
        members: list[tuple[str, Any]] = []
        c = self.ws()
        if c == 0x7D:
            self.i += 1
            return {}
        while True:
            if c != 0x22:
                raise self.fail("name")
            key = self.string()
            if self.ws() != 0x3A:
                raise self.fail("colon")
            self.i += 1
            c = self.ws()
            if c == 0 or c in b"]}:,":
                raise self.fail("value")
            members.append((key, self.value()))
            c = self.ws()
            if c == 0x7D:
                self.i += 1
                return _first_wins(members)
            if c != 0x2C:
                raise self.fail("member")
            self.i += 1
            c = self.ws()

    def array(self) -> list[Any]:
        self.i += 1
        items: list[Any] = []
        c = self.ws()
        if c == 0x5D:
            self.i += 1
            return items
        while True:
            if c == 0 or c in b"]}:,":
                raise self.fail("value")
            items.append(self.value())
            c = self.ws()
            if c == 0x5D:
                self.i += 1
                return items
            if c != 0x2C:
                raise self.fail("element")
            self.i += 1
            c = self.ws()

    def literal(self) -> Any:
        for word, value in ((b"true", True), (b"false", False), (b"null", None)):
            if self.peek() == word[0]:
                self.i += 1
                for expected in word[1:]:
                    if self.peek() != expected:
                        raise self.fail("value")
                    self.i += 1
                return value
        raise self.fail("value")  # pragma: no cover - value() only calls with t/f/n

    def string(self) -> str:
        self.i += 1
        out = bytearray()
        while True:
            c = self.peek()
            if c == 0x5C:
                out += self.escape()
            elif c == 0x22:
                self.i += 1
                return out.decode("utf-8", "surrogateescape")
            elif c < 0x20:
                raise self.fail("quote" if c == 0 else "escape")
            else:
                out.append(c)
                self.i += 1

    _SIMPLE = {0x22: b'"', 0x5C: b"\\", 0x2F: b"/", 0x62: b"\b", 0x66: b"\f", 0x6E: b"\n",
               0x72: b"\r", 0x74: b"\t"}  # fmt: skip

    def escape(self) -> bytes:
        at = self.i
        self.i += 1
        e = self.peek()
        if e in self._SIMPLE:
            self.i += 1
            return self._SIMPLE[e]
        if e != 0x75:
            raise self.fail("escape", at)
        self.i += 1
        code = self.hex4(at)
        if 0xD800 <= code <= 0xDBFF:
            if self.peek() != 0x5C or self.data[self.i + 1 : self.i + 2] != b"u":
                raise self.fail("surrogate", at)
            self.i += 2
            low = self.hex4(at)
            if not 0xDC00 <= low <= 0xDFFF:
                raise self.fail("surrogate", at)
            code = ((code - 0xD800) << 10 | (low - 0xDC00)) + 0x10000
        return chr(code).encode("utf-8", "surrogatepass")  # a lone low surrogate too

    def hex4(self, at: int) -> int:
        digits = self.data[self.i : self.i + 4]
        if len(digits) < 4 or any(chr(d) not in "0123456789abcdefABCDEF" for d in digits):
            raise self.fail("hex", at)
        self.i += 4
        return int(digits, 16)

    def number(self) -> float | int:
        return _RapidNumber(self).parse()


class _RapidNumber:
    """rapidjson v1.1.0's ParseNumber (normal precision), on a :class:`_RapidJson`."""

    def __init__(self, reader: _RapidJson) -> None:
        self.r = reader
        self.start = reader.i

    def take_digits(self) -> str:
        r, begin = self.r, self.r.i
        while 0x30 <= r.peek() <= 0x39:
            r.i += 1
        return r.data[begin : r.i].decode("ascii")

    def consume(self, char: bytes) -> bool:
        if self.r.peek() == char[0]:
            self.r.i += 1
            return True
        return False

    def parse(self) -> float | int:
        minus = self.consume(b"-")
        c = self.r.peek()
        if c == 0x30:
            self.r.i += 1
            integer = "0"
        elif 0x31 <= c <= 0x39:
            integer = self.take_digits()
        elif c in (0x49, 0x4E):
            return self.nan_or_inf(minus)
        else:
            raise self.r.fail("value")
        return self.finish(minus, integer)

    def nan_or_inf(self, minus: bool) -> float:
        if self.consume(b"N"):
            if self.consume(b"a") and self.consume(b"N"):
                return math.nan
            raise self.r.fail("value")
        if self.consume(b"I") and self.consume(b"n") and self.consume(b"f"):
            if self.r.peek() == 0x69:
                for char in (b"i", b"n", b"i", b"t", b"y"):
                    if not self.consume(char):
                        raise self.r.fail("value")
            return -math.inf if minus else math.inf
        raise self.r.fail("value")

    def finish(self, minus: bool, integer: str) -> float | int:
        fraction = exponent = None
        if self.consume(b"."):
            fraction = self.take_digits()
            if not fraction:
                raise self.r.fail("fraction")
        if self.consume(b"e") or self.consume(b"E"):
            exponent = self.exponent(integer, fraction)
        value = int(integer)
        if fraction is None and exponent is None and value <= (2**63 if minus else 2**64 - 1):
            return -value if minus else value
        if fraction is None and exponent is None and value >= 10**309:
            raise self.r.fail("big", self.start)
        return self.double(minus, integer, fraction or "", exponent or 0)

    def exponent(self, integer: str, fraction: str | None) -> int:
        negative = False
        if not self.consume(b"+"):
            negative = self.consume(b"-")
        digits = self.take_digits()
        if not digits:
            raise self.r.fail("exponent")
        value = int(digits)
        if not negative and value > 308 + len((fraction or "")[:17]):
            raise self.r.fail("big", self.start)
        return -value if negative else value

    @staticmethod
    def double(minus: bool, integer: str, fraction: str, exponent: int) -> float:
        """Normal precision: up to 17 significant digits as a double, then one
        multiplication or division by a (table) power of ten."""
        digits = (integer + fraction).lstrip("0") or "0"
        kept = digits[:17]
        scale = exponent - len(fraction) + (len(digits) - len(kept))
        significand = float(int(kept))
        if scale < -308:
            significand = significand / 1e308 if significand else 0.0
            scale += 308
            value = 0.0 if scale < -308 else significand / 10.0**-scale
        elif scale >= 0:
            value = significand * 10.0**scale if scale <= 308 else math.inf
        else:
            value = significand / 10.0**-scale
        return -value if minus else value


# ---------------------------------------------------------------------------
# JsonValueToDebugString: PrettyWriter, kFormatSingleLineArray, 256 bytes.


_TYPE_STRINGS: tuple[tuple[type, str], ...] = (
    (dict, "Object"),
    (list, "Array"),
    (str, "String"),
)


def _type_string(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value).replace("None", "Null")
    for kind, name in _TYPE_STRINGS:
        if isinstance(value, kind):
            return name
    return "Number"


def _double_text(d: float) -> str | None:
    """rapidjson's Writer::Double (Grisu2 digits; Python's shortest repr here)."""
    if math.isnan(d) or math.isinf(d):
        return None  # Writer::Double fails without kWriteNanAndInfFlag
    if d == 0:
        return "-0.0" if math.copysign(1.0, d) < 0 else "0.0"
    sign, digit_tuple, exp = Decimal(repr(abs(d))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    return ("-" if d < 0 else "") + _prettify(digits, int(exp))


def _prettify(digits: str, k: int) -> str:
    length, kk = len(digits), len(digits) + k
    if 0 <= k and kk <= 21:
        return digits + "0" * k + ".0"
    if 0 < kk <= 21:
        return digits[:kk] + "." + digits[kk:]
    if -6 < kk <= 0:
        return "0." + "0" * -kk + digits
    mantissa = digits if length == 1 else digits[0] + "." + digits[1:]
    return mantissa + "e" + str(kk - 1)


class _DebugWriter:
    """Just enough of rapidjson's PrettyWriter behind JsonWriterWithLimit."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.size = 0
        self.levels: list[list[int]] = []  # [in_array, value_count]

    def put(self, text: str) -> None:
        self.out.append(text)
        self.size += len(text)

    def prefix(self) -> None:
        if not self.levels:
            return
        level = self.levels[-1]
        if level[0]:
            if level[1] > 0:
                self.put(", ")
        else:
            if level[1] > 0:
                self.put(",\n" if level[1] % 2 == 0 else ": ")
            else:
                self.put("\n")
            if level[1] % 2 == 0:
                self.put(INDENT * len(self.levels))
        level[1] += 1

    def scalar(self, text: str | None) -> bool:
        if self.size >= _DEBUG_LIMIT:
            return False
        self.prefix()
        if text is None:
            return False
        self.put(text)
        return True

    def accept(self, value: Any) -> bool:
        if isinstance(value, dict):
            return self.container(value, "{", "}")
        if isinstance(value, list):
            return self.container(value, "[", "]")
        return self.scalar(_scalar_text(value))

    def container(self, value: dict[str, Any] | list[Any], start: str, end: str) -> bool:
        if not self.scalar(start):
            return False
        self.levels.append([start == "[", 0])
        is_object = isinstance(value, dict)
        for item in value.items() if isinstance(value, dict) else value:
            if is_object and not self.scalar(_rj_string(item[0])):
                return False
            if not self.accept(item[1] if is_object else item):
                return False
        if self.size >= _DEBUG_LIMIT:
            return False
        level = self.levels.pop()
        if level[1] and end == "}":
            self.put("\n" + INDENT * len(self.levels))
        self.put(end)
        return True


def _rj_string(text: str) -> str:
    return json_string(text.encode("utf-8", "surrogateescape"))


def _scalar_text(value: Any) -> str | None:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _rj_string(value)
    if isinstance(value, int):
        return str(value)
    return _double_text(float(value))


def debug_string(value: Any) -> str:
    """JsonValueToDebugString: the value as TF Serving quotes it in error messages."""
    writer = _DebugWriter()
    writer.accept(value)
    # The writer works on bytes (one char per byte); the message is text again.
    return "".join(writer.out).encode("latin-1").decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------
# Requests: FillPredictRequestFromJson.


def signature_name(doc: Any) -> str:
    """The document's ``signature_name`` ('' when absent); checks the root is an object."""
    if not isinstance(doc, dict):
        raise _invalid(f"JSON Value: {debug_string(doc)} Is not object")
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise _invalid(
            f"JSON Value: {debug_string(doc)} not formatted correctly. "
            "'signature_name' key must be a string value."
        )
    return name


def predict_inputs(
    doc: dict[str, Any], inputs: Mapping[str, int], *, literals: bool = True
) -> tuple[dict[str, Array], RequestFormat]:
    """The input tensors of a predict request, and its format.

    ``inputs`` maps each input alias of the signature to its DataType. ``literals``
    says the body may hold ``true``/``false``/``null`` anywhere (then only the exact,
    slower conversion is used, since numpy would quietly turn them into numbers).
    """
    instances, columns = doc.get("instances", _MISSING), doc.get("inputs", _MISSING)
    if instances is not _MISSING:
        if columns is not _MISSING:
            raise _invalid(
                f"JSON Value: {debug_string(doc)} Not formatted correctly expecting only "
                "one of 'inputs' or 'instances' keys to exist "
            )
        if not isinstance(instances, list):
            raise _invalid(
                f"JSON Value: {debug_string(doc)} Expecting 'instances' to be an list/array"
            )
        if not instances:
            raise _invalid(f"JSON Value: {debug_string(doc)} No values in 'instances' array")
        return _Instances(inputs, literals).tensors(instances), "row"
    if columns is not _MISSING:
        return _columns(columns, inputs, literals), "columnar"
    raise _invalid("Missing 'inputs' or 'instances' key")


_MISSING = object()


def literals_in(body: bytes) -> bool:
    """Whether ``true``, ``false`` or ``null`` occurs in ``body`` (even inside a string)."""
    return _LITERALS.search(body) is not None


def _is_b64_object(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) == 1
        and "b64" in value
        and isinstance(value["b64"], str)
    )


def _is_element_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64_object(value)


def _dense_shape(value: Any) -> list[int]:
    """GetDenseTensorShape: the sizes along the first elements."""
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _type_error(value: Any, dtype: int) -> JsonTensorError:
    return _invalid(
        f"JSON Value: {debug_string(value)} Type: {_type_string(value)} "
        f"is not of expected type: {dtype_name(dtype)}"
    )


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _float_leaf(value: Any) -> float | None:
    return None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)


def _int_leaf(lo: int, hi: int) -> Callable[[Any], Any]:
    return lambda value: value if _is_int(value, lo, hi) else None


def _str_leaf(value: Any) -> bytes | None:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else None


# AddValueToTensor's accepted JSON values per dtype; None means a type error.
_LEAF_READERS: dict[int, Callable[[Any], Any]] = {
    DT_FLOAT: _float_leaf,
    DT_DOUBLE: _float_leaf,
    **{dt: _int_leaf(-(2**31), 2**31 - 1) for dt in (DT_INT32, DT_INT16, DT_INT8, DT_UINT8)},
    DT_INT64: _int_leaf(-(2**63), 2**63 - 1),
    DT_UINT32: _int_leaf(0, 2**32 - 1),
    DT_UINT64: _int_leaf(0, 2**64 - 1),
    DT_STRING: _str_leaf,
    DT_BOOL: lambda value: value if isinstance(value, bool) else None,
}


def _leaf(value: Any, dtype: int) -> Any:
    """AddValueToTensor for one JSON value that is not a list."""
    if isinstance(value, dict):
        if dtype != DT_STRING:
            raise _type_error(value, dtype)
        return _b64_decode(value)
    read = _LEAF_READERS.get(dtype)
    if read is None:
        raise JsonTensorError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"Conversion of JSON Value: {debug_string(value)} to type: {dtype_name(dtype)}",
        )
    found = read(value)
    if found is None:
        raise _type_error(value, dtype)
    return found


def _b64_decode(value: Any) -> bytes:
    if not _is_b64_object(value):
        raise _invalid(f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
    text = value["b64"].encode("utf-8", "surrogateescape")
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("Unable to base64 decode") from None


def _fill(value: Any, level: int, dtype: int, shape: Sequence[int], out: list[Any]) -> None:
    """FillTensorProto: every leaf must sit at depth ``len(shape)``, lists must fit."""
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise _invalid(
                f"JSON Value: {debug_string(value)} found at incorrect level: {level + 1} "
                f"in the JSON DOM. Expected at level: {rank}"
            )
        out.append(_leaf(value, dtype))
        return
    if level >= rank:
        raise _invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise _invalid(
            f"Encountered list at unexpected size: {len(value)} at level: {level} "
            f"expected size: {shape[level]}"
        )
    for item in value:
        _fill(item, level + 1, dtype, shape, out)


def _exact(value: Any, dtype: int) -> tuple[list[Any], list[int]]:
    shape = _dense_shape(value)
    out: list[Any] = []
    _fill(value, 0, dtype, shape, out)
    return out, shape


def _to_array(values: list[Any], shape: Sequence[int], dtype: int) -> Array:
    if dtype == DT_STRING:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    if dtype == DT_FLOAT:  # GetFloat: the double, cast to float
        with np.errstate(over="ignore"):
            return np.array(values, dtype=np.float64).astype(np.float32).reshape(shape)
    if dtype in (DT_INT8, DT_INT16, DT_UINT8):  # int_val holds them as int32: they wrap
        return np.array(values, dtype=np.int64).astype(_NUMPY[dtype]).reshape(shape)
    return np.array(values, dtype=_NUMPY[dtype]).reshape(shape)


_FAST_KINDS = {DT_FLOAT: "fiu", DT_DOUBLE: "fiu", DT_INT64: "i", DT_INT32: "i"}


def _fast(value: Any, dtype: int, literals: bool) -> Array | None:
    """numpy's conversion when it cannot differ from TF's; None means use the exact path."""
    if literals or dtype not in _FAST_KINDS:
        return None
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.dtype.kind not in _FAST_KINDS[dtype] or (array.size == 0 and array.ndim > 1):
        return None
    if dtype == DT_FLOAT:
        with np.errstate(over="ignore"):
            return array.astype(np.float64).astype(np.float32)
    out_of_int32 = array.size and (array.min() < -(2**31) or array.max() >= 2**31)
    if dtype == DT_INT32 and out_of_int32:
        return None
    return array.astype(np.float64 if dtype == DT_DOUBLE else _NUMPY[dtype])


def _tensor(value: Any, dtype: int, literals: bool) -> Array:
    fast = _fast(value, dtype, literals)
    if fast is not None:
        return fast
    values, shape = _exact(value, dtype)
    return _to_array(values, shape, dtype)


def _columns(value: Any, inputs: Mapping[str, int], literals: bool) -> dict[str, Array]:
    """FillTensorMapFromInputsMap."""
    if not isinstance(value, dict) or _is_b64_object(value):
        if len(inputs) > 1:
            raise _invalid(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"
            )
        ((name, dtype),) = inputs.items()
        return {name: _tensor(value, dtype, literals)}
    out: dict[str, Array] = {}
    for name in sorted(inputs):
        if name not in value:
            raise _invalid(f"Missing named input: {name} in 'inputs' object.")
        out[name] = _tensor(value[name], inputs[name], literals)
    return out


class _Instances:
    """FillTensorMapFromInstancesList, exact, with a numpy shortcut when all is well."""

    def __init__(self, inputs: Mapping[str, int], literals: bool) -> None:
        self.inputs = dict(inputs)
        self.literals = literals

    def tensors(self, instances: list[Any]) -> dict[str, Array]:
        if not isinstance(instances[0], dict) and len(self.inputs) > 1:
            raise _invalid(
                "instances is a plain list, but expecting list of objects as multiple input "
                "tensors required as per tensorinfo_map"
            )
        objects = _is_element_object(instances[0])
        fast = self.fast(instances, objects)
        if fast is not None:
            return fast
        return self.exact(instances, objects)

    def fast(self, instances: list[Any], objects: bool) -> dict[str, Array] | None:
        names = set(self.inputs)
        if objects and not all(_is_element_object(i) and set(i) == names for i in instances):
            return None
        out: dict[str, Array] = {}
        for name, dtype in self.inputs.items():
            column = [i[name] for i in instances] if objects else instances
            array = _fast(column, dtype, self.literals)
            if array is None:
                return None
            out[name] = array
            if not objects:
                break
        return out

    def exact(self, instances: list[Any], objects: bool) -> dict[str, Array]:
        sizes: dict[str, tuple[int, list[int]]] = {}
        values: dict[str, list[Any]] = {}
        first = min(self.inputs)  # protobuf Map order is unspecified; sorted here
        for index, item in enumerate(instances):
            if objects:
                self.object_item(index, item, sizes, values)
            else:
                if _is_element_object(item):
                    raise _invalid(
                        f"Expecting value/list but got object at item {index} of input list"
                    )
                try:
                    self.add(item, first, sizes, values)
                except JsonTensorError as exc:
                    raise _invalid(
                        f"Failed to process element: {index} of 'instances' list. "
                        f"Error: {_status_text(exc)}"
                    ) from None
        return {
            name: _to_array(values[name], [len(instances), *sizes[name][1]], self.inputs[name])
            for name in values
        }

    def object_item(
        self,
        index: int,
        item: Any,
        sizes: dict[str, tuple[int, list[int]]],
        values: dict[str, list[Any]],
    ) -> None:
        if not _is_element_object(item):
            raise _invalid(f"Expecting object but got list at item {index} of input list")
        for name, value in item.items():
            try:
                self.add(value, name, sizes, values)
            except JsonTensorError as exc:
                raise _invalid(
                    f"Failed to process element: {index} key: {name} of 'instances' list. "
                    f"Error: {_status_text(exc)}"
                ) from None
        if set(item) != set(self.inputs):
            raise _invalid(
                f"Failed to process element: {index} of 'instances' list. JSON object: "
                f"{debug_string(item)} keys must be equal to: {','.join(sorted(self.inputs))}"
            )

    def add(
        self,
        value: Any,
        name: str,
        sizes: dict[str, tuple[int, list[int]]],
        values: dict[str, list[Any]],
    ) -> None:
        """AddInstanceItem."""
        if name not in self.inputs:
            raise _invalid(f"JSON object: does not have named input: {name}")
        leaves, shape = _exact(value, self.inputs[name])
        if name not in sizes:
            sizes[name] = (len(leaves), shape)
        elif sizes[name][0] != len(leaves):
            raise _invalid(f"Expecting tensor size: {sizes[name][0]} but got: {len(leaves)}")
        elif sizes[name][1] != shape:
            raise _invalid(
                f"Expecting shape {_shape_text(sizes[name][1])} but got: {_shape_text(shape)}"
            )
        values.setdefault(name, []).extend(leaves)


# ---------------------------------------------------------------------------
# Responses: MakeJsonFromTensors and MakeJsonFromStatus.

Output = tuple[str, Array, int]  # alias, values, DataType


def error_body(message: str) -> bytes:
    """MakeJsonFromStatus: ``{"error": message}`` as PrettyWriter lays it out."""
    text = json_string(message.encode("utf-8", "surrogateescape"))
    return ("{\n" + INDENT + '"error": ' + text + "\n}").encode("latin-1")


def predict_response(outputs: Sequence[Output], fmt: RequestFormat) -> bytes:
    """The predict response body, or TF Serving's error for tensors it cannot write.

    ``outputs`` in the order TF Serving iterates its output map (the backend uses
    the sorted aliases, as its gRPC side does).
    """
    if not outputs:
        raise _invalid("Cannot convert empty tensor map to JSON")
    body = _row(outputs) if fmt == "row" else _columnar(outputs)
    return ("{\n" + INDENT + body + "\n}").encode("latin-1")


def _check_writable(outputs: Sequence[Output], per_item: bool) -> None:
    """AddSingleValueAndAdvance fails on the first value of an unsupported dtype."""
    for _name, array, dtype in outputs:
        has_values = array[:1].size > 0 if per_item and array.ndim else array.size > 0
        if dtype not in _WRITABLE and has_values:
            raise _invalid(f"Failed to write JSON value for tensor type: {dtype_name(dtype)}")


def _texts(name: str, array: Array, dtype: int, leaf_level: int) -> list[str]:
    as_b64 = dtype == DT_STRING and name.endswith("_bytes")
    return value_texts(array, leaf_level=leaf_level, as_b64=as_b64)


def _row(outputs: Sequence[Output]) -> str:
    batch = -1
    for name, array, _dtype in outputs:
        if array.ndim == 0:
            raise _invalid(f"Tensor name: {name} has no shape information ")
        if batch >= 0 and array.shape[0] != batch:
            raise _invalid(
                f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} "
                f"expecting: {batch}"
            )
        batch = array.shape[0]
    _check_writable(outputs, per_item=True)
    level = 2 if len(outputs) == 1 else 3
    columns = [
        (name, _texts(name, a, d, level + a.ndim - 1), a.shape[1:]) for name, a, d in outputs
    ]
    items = []
    for i in range(batch):
        cells = [(name, _item(texts, shape, i, level)) for name, texts, shape in columns]
        items.append(cells[0][1] if len(outputs) == 1 else _instance_object(cells))
    head = '"predictions": '
    if len(outputs) == 1:
        return head + "[" + ", ".join(items) + ("\n" + INDENT + "]" if items else "]")
    inner = "\n" + INDENT * 2
    closing = "\n" + INDENT + "]" if items else "]"
    return head + "[" + ",".join(inner + o for o in items) + closing


def _item(texts: list[str], shape: tuple[int, ...], i: int, level: int) -> str:
    step = math.prod(shape)
    return nest_text(texts[i * step : (i + 1) * step], shape, level, True)


def _instance_object(cells: list[tuple[str, str]]) -> str:
    members = ["\n" + INDENT * 3 + json_string(name) + ": " + text for name, text in cells]
    return "{" + ",".join(members) + "\n" + INDENT * 2 + "}"


def _columnar(outputs: Sequence[Output]) -> str:
    _check_writable(outputs, per_item=False)
    head = '"outputs": '
    if len(outputs) == 1:
        name, array, dtype = outputs[0]
        texts = _texts(name, array, dtype, 1 + array.ndim)
        return head + nest_text(texts, array.shape, 1, False)
    members = []
    for name, array, dtype in outputs:
        texts = _texts(name, array, dtype, 2 + array.ndim)
        value = nest_text(texts, array.shape, 2, False)
        members.append("\n" + INDENT * 2 + json_string(name) + ": " + value)
    return head + "{" + ",".join(members) + "\n" + INDENT + "}"
