"""One REST call's bookkeeping, and the guard's own answers.

Every call is counted once in ``guard_requests_total{protocol="rest"}``, with
TF Serving's method name and the gRPC code TF Serving maps to the HTTP status
the client got; refusals are counted by reason, as on the gRPC side.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import hdrs, web
from aiohttp.http_writer import HttpVersion11, StreamWriter

from guard.dataplane.codec.restjson import INDENT, json_string
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.accounting import CallRecord
from guard.server.gate import Refusal
from guard.server.rest.heads import head_bytes
from guard.server.rest.routes import code_of_status

__all__ = ["REST", "Answer", "AsGiven", "AsGivenStream", "RestCall", "error_body", "error_response"]

REST = "rest"
"""The ``protocol`` label of calls made over REST."""


# What aiohttp gives an answer that lacks them: its own name and version, and
# a type for an untyped body. Date it may add (RFC 9110 6.6.1 asks a hop to).
_ADDED_BY_AIOHTTP = (hdrs.SERVER, hdrs.CONTENT_TYPE)


class AsGivenStream(web.StreamResponse):
    """An answer with only the headers it was given (and ``Date``). aiohttp
    gave every answer without them ``Server: Python/3.11 aiohttp/3.14.5``,
    telling every client the guard's language and library versions (TF
    Serving sends no ``Server``), and ``Content-Type:
    application/octet-stream`` to a body the upstream left untyped."""

    guard_call: RestCall | None = None
    """The call whose count waits for this answer to be sent (:meth:`RestCall.hand_to`)."""

    async def _prepare_headers(self) -> None:
        given = [name in self.headers for name in _ADDED_BY_AIOHTTP]
        await super()._prepare_headers()
        for name, was_given in zip(_ADDED_BY_AIOHTTP, given, strict=True):
            if not was_given:
                self.headers.popall(name, None)

    async def _write_headers(self) -> None:
        """aiohttp's, unless the reason or a value holds more than ASCII: then
        the head is written with the upstream's bytes (:mod:`.heads`), in
        place of what aiohttp's serializer made of it. aiohttp answers in the
        request's version, any version: an answer to one not HTTP/1 (a 505)
        goes as HTTP/1.1."""
        writer = self._payload_writer
        assert self._req is not None
        version = self._req.version
        ascii_only = self.reason.isascii() and all(v.isascii() for v in self.headers.values())
        if (ascii_only and version.major == 1) or not isinstance(writer, StreamWriter):
            await super()._write_headers()
            return
        if version.major != 1:
            version = HttpVersion11
        first = f"HTTP/{version.major}.{version.minor} {self.status} {self.reason}"
        try:
            head = head_bytes(first, self.headers.items())
        except ValueError:  # a control character: aiohttp's serializer judges it
            await super()._write_headers()
            return
        await writer.write_headers(first, self.headers)
        writer._headers_buf = head
        if self._send_headers_immediately:  # a body at hand goes with its head
            writer.send_headers()


class AsGiven(AsGivenStream, web.Response):
    """:class:`AsGivenStream` with its body at hand."""


def error_body(message: str) -> bytes:
    """``{"error": message}`` laid out as TF Serving's REST handler writes it."""
    try:
        raw = message.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate a client sent (\ud800 in its JSON)
        raw = message.encode("utf-8", "backslashreplace")
    text = json_string(raw)
    return ("{\n" + INDENT + '"error": ' + text + "\n}").encode("latin-1")


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The guard's own answer: TF Serving's error body, with ``status``."""
    response = AsGiven(status=status, body=error_body(message), content_type="application/json")
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


class RestCall(CallRecord):
    """One REST call's bookkeeping, and the guard's own answers to it."""

    __slots__ = ("_unsent",)
    protocol = REST

    def __init__(self, metrics: GuardMetrics, method_label: str) -> None:
        super().__init__(metrics, method_label)
        self._unsent: str | None = None

    def count_when_sent(self, code: str) -> None:
        """Count the call with ``code`` once its answer, which aiohttp writes
        after the handler returns, is handed to the client (:meth:`sent`).
        Counted at once, a guarded answer of 8 MB that the client reset
        half-way, or never read, was OK, while the same answer passed
        through was CANCELLED or UNAVAILABLE."""
        if self.code is None and self._unsent is None:
            self._unsent = code

    def hand_to(self, response: web.StreamResponse | None) -> None:
        """Leave a count kept by :meth:`count_when_sent` to the writer of
        ``response``; count it now where there is none to write."""
        if self._unsent is None:
            return
        if isinstance(response, AsGivenStream):
            response.guard_call = self
        else:
            self.sent()

    def sent(self, code: str | None = None) -> None:
        """Count the call kept by :meth:`count_when_sent`: with ``code``
        instead where its answer did not reach the client whole."""
        unsent, self._unsent = self._unsent, None
        if unsent is not None:
            self.count(code or unsent)

    def finish(self) -> None:
        """End the call; count it UNKNOWN unless it is counted, or will be once sent."""
        if self._unsent is None:
            self.count("UNKNOWN")
        self.answered()

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
