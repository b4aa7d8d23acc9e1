"""TF Serving's REST predict responses, for the proxy: read in place, rewritten in place.

Moved whole into :mod:`guard.dataplane.codec.restjson.numbers` first, so that
git follows its history; the next commit splits it into one module per job.
"""

from guard.dataplane.codec.restjson.numbers import (
    GUARD_OUTPUTS_KEY,
    NUMBER_BYTES,
    Format,
    NumberScan,
    RequestPeekScan,
    RestJsonError,
    RestOutput,
    RestPredictResponse,
    Scanned,
    TextWriter,
    ValueSkip,
    decimal_texts,
    float32_values,
    json_string,
    nest_text,
    numbers_at_most,
    read_predict_response,
    scan_single_output,
    value_texts,
)
from guard.dataplane.codec.restjson.numbers import INDENT as INDENT
from guard.dataplane.codec.restjson.numbers import OutputKey as OutputKey

__all__ = [
    "GUARD_OUTPUTS_KEY",
    "Format",
    "NumberScan",
    "RequestPeekScan",
    "RestJsonError",
    "RestOutput",
    "RestPredictResponse",
    "NUMBER_BYTES",
    "Scanned",
    "TextWriter",
    "ValueSkip",
    "decimal_texts",
    "float32_values",
    "json_string",
    "numbers_at_most",
    "nest_text",
    "read_predict_response",
    "scan_single_output",
    "value_texts",
]
