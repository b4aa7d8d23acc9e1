"""TF Serving's REST predict responses, for the proxy: read in place, rewritten in place.

numpy only: no TensorFlow, no aiohttp, and no ``json.loads`` of a whole body.
tensorflow/serving writes these bodies in ``util/json_tensor.cc``
(``MakeJsonFromTensors``) with rapidjson's ``PrettyWriter``; this package reads
that text and writes new text the same way, one module per job (below).

**Reading.** :func:`read_predict_response` takes the body and the format of the
request (``row``: ``"instances"`` in, ``"predictions"`` out; ``columnar``:
``"inputs"`` in, ``"outputs"`` out) and returns each output's values as a numpy
array, keeping the byte offsets of every number so that nothing of the original
text is lost. A response with one output does not name it (TF Serving drops the
name); its key is ``None``. A body that holds its output member twice (or
both ``predictions`` and ``outputs``), or names an output twice, is refused:
JSON readers differ on which one they take, and the guard cannot tell which
one its client reads.

**Which float dtype.** The body does not say; the signature does, and the proxy
does not have it here. json_tensor.cc's ``WriteDecimal`` writes a DT_FLOAT value
with at most 9 significant digits (``%.6g`` when that reads back as the same
float, else ``%.9g``), so its tokens are at most 15 characters long
(``-1.23456789e-05``); a DT_DOUBLE value needs up to 17 digits. A numeric output
is therefore read as **float32** when every token is at most 15 characters and
every value lies within float32's range, and as **float64** otherwise. float32
values are rounded from the text exactly as ``absl::SimpleAtof`` rounds them, so
they equal the model's own float32 output bit for bit. A DT_DOUBLE output whose
values all print in 6 digits (``0.1``, ``0.25``) reads as float32: its untouched
values keep their text anyway, and a value a rule changes is then written with
float32's digits. Outputs whose tokens are all integers read as int64; strings,
``{"b64": ...}`` objects and booleans read as object/bool arrays and are never
rewritten.

**Scanning.** The numbers of a tensor's text are scanned by numpy (the
reference), or by ``guard.dataplane._walk.scan_tensor`` when the caller passes
it (:data:`NumberScan`; the rule book's kernels do); with the native scan, a
body that holds one output's tensor and nothing else (TF Serving's answer for
a one-output model) is read by that one call. The native scan reads a
dense tensor's numbers and shape in one pass, the same values bit for bit,
rounded once by Clinger's fast path or ``strtod``; any text it does not read (an
odd token, an empty or ragged list) goes to numpy, which judges it
(tests/dataplane/test_restjson_native.py).

**Writing.** :meth:`RestPredictResponse.rewrite` returns the original bytes with
(i) only the values a rule changed replaced, each written as TF Serving writes
that dtype, and (ii) derived outputs inserted as text: next to the source output
where the response names its outputs, else under a top-level
``"guard_outputs"`` (one object per instance in row format, an object of arrays
in columnar format). Inserted text follows TF Serving's layout at that depth.
A derived float equal to a value of its instance takes that value's text. The
two loops over every element (that search, and joining each instance's
members) are done natively where the reader is given a :class:`TextWriter`
(the rule book's kernels do), as the Python loops here do them.

**The modules.** :mod:`~guard.dataplane.codec.restjson.shared`: the types and
the error; :mod:`~guard.dataplane.codec.restjson.native`: what the native
kernels implement (:data:`NumberScan`, :class:`TextWriter`, ...);
:mod:`~guard.dataplane.codec.restjson.text`: each value's text;
:mod:`~guard.dataplane.codec.restjson.members`: derived outputs' text as
object members; :mod:`~guard.dataplane.codec.restjson.numbers`: the numpy
scan of numbers and shapes; :mod:`~guard.dataplane.codec.restjson.structure`:
the scanner for the objects and arrays around the tensors;
:mod:`~guard.dataplane.codec.restjson.outputs`: each output's values;
:mod:`~guard.dataplane.codec.restjson.response`: :class:`RestPredictResponse`
and its rewrite; :mod:`~guard.dataplane.codec.restjson.read`: reading a
whole response. This package re-exports their public names.
"""

from guard.dataplane.codec.restjson.native import (
    NumberScan,
    RequestPeekScan,
    Scanned,
    TextWriter,
    ValueSkip,
)
from guard.dataplane.codec.restjson.outputs import RestOutput
from guard.dataplane.codec.restjson.read import (
    NUMBER_BYTES,
    float32_values,
    numbers_at_most,
    read_predict_response,
    scan_single_output,
)
from guard.dataplane.codec.restjson.response import RestPredictResponse, apply_edits, value_edits
from guard.dataplane.codec.restjson.shared import (
    GUARD_OUTPUTS_KEY,
    INDENT,
    STRING_TOKEN,
    Format,
    OutputKey,
    RestJsonError,
)
from guard.dataplane.codec.restjson.text import decimal_texts, json_string, nest_text, value_texts

__all__ = [
    "GUARD_OUTPUTS_KEY",
    "INDENT",
    "STRING_TOKEN",
    "Format",
    "OutputKey",
    "NumberScan",
    "RequestPeekScan",
    "RestJsonError",
    "RestOutput",
    "RestPredictResponse",
    "NUMBER_BYTES",
    "Scanned",
    "TextWriter",
    "ValueSkip",
    "apply_edits",
    "decimal_texts",
    "float32_values",
    "json_string",
    "numbers_at_most",
    "nest_text",
    "read_predict_response",
    "scan_single_output",
    "value_edits",
    "value_texts",
]
