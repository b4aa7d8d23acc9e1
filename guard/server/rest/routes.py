"""TF Serving's REST URLs and status codes, for the REST front-end.

The URL grammar is tensorflow/serving's ``http_rest_api_util.cc`` (the
prediction and model-status regexes); the HTTP status of each gRPC code is
``http_server.cc``'s ``ToHTTPStatusCode``. Metrics count a REST call with the
gRPC code name TF Serving maps to its HTTP status, so both protocols share
the ``code`` label's values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from guard.dataplane.cache import BoundedCache
from guard.dataplane.errors import Status
from guard.metrics.guard_metrics import OTHER

__all__ = ["Route", "code_of_status", "http_status", "not_normal", "route"]

# http_rest_api_util.cc; RE2's \d is ASCII only, hence [0-9].
_PREDICTION = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/([0-9]+))|(?:/labels/([^/:]+)))?"
    r":(classify|regress|predict)",
    re.IGNORECASE,
)
_MODEL_STATUS = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/([0-9]+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)
_VERSION_MAX = 2**63 - 1

# http_server.cc ToHTTPStatusCode, gRPC code name -> HTTP status.
_HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
    "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}  # fmt: skip
# The reverse: where several codes share a status, the one TF Serving's own
# errors mostly carry (INVALID_ARGUMENT for 400, INTERNAL for 500, ABORTED for 409).
_CODE_OF = {status: code for code, status in reversed(_HTTP_STATUS.items())}
_CODE_OF.update({400: "INVALID_ARGUMENT", 500: "INTERNAL", 409: "ABORTED"})
# Statuses only the guard or an HTTP layer answers (never TF Serving's handler).
_CODE_OF.update({408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED", 431: "RESOURCE_EXHAUSTED"})
_CODE_OF[417] = "INVALID_ARGUMENT"  # the guard's answer to an Expect it does not know
_CODE_OF[502] = "UNAVAILABLE"  # an upstream answer malformed or broken off


def http_status(status: Status) -> int:
    """The HTTP status TF Serving answers a domain error's status with."""
    return _HTTP_STATUS[status.value]


def code_of_status(status: int) -> str:
    """The gRPC code name for an HTTP status (TF Serving's mapping), else
    ``UNKNOWN``. TF Serving answers no 1xx or 3xx; one from a hop in between
    (a 304, a redirect) is an answer passed on, not an error: ``OK``."""
    if 100 <= status < 400:
        return "OK"
    return _CODE_OF.get(status, "UNKNOWN")


@dataclass(frozen=True, slots=True)
class Route:
    """What the guard needs of a REST URL: the ``method`` label, and for a
    predict call the model spec the URL names."""

    method: str
    """``Predict``, ``Classify``, ``Regress``, ``GetModelMetadata``,
    ``GetModelStatus`` or ``__other__``."""
    model: str | None = None
    version: int | None = None
    label: str | None = None

    @property
    def predict(self) -> bool:
        return self.method == "Predict"


def _decode(raw: str) -> str:
    """curl_easy_unescape, as TF Serving decodes URL parts: %XX only."""
    return unquote_to_bytes(raw).decode("utf-8", "surrogateescape")


# Paths a hop that normalizes (Envoy, nginx) would read as another path: empty,
# "." and ".." segments, an encoded "/", "." or "\\", a "\\".
_NOT_NORMAL = re.compile(r"//|/\.\.?(?:/|$)|%2[ef]|%5c|\\", re.IGNORECASE)


def not_normal(path: str) -> bool:
    """Whether ``path`` (raw, without its query) is not in normal form. The
    guard routes the path as sent; TF Serving matches it as sent too, and
    refuses these, but a normalizing hop between them would turn
    ``/v1/models/x/../m:predict`` into a predict no rule saw."""
    return _NOT_NORMAL.search(path) is not None


def route(http_method: str, path: str) -> Route:
    """The route of one request (``path`` without its query string)."""
    return _ROUTES.get_or_make((http_method, path), _route, http_method, path)


# Clients call a few URLs over and over: matching one costs more than the
# rest of a small call's routing. Keyed by what a client sends, so bounded.
_ROUTES: BoundedCache[tuple[str, str], Route] = BoundedCache(
    1024, max_key_bytes=1024, weigh=lambda key: len(key[0]) + len(key[1])
)


def _version_number(text: str | None) -> int | None:
    """A URL's version as a number; past 19 digits, one past int64's range
    (int() refuses 4,300 digits and more: a 500, found by a red-team pass)."""
    if not text:
        return None
    digits = text.lstrip("0") or "0"
    return _VERSION_MAX + 1 if len(digits) > 19 else int(digits)


def _route(http_method: str, path: str) -> Route:
    if http_method == "POST":
        match = _PREDICTION.fullmatch(path)
        if match is None:
            return Route(OTHER)
        name, version, label, verb = match.groups()
        number = _version_number(version)
        if number is not None and number > _VERSION_MAX:
            return Route(OTHER)  # TF Serving refuses it before any model work
        return Route(verb.capitalize(), _decode(name), number, _decode(label) if label else None)
    if http_method == "GET":
        match = _MODEL_STATUS.fullmatch(path)
        if match is None:
            return Route(OTHER)
        name = match.group(1)
        method = "GetModelMetadata" if match.group(4) else "GetModelStatus"
        return Route(method, _decode(name) if name else None)
    return Route(OTHER)
