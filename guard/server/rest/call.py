"""One REST call's bookkeeping, and the guard's own answers.

Every call is counted once in ``guard_requests_total{protocol="rest"}``, with
TF Serving's method name and the gRPC code TF Serving maps to the HTTP status
the client got; refusals are counted by reason, as on the gRPC side.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiohttp import web

from guard.dataplane.codec.restjson import INDENT, json_string
from guard.metrics.guard_metrics import OTHER, GuardMetrics
from guard.server.gate import Refusal
from guard.server.rest.routes import code_of_status

__all__ = ["REST", "Answer", "RestCall", "error_body", "error_response"]

REST = "rest"
"""The ``protocol`` label of calls made over REST."""


def error_body(message: str) -> bytes:
    """``{"error": message}`` laid out as TF Serving's REST handler writes it."""
    text = json_string(message.encode("utf-8", "surrogateescape"))
    return ("{\n" + INDENT + '"error": ' + text + "\n}").encode("latin-1")


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The guard's own answer: TF Serving's error body, with ``status``."""
    response = web.Response(
        status=status, body=error_body(message), content_type="application/json"
    )
    response.headers.update(headers or {})
    return response


class Answer(Exception):
    """The guard answers the call itself (a refusal, a rejection, an upstream failure)."""

    def __init__(
        self,
        status: int,
        message: str,
        refusal: Refusal | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.refusal = refusal
        self.headers = dict(headers or {})


class RestCall:
    """One call's labels, the code it ended with (counted once), and its timing."""

    __slots__ = ("model_label", "method_label", "code", "upstream_s", "start", "_metrics")

    def __init__(self, metrics: GuardMetrics, method_label: str) -> None:
        self._metrics = metrics
        self.model_label = OTHER
        self.method_label = method_label
        self.code: str | None = None
        self.upstream_s = 0.0
        self.start = time.perf_counter()

    def count(self, code: str) -> None:
        """Count the call with ``code``, once: the first code wins."""
        if self.code is None:
            self.code = code
            self._metrics.record_request(REST, self.model_label, self.method_label, code)

    def count_status(self, status: int) -> None:
        """Count the call with the code TF Serving maps to HTTP ``status``."""
        self.count(code_of_status(status))

    def answer(self, answer: Answer) -> web.Response:
        """Count ``answer`` (and its refusal), and make its response."""
        if answer.refusal is not None:
            self._metrics.record_refusal(answer.refusal.value)
        self.count_status(answer.status)
        response = error_response(answer.status, answer.message, answer.headers)
        if answer.refusal is not None:
            response.force_close()  # the rest of what was sent is not read
        return response

    def finish(self) -> None:
        """Count the call if nothing did (a bug of ours), and time it."""
        self.count("UNKNOWN")
        total = time.perf_counter() - self.start
        self._metrics.record_timing(
            REST, self.method_label, self.upstream_s, max(total - self.upstream_s, 0.0)
        )
