"""The REST front-end: TF Serving's REST API, guarded, in the gRPC server's loop.

An aiohttp server takes each request, admits it through the same
:class:`~guard.server.gate.Gate` as gRPC calls (headers, calls receiving,
calls and bytes in flight), reads its body within ``request_timeout_s`` and
``max_request_mb``, and forwards it unchanged over kept-alive connections
to ``rest_upstream`` (:mod:`guard.server.rest.client`). A ``:predict``
response whose model has rules is guarded (:mod:`guard.server.rest.guarding`);
every other answer goes back as the upstream gave it: status, headers and
body, streamed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from guard.control.config import Config
from guard.dataplane.book import RuleBook
from guard.dataplane.codec.restjson import Format
from guard.dataplane.errors import GuardError, ResponseTooLargeError
from guard.dataplane.results import REJECTED, verdict_headers
from guard.dataplane.rulespec import SERVING_DEFAULT
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.deadlines import Deadlines
from guard.server.gate import Gate, Held, Refusal
from guard.server.rest.accept import TlsSite
from guard.server.rest.call import Answer, AsGiven, AsGivenStream, RestCall
from guard.server.rest.client import (
    UpstreamAnswer,
    UpstreamClient,
    UpstreamUnreachable,
    get_limited,
)
from guard.server.rest.guarding import RestRequest, guard_rest_response
from guard.server.rest.http import (
    CHUNK,
    HttpServer,
    forward_headers,
    request_factory,
    reset,
    response_headers,
)
from guard.server.rest.peek import NotInflated, inflate, peek_request
from guard.server.rest.routes import Route, code_of_status, http_status, not_normal, route
from guard.server.rest.signatures import METADATA_BYTES_MAX, Metadata, SignatureCache
from guard.server.tls import ListenerCertificates

__all__ = ["RestFrontEnd"]

logger = logging.getLogger("guard.rest")

T = TypeVar("T")

_DRAIN_POLL_S = 0.02
_FINAL_GRACE_S = 0.5
# Methods that carry no body unless the client sent one: no Content-Length
# goes with them then (as aiohttp's client, and curl, send them).
_BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class RestState(Protocol):
    """What the REST front-end shares with the gRPC server."""

    config: Config
    metrics: GuardMetrics
    gate: Gate
    certificates: ListenerCertificates | None

    @property
    def rules(self) -> RuleBook: ...


class RestFrontEnd:
    """The REST listener and its upstream client. ``await start()``, then ``await stop()``."""

    def __init__(self, state: RestState) -> None:
        self._state = state
        config = state.config
        assert config.rest_upstream is not None
        self._signatures = SignatureCache(self._get)
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None
        self._http: HttpServer | None = None
        # request_timeout_s on every body read, default_timeout_s on every
        # upstream call: one loop timer per 10 ms tick (as gRPC's).
        self._deadlines = Deadlines()
        self._client = UpstreamClient(
            config.rest_upstream, self._deadlines, config.default_timeout_s,
            max_idle=config.max_concurrent_rpcs,
        )  # fmt: skip
        self._active = 0
        self._inflating = asyncio.Semaphore(1)
        self._stopping = False
        self.cut_off: float | None = None
        self.port = 0

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> int:
        """Bind and serve. Returns the bound port."""
        config = self._state.config
        self._http = HttpServer(
            self._handle, config, self._state.metrics, self._state.gate,
            request_factory=request_factory(config.max_request_bytes),
        )  # fmt: skip
        self._runner = web.ServerRunner(
            self._http, handle_signals=False, shutdown_timeout=_FINAL_GRACE_S
        )
        await self._runner.setup()
        host, _, port = config.rest_listen.rpartition(":")
        where = (self._runner, host.strip("[]") or None, int(port))
        if self._state.certificates is not None:
            context = self._state.certificates.ssl_context()
            self._site = TlsSite(*where, context=context, reuse_port=True, backlog=1024)
        else:
            self._site = web.TCPSite(*where, reuse_port=True, backlog=1024)
        try:
            await self._site.start()
        except BaseException:
            await self._runner.cleanup()
            self._client.close()
            raise
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let requests in flight finish within ``grace`` seconds, close."""
        grace = self._state.config.shutdown_grace_s if grace is None else grace
        if self._stopping:
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._site is not None:
            await self._site.stop()
        if self._http is not None:
            self._http.pre_shutdown()  # idle keep-alive connections close now
        while self._active and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if self._active:
            self.cut_off = grace  # handlers waiting on the upstream answer 503
            self._client.close()
            while self._active and loop.time() < deadline + _FINAL_GRACE_S:
                await asyncio.sleep(_DRAIN_POLL_S)
        if self._runner is not None:
            await self._runner.cleanup()
        self._client.close()

    # -------------------------------------------------------------- handling

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        target = route(request.method, request.rel_url.raw_path)
        call = RestCall(self._state.metrics, target.method)
        call.model_label = self._state.metrics.model_label(target.model)
        self._active += 1
        response: web.StreamResponse | None = None
        try:
            response = await self._serve(request, target, call)
            return response
        except Answer as answer:
            return call.answer(answer)
        except asyncio.CancelledError:
            call.count("CANCELLED")  # the client went away
            raise
        except ConnectionResetError:
            raise  # the connection is cut on purpose; the call is counted
        except Exception:
            # Counted here, once: aiohttp's own error page would count it again.
            logger.exception("handling a REST request failed")
            return call.answer(
                Answer(500, "guard: internal error while handling the request; see the guard's log")
            )
        finally:
            self._active -= 1
            call.hand_to(response)
            call.finish()

    async def _serve(
        self, request: web.BaseRequest, target: Route, call: RestCall
    ) -> web.StreamResponse:
        book = self._state.rules  # one consistent rule set for the whole call
        if self._stopping:
            raise Answer(503, "guard: shutting down; retry on another replica")
        if request.version.major != 1:  # aiohttp's parser takes HTTP/2.0 and HTTP/0.9
            raise Answer(
                505,
                f"guard: HTTP/{request.version.major}.{request.version.minor} is not spoken "
                "here: send HTTP/1.1 (gRPC, over HTTP/2, has its own port)",
            )
        if not request.rel_url.raw_path.startswith("/"):
            raise Answer(
                400,
                f"guard: the request target {request.path_qs[:100]!r} is not a path; "
                "TF Serving's REST API takes /v1/models/...",
            )
        if not_normal(request.rel_url.raw_path):
            raise Answer(
                400,
                f"guard: the request path {request.rel_url.raw_path[:100]!r} is not in normal "
                "form (an empty, '.' or '..' segment, or an encoded '/', '.' or '\\'); send "
                "the path as TF Serving's REST API names it: /v1/models/NAME...",
            )
        body = await self._receive(request)
        gate, size = self._state.gate, len(body)
        refused = gate.admit(size)
        if refused is not None:
            raise Answer(429, refused[1], refused[0])
        call.hold(partial(gate.release, size))
        if target.predict and target.model is not None and book.may_apply(target.model):
            return await self._predict(request, target, body, book, call)
        return await self._pass_through(request, body, call)

    async def _receive(self, request: web.BaseRequest) -> bytes:
        """The request body, read within the limits, or a refusal."""
        gate, config = self._state.gate, self._state.config
        problem = gate.metadata_problem(request.raw_headers)
        if problem is not None:
            raise Answer(431, problem, Refusal.METADATA)
        problem = gate.pending_problem()
        if problem is not None:
            raise Answer(429, problem, Refusal.PENDING)
        if (request.content_length or 0) > config.max_request_bytes:
            raise _too_large(request.content_length or 0, config)
        codings = _codings(request.headers)
        if codings and codings != ["chunked"]:  # aiohttp de-chunks, and decodes nothing else
            raise Answer(
                501,
                f"guard: Transfer-Encoding {', '.join(codings)[:100]!r} is not supported; send "
                "the body chunked alone or with a Content-Length (gzip it with "
                "Content-Encoding: gzip)",
            )
        await _continue(request)
        try:
            return await self._read_body(request)
        except TimeoutError:
            raise Answer(
                408,
                f"guard: the request body did not arrive within request_timeout_s "
                f"({config.request_timeout_s:g} s) of its headers; send it at once, or raise "
                "request_timeout_s in the guard config",
                Refusal.REQUEST_TIMEOUT,
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(None, config) from None

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        """The whole body; a body still arriving counts as receiving, within
        request_timeout_s (one that came with its headers has nothing to wait for)."""
        if request.content.is_eof():
            return await request.read()
        gate = self._state.gate
        gate.pending += 1
        try:
            return await self._deadlines.wait(
                self._read_counted(request), self._state.config.request_timeout_s
            )
        finally:
            gate.pending -= 1

    async def _read_counted(self, request: web.BaseRequest) -> bytes:
        """The body as it arrives, counted in the budget: sixteen bodies of
        31 MB arriving at once took the guard to 690 MB before any was
        counted. Refused as soon as the budget or max_request_mb would pass."""
        gate, config = self._state.gate, self._state.config
        body = await _read_held(
            request.content, gate, config.max_request_bytes, gate.arriving_problem
        )
        if body is None:
            raise _too_large(None, config)
        return body

    # ------------------------------------------------------------ forwarding

    async def _forward(
        self,
        request: web.BaseRequest,
        body: bytes,
        call: RestCall,
        consume: Callable[[UpstreamAnswer], Awaitable[T]],
    ) -> T:
        """Send the request on unchanged; ``consume`` takes the upstream's
        answer, within what is left of default_timeout_s for its reads."""
        config = self._state.config
        method = request.method
        with_length = body or request.body_exists or method not in _BODILESS_METHODS
        headers = forward_headers(
            request.headers, self._client.address, len(body) if with_length else None
        )
        started = time.perf_counter()
        try:
            answer = await self._client.request(method, request.rel_url.raw_path_qs, headers, body)
            try:
                unusable = _unusable(answer, self._client.address)
                if unusable is not None:
                    raise Answer(502, unusable)
                return await consume(answer)
            finally:
                answer.release()
        except TimeoutError:
            raise Answer(
                504,
                f"guard: the upstream did not answer within default_timeout_s "
                f"({config.default_timeout_s:g} s); raise default_timeout_s in the guard config",
            ) from None
        except (aiohttp.ClientError, HttpProcessingError, UpstreamUnreachable) as exc:
            raise self._unreachable(exc) from None
        finally:
            call.upstream_s = time.perf_counter() - started

    def _unreachable(self, exc: BaseException) -> Answer:
        """503 for an upstream that could not be reached; 502 for an answer
        that came malformed or broke off (the upstream was reached)."""
        if self.cut_off is not None:
            return Answer(
                503,
                "guard: shutting down, and the upstream had not answered when "
                f"shutdown_grace_s ({self.cut_off:g} s) ran out; the request was "
                "cancelled and may or may not have run. Retry it if it is idempotent",
            )
        upstream = self._state.config.rest_upstream
        if isinstance(exc, HttpProcessingError):
            # Its first line names the fault; the lines below quote the bytes.
            fault = (exc.message.splitlines() or ["unreadable"])[0].rstrip(": ")
            return Answer(
                502, f"guard: the REST upstream {upstream} answered with a malformed or "
                f"incomplete HTTP response: {fault}",
            )  # fmt: skip
        if isinstance(exc, aiohttp.ClientPayloadError):
            return Answer(
                502, f"guard: the REST upstream {upstream} answered with a malformed or "
                f"incomplete HTTP response: {exc}",
            )  # fmt: skip
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return Answer(
                502, f"guard: the REST upstream {upstream} closed the connection before its "
                "answer was complete",
            )  # fmt: skip
        if isinstance(exc, UpstreamUnreachable):
            return Answer(503, f"guard: cannot reach the REST upstream {upstream}: {exc.reason}")
        return Answer(503, f"guard: cannot reach the REST upstream {upstream}: {exc}")

    async def _pass_through(
        self, request: web.BaseRequest, body: bytes, call: RestCall
    ) -> web.StreamResponse:
        """Forward and stream the answer back as the upstream gives it."""
        return await self._forward(request, body, call, partial(self._stream, request, call))

    async def _stream(
        self, request: web.BaseRequest, call: RestCall, upstream: UpstreamAnswer
    ) -> web.StreamResponse:
        limit = self._state.config.max_message_bytes
        if _has_body(request.method, upstream.status) and (upstream.content_length or 0) > limit:
            raise _response_too_large(upstream.content_length, limit)
        answer = AsGivenStream(
            status=upstream.status, reason=upstream.reason,
            headers=response_headers(upstream.headers, keep_length=True),
        )  # fmt: skip
        sent = self._sent_within_idle_timeout(request, call)
        await sent(answer.prepare(request))
        left = upstream.content_length
        taken = 0
        try:
            while chunk := await upstream.read(CHUNK):
                if left is not None and (left := left - len(chunk)) <= 0:
                    _answered(call, upstream.status)  # the client may have it all at once
                taken += len(chunk)
                if taken > limit:  # no length was declared (chunked, or to the close)
                    self._state.metrics.record_refusal(Refusal.RESPONSE_TOO_LARGE.value)
                    call.count("RESOURCE_EXHAUSTED")
                    raise ConnectionResetError(
                        f"the upstream's answer passed max_message_mb ({limit} bytes)"
                    )
                await sent(answer.write(chunk))
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The status line is sent: all that is left is to break the
            # connection, so the client cannot take the body for whole.
            call.count("DEADLINE_EXCEEDED" if isinstance(exc, TimeoutError) else "UNAVAILABLE")
            raise ConnectionResetError(f"the upstream's answer broke off: {exc!r}") from None
        _answered(call, upstream.status)  # a chunked answer's end goes with write_eof
        await sent(answer.write_eof())
        return answer

    def _sent_within_idle_timeout(
        self, request: web.BaseRequest, call: RestCall
    ) -> Callable[[Awaitable[object]], Awaitable[None]]:
        """Each write of a streamed answer must be taken within
        stream_idle_timeout_s: four clients that read nothing of 8 MB answers
        held all of max_concurrent_rpcs (4) for as long as they stayed
        connected, every other call refused. Past it the connection is cut,
        counted as ``stream_idle``."""
        timeout = self._state.config.stream_idle_timeout_s

        async def sent(write: Awaitable[object]) -> None:
            try:
                await self._deadlines.wait(write, timeout)
            except TimeoutError:
                self._state.metrics.record_refusal(Refusal.STREAM_IDLE.value)
                call.count("UNAVAILABLE")
                reset(request.transport)
                raise ConnectionResetError(
                    f"the client took nothing for stream_idle_timeout_s ({timeout:g} s)"
                ) from None

        return sent

    # --------------------------------------------------------------- predict

    async def _predict(
        self, request: web.BaseRequest, target: Route, body: bytes, book: RuleBook, call: RestCall
    ) -> web.StreamResponse:
        """Forward a predict request; guard its answer where a rule applies."""
        assert target.model is not None
        fmt, signature = await self._peek(request, body, book)
        limit = self._state.config.max_message_bytes
        read = partial(self._read_answer, limit=limit, own=len(body))
        upstream, data = await self._forward(request, body, call, read)
        status, reason, headers = upstream.status, upstream.reason, upstream.headers
        if data is None:
            raise _response_too_large(upstream.content_length, limit)
        gate = self._state.gate
        refused = gate.answer_problem(len(data), len(body))
        if refused is not None:
            raise Answer(429, refused[1], refused[0])
        if not 200 <= status < 300:  # a 203 carries predictions as well as a 200
            call.count_when_sent(code_of_status(status))  # the upstream's error, unchanged
            return AsGiven(
                status=status, reason=reason, body=data, headers=response_headers(headers)
            )
        gate.inflight_bytes += len(data)  # held while it is guarded
        try:
            left_s = self._state.config.default_timeout_s - (time.perf_counter() - call.start)
            guarded = await self._guard(target, fmt, signature, data, headers, book, left_s)
            guarded.set_status(status, reason)
        finally:
            gate.inflight_bytes -= len(data)
        call.count_when_sent("OK")
        return guarded

    async def _read_answer(
        self, upstream: UpstreamAnswer, limit: int, own: int
    ) -> tuple[UpstreamAnswer, bytes | None]:
        """The upstream's answer (``None`` past ``limit``), counted in the budget
        as it arrives, as request bodies are: sixteen answers of 60 MB read
        whole before any was counted took the guard to 1 GB against 128 MiB."""
        if (upstream.content_length or 0) > limit:
            return upstream, None
        gate = self._state.gate

        def problem(size: int) -> tuple[Refusal, str] | None:
            return gate.answer_problem(size, own + size, "the answer so far")

        read = _read_held(upstream.content, gate, limit, problem)
        if upstream.content.is_eof():  # it came whole with its head: nothing to wait for
            return upstream, await read
        return upstream, await upstream.timed(read)

    async def _peek(
        self, request: web.BaseRequest, body: bytes, book: RuleBook
    ) -> tuple[Format | None, str]:
        """The request's format and signature name, from a bounded peek at its body."""
        plain = body
        if "gzip" in request.headers.get("Content-Encoding", ""):
            plain = await self._inflate(body)
        found = peek_request(plain, book.kernels.request_peek)
        if found.exceeded and found.signature is None:
            raise Answer(
                400,
                "guard: the request's top-level keys could not be read within the guard's "
                'bound; send a JSON object, with "signature_name" before "instances" or '
                '"inputs"',
            )
        return found.format, found.signature or ""

    async def _inflate(self, body: bytes) -> bytes:
        """A gzip body inflated for the peek on a worker thread (zlib lets go
        of the GIL), one body at a time, so at most one inflated copy of up to
        max_request_mb exists at once: 32 KB bodies inflating to 32 MiB, 250 KB
        a second of them, took the event loop's whole core and every other
        call waited 0.3 s."""
        config = self._state.config
        await self._inflater_turn()
        try:
            try:
                return await asyncio.to_thread(inflate, body, config.max_request_bytes)
            except NotInflated as exc:
                if exc.too_large:  # as gRPC: max_request_mb is the size after decompression
                    raise _too_large(None, config, "inflated ") from None
                raise Answer(
                    400,
                    f"guard: the request body is gzip-encoded (Content-Encoding) but {exc}; the "
                    "guard reads signature_name from it: send one whole gzip stream, or send "
                    "the body uncompressed",
                ) from None
        finally:
            self._inflating.release()

    async def _inflater_turn(self) -> None:
        """Wait for the inflater, at most request_timeout_s: a body waits for
        those ahead of it, and clients sending 31 KB bodies that inflate to
        32 MiB would otherwise hold a gzip predict for as long as they kept
        max_concurrent_rpcs of them queued."""
        timeout = self._state.config.request_timeout_s
        try:
            await self._deadlines.wait(self._inflating.acquire(), timeout)
        except TimeoutError:
            raise Answer(
                503,
                f"guard: the gzip-encoded request bodies ahead of this one took more than "
                f"request_timeout_s ({timeout:g} s) to inflate (the guard inflates one at a "
                "time to read signature_name); retry with backoff, or send the body "
                "uncompressed",
                Refusal.REQUEST_TIMEOUT,
            ) from None

    async def _metadata(self, target: Route, left_s: float) -> Metadata:
        """The model's metadata, within what is left of the call's
        default_timeout_s: the answer and the metadata took one each."""
        assert target.model is not None
        cached = self._signatures.fresh(target.model, target.version, target.label)
        if cached is not None:
            return cached
        get = self._signatures.get(target.model, target.version, target.label)
        try:
            return await self._deadlines.wait(get, max(left_s, 0.0))
        except TimeoutError:
            timeout = self._state.config.default_timeout_s
            raise Answer(
                504,
                f"guard: the upstream's answer and its model metadata took more than "
                f"default_timeout_s ({timeout:g} s) together; raise default_timeout_s in the "
                "guard config",
            ) from None

    async def _guard(
        self,
        target: Route,
        fmt: Format | None,
        signature: str,
        data: bytes,
        headers: Any,
        book: RuleBook,
        left_s: float,
    ) -> web.Response:
        assert target.model is not None
        out_headers = response_headers(headers)
        if headers.get("Content-Encoding", "").strip().lower() not in ("", "identity"):
            raise Answer(
                500,
                "guard: the upstream's predict response is compressed "
                f"(Content-Encoding: {headers['Content-Encoding']}); the guard reads plain JSON",
            )
        if book.for_signature(target.model, signature or SERVING_DEFAULT) is None:
            return AsGiven(status=200, body=data, headers=out_headers)  # no rule: as it came
        metadata = await self._metadata(target, left_s)
        request = RestRequest(target.model, signature, fmt or _format_of(data), metadata)
        metrics = self._state.metrics
        try:
            guarded = guard_rest_response(data, request, book, metrics)
        except ResponseTooLargeError as exc:
            raise Answer(http_status(exc.status), exc.details, Refusal.RESPONSE_TOO_LARGE) from None
        except GuardError as exc:
            verdict = dict(verdict_headers(REJECTED, exc.violations))
            raise Answer(http_status(exc.status), exc.details, headers=verdict) from None
        except Exception:
            logger.exception("guarding a REST predict response failed")
            raise Answer(
                500, "guard: internal error while guarding the response; see the guard's log"
            ) from None
        if guarded is None:
            return AsGiven(status=200, body=data, headers=out_headers)
        out_headers.update(guarded.headers())
        return AsGiven(status=200, body=guarded.body, headers=out_headers)

    async def _get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` on the upstream (model metadata), bounded: at most
        METADATA_BYTES_MAX is read (TF Serving's metadata is a few kilobytes),
        within default_timeout_s; SignatureCache bounds what it keeps of it."""
        limit = min(self._state.config.max_message_bytes, METADATA_BYTES_MAX)
        try:
            return await get_limited(self._client, path, limit, "metadata")
        except TimeoutError:
            timeout = self._state.config.default_timeout_s
            raise TimeoutError(f"no answer within default_timeout_s ({timeout:g} s)") from None


async def _read_held(
    stream: aiohttp.StreamReader,
    gate: Gate,
    limit: int,
    problem: Callable[[int], tuple[Refusal, str] | None],
) -> bytes | None:
    """A body (a request's or an answer's) as it arrives, each chunk counted
    in the gate's budget while it is read; ``None`` past ``limit`` bytes, 429
    where ``problem`` of the bytes so far says why."""
    held = Held(gate)
    chunks: list[bytes] = []
    try:
        while True:
            # A body that came whole with its head (most answers) is taken
            # without a coroutine per chunk.
            chunk = stream.read_nowait() if stream.is_eof() else await stream.readany()
            if not chunk:
                break
            held.take(len(chunk))
            if held.size > limit:
                return None
            refused = problem(held.size)
            if refused is not None:
                raise Answer(429, refused[1], refused[0])
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        held.release_all()


def _answered(call: RestCall, status: int) -> None:
    """End a streamed call as its last bytes go: a client that has them all
    may scrape at once, and must see the call counted, timed and its request
    bytes given back (they were, a loop turn or a drain later)."""
    call.count_status(status)
    call.answered()


async def _continue(request: web.BaseRequest) -> None:
    """Answer ``Expect: 100-continue`` once the request is admitted: curl
    sends it with bodies over 1 MiB and waits a second for the answer."""
    expect = request.headers.get("Expect")
    if expect is None or request.version < aiohttp.HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise Answer(
            417, f"guard: unknown expectation {expect[:100]!r}; send Expect: 100-continue or none"
        )
    if not request.content.is_eof():
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def _has_body(method: str, status: int) -> bool:
    """Whether an answer to ``method`` with ``status`` carries a body: a
    HEAD's, a 204's, a 304's or a 1xx's length describes none (RFC 9110 6.4.1)."""
    return method != "HEAD" and status not in (204, 304) and status >= 200


def _unusable(answer: UpstreamAnswer, upstream: str) -> str | None:
    """Why an upstream's answer cannot be passed on, or ``None``: a 101
    (the guard never forwards Upgrade, so no switch was asked for), or a
    transfer coding other than chunked, which aiohttp leaves undecoded (its
    bytes went out as a plain body)."""
    if answer.status == 101:
        return (
            f"guard: the REST upstream {upstream} answered 101 Switching Protocols "
            "to a request that asked for no upgrade"
        )
    codings = _codings(answer.headers)
    if codings and codings != ["chunked"]:
        return (
            f"guard: the REST upstream {upstream} answered with Transfer-Encoding "
            f"{', '.join(codings)[:100]!r}, which the guard cannot pass on; have it send "
            "chunked alone (or Content-Encoding)"
        )
    return None


def _codings(headers: Any) -> list[str]:
    """The transfer codings a Transfer-Encoding header lists, in order."""
    return [
        coding.strip().lower()
        for value in headers.getall("Transfer-Encoding", ())
        for coding in value.split(",")
        if coding.strip()
    ]


def _format_of(body: bytes) -> Format:
    """The format a response is in when the request's peek could not tell."""
    head = body[:4096]
    return "columnar" if b'"outputs"' in head and b'"predictions"' not in head else "row"


def _too_large(size: int | None, config: Config, what: str = "") -> Answer:
    sized = "" if size is None else f" ({size} bytes)"
    return Answer(
        413,
        f"guard: the {what}request body{sized} is larger than max_request_mb "
        f"({config.max_request_mb} MiB); send less, or raise max_request_mb in the guard config",
        Refusal.REQUEST_TOO_LARGE,
    )


def _response_too_large(size: int | None, limit: int) -> Answer:
    sized = "" if size is None else f" ({size} bytes)"
    error = ResponseTooLargeError(
        f"guard: the upstream's response{sized} is larger than max_message_mb "
        f"({limit} bytes); raise max_message_mb in the guard config"
    )
    return Answer(http_status(error.status), error.details, Refusal.RESPONSE_TOO_LARGE)
