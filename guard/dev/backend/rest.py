"""TF Serving's REST API for the local backend (aiohttp, inside the backend process).

Routing, dispatch and status codes follow tensorflow/serving's
``model_servers/http_server.cc`` (``RestApiRequestDispatcher``,
``ToHTTPStatusCode``), ``http_rest_api_handler.cc`` (``ProcessRequest``) and
``http_rest_api_util.cc`` (the URL regexes, ``ParseModelInfo``); the JSON is
:mod:`guard.dev.backend.json_tensor`'s. Model work goes through the same
:class:`~guard.dev.backend.server.Predictor` as the gRPC side, on the same thread
pool, so a slow prediction never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
import zlib
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import grpc
import tensorflow as tf
from aiohttp import web
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
)

from guard.dev.backend import json_tensor
from guard.dev.backend.json_tensor import JsonTensorError
from guard.dev.backend.server import DEFAULT_SIGNATURE, BackendError, Predictor, _unimplemented

logger = logging.getLogger(__name__)

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
_HANDLED = re.compile(r"/v1/.*", re.IGNORECASE)  # HttpRestApiHandler::kPathRegex

# http_server.cc ToHTTPStatusCode
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# libevent's evhttp_response_phrase_internal: a code past its table gets the class name.
_PHRASES = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    409: "Conflict", 429: "Client Error", 499: "Client Error", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 504: "Gateway Time-out",
}  # fmt: skip

# net_http's EvHTTPServer allows these; libevent answers anything else itself.
_ALLOWED_METHODS = {"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"}
_LIBEVENT_METHODS = _ALLOWED_METHODS | {"TRACE", "CONNECT"}
_JSON = "application/json"
_LIBEVENT_DEFAULT_TYPE = "text/html; charset=ISO-8859-1"


@dataclass(frozen=True)
class ModelInfo:
    """What ParseModelInfo takes out of a URL."""

    matched: bool
    name: str = ""
    version: int | None = None
    label: str | None = None
    method: str = ""
    subresource: str = ""


class _EmptyBodyError(Exception):
    """ParseModelInfo failed: ProcessRequest returns before writing any JSON."""


def _decode_arg(raw: str) -> str:
    """curl_easy_unescape: %XX sequences only (a '+' stays a '+')."""
    return unquote_to_bytes(raw).decode("utf-8", "surrogateescape")


def parse_model_info(http_method: str, path: str) -> ModelInfo:
    """ParseModelInfo, on the path with its query string (net_http's uri_path())."""
    if http_method == "POST":
        match = _PREDICTION.fullmatch(path)
    elif http_method == "GET":
        match = _MODEL_STATUS.fullmatch(path)
    else:
        return ModelInfo(False)
    if match is None:
        return ModelInfo(False)
    name, version, label, last = match.groups()
    number = None
    if version:
        number = int(version)
        if number >= 2**63:
            raise _EmptyBodyError(f"Failed to convert version: {version} to numeric.")
    return ModelInfo(
        True,
        _decode_arg(name) if name else "",
        number,
        _decode_arg(label) if label else None,
        last if http_method == "POST" else "",
        last or "" if http_method == "GET" else "",
    )


def _model_spec(info: ModelInfo, signature: str = "") -> model_pb2.ModelSpec:
    """FillModelSpecWithNameVersionAndLabel (the URL grammar never gives both)."""
    spec = model_pb2.ModelSpec(name=info.name, signature_name=signature)
    if info.version is not None:
        spec.version.value = info.version
    if info.label is not None:
        spec.version_label = info.label
    return spec


def _proto_json(message: Any) -> str:
    """MessageToJsonString with add_whitespace and always-print, as TF Serving calls it."""
    text: str = json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=1,
    )
    return text + "\n"


class RestHandler:
    """HttpRestApiHandler::ProcessRequest over a :class:`Predictor` (blocking)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def process(self, http_method: str, path: str, body: bytes) -> tuple[grpc.StatusCode, bytes]:
        """The status and the JSON body (empty when the URL's version will not parse)."""
        try:
            info = parse_model_info(http_method, path)
        except _EmptyBodyError as exc:
            logger.debug("%s %s: %s", http_method, path, exc)
            return grpc.StatusCode.INVALID_ARGUMENT, b""
        try:
            return grpc.StatusCode.OK, self._dispatch(http_method, path, body, info)
        except (BackendError, JsonTensorError) as exc:
            return exc.code, json_tensor.error_body(exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug here must still answer in JSON
            logger.exception("REST %s %s failed", http_method, path)
            return grpc.StatusCode.INTERNAL, json_tensor.error_body(f"local backend: {exc!r}")

    def _dispatch(self, http_method: str, path: str, body: bytes, info: ModelInfo) -> bytes:
        if http_method == "POST" and info.matched and info.method in ("classify", "regress"):
            json_tensor.parse_json(body)  # TF Serving reads the body before the model
            raise BackendError(
                grpc.StatusCode.UNIMPLEMENTED,
                _unimplemented(
                    info.method.capitalize(), "use :predict, or TensorFlow Serving for tf.Example"
                ),
            )
        if http_method == "POST" and info.matched and info.method == "predict":
            return self.predict(info, body)
        if http_method == "GET" and info.matched:
            if info.subresource == "metadata":
                return self.metadata(info)
            return self.status(info)
        raise BackendError(
            grpc.StatusCode.INVALID_ARGUMENT, f"Malformed request: {http_method} {path}"
        )

    def predict(self, info: ModelInfo, body: bytes) -> bytes:
        """ProcessPredictRequest."""
        doc = json_tensor.parse_json(body)
        signature = json_tensor.signature_name(doc)
        spec = _model_spec(info, signature)
        inputs = self._input_dtypes(spec)
        arrays, fmt = json_tensor.predict_inputs(
            doc, inputs, literals=json_tensor.literals_in(body)
        )
        request = predict_pb2.PredictRequest(model_spec=spec)
        for alias, array in arrays.items():
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(array, dtype=inputs[alias]))
        response = self.predictor.predict(request)
        outputs = [
            (alias, tf.make_ndarray(response.outputs[alias]), response.outputs[alias].dtype)
            for alias in sorted(response.outputs)
        ]
        return json_tensor.predict_response(outputs, fmt)

    def _input_dtypes(self, spec: model_pb2.ModelSpec) -> dict[str, int]:
        """HttpRestApiHandler::GetInfoMap: the signature's inputs, by alias."""
        _model, version = self.predictor.repository.resolve(spec)
        name = spec.signature_name or DEFAULT_SIGNATURE
        signature = version.signatures.get(name)
        if signature is None:
            raise BackendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'Serving signature name: "{name}" not found in signature def',
            )
        inputs = {alias: info.dtype for alias, info in signature.definition.inputs.items()}
        if not inputs:
            raise BackendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Failed to get input map for signature: {spec.signature_name or 'DEFAULT'}",
            )
        return inputs

    def status(self, info: ModelInfo) -> bytes:
        """ProcessModelStatusRequest (a version label is ignored, as GetModelStatus does)."""
        if not info.name:
            raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, "Missing model name in request.")
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=_model_spec(info))
        return _proto_json(self.predictor.get_model_status(request)).encode()

    def metadata(self, info: ModelInfo) -> bytes:
        """ProcessModelMetadataRequest, with ToJsonString's hand-made outer object."""
        if not info.name:
            raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, "Missing model name in request.")
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=_model_spec(info), metadata_field=["signature_def"]
        )
        response = self.predictor.get_model_metadata(request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        text = (
            "{\n"
            + '"model_spec":'
            + _proto_json(response.model_spec)
            + ",\n"
            + '"metadata": {'
            + '"signature_def": '
            + _proto_json(signatures)
            + "}\n}\n"
        )
        return text.encode()


def _libevent_error(status: int) -> web.Response:
    """evhttp_send_error: an HTML page, and the connection closes."""
    phrase = _PHRASES.get(status, "Client Error")
    page = (
        f"<HTML><HEAD>\n<TITLE>{status} {phrase}</TITLE>\n</HEAD><BODY>\n"
        f"<H1>{phrase}</H1>\n</BODY></HTML>\n"
    )
    response = web.Response(
        status=status,
        reason=phrase,
        body=page.encode(),
        headers={"Content-Type": "text/html", "Connection": "close"},
    )
    response.force_close()
    return response


def _json_response(code: grpc.StatusCode, body: bytes) -> web.Response:
    status = _HTTP_STATUS.get(code, 500)
    return web.Response(
        status=status,
        reason=_PHRASES.get(status),
        body=body,
        headers={"Content-Type": _JSON},
    )


async def _read_body(request: web.Request) -> bytes:
    """The body; gzip-decoded when Content-Encoding names gzip (net_http's default).

    A body that will not decompress reads as empty, as in net_http.
    """
    body = await request.read()
    if "gzip" in request.headers.get("Content-Encoding", ""):
        try:
            return gzip.decompress(body)
        except (OSError, EOFError, zlib.error):
            return b""
    return body


class RestServer:
    """The aiohttp application and its site; ``port`` once started."""

    def __init__(
        self,
        predictor: Predictor,
        executor: Executor,
        *,
        max_body_mb: int = 256,
        shutdown_grace_s: float = 5.0,
    ) -> None:
        self._handler = RestHandler(predictor)
        self._executor = executor
        app = web.Application(client_max_size=max_body_mb * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(
            app, auto_decompress=False, access_log=None, shutdown_timeout=shutdown_grace_s
        )
        self.port = 0

    async def start(self, listen: str) -> int:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, int(port), reuse_port=False)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.raw_path
        if method not in _LIBEVENT_METHODS:
            return _libevent_error(400)
        if method not in _ALLOWED_METHODS:
            return _libevent_error(501)
        if _HANDLED.fullmatch(path) is None:
            return _libevent_error(404)  # no dispatcher takes it
        body = await _read_body(request)
        if method == "OPTIONS":
            return _preflight(request)
        loop = asyncio.get_running_loop()
        code, payload = await loop.run_in_executor(
            self._executor, self._handler.process, method, path, body
        )
        if code != grpc.StatusCode.OK:
            logger.debug("REST %s %s: %s", method, path, code.name)
        return _json_response(code, payload)


def _preflight(request: web.Request) -> web.Response:
    """A CORS preflight: OK when Origin names an http(s) origin, else FAILED_PRECONDITION."""
    ok = re.search(r"https?://", request.headers.get("Origin", "")) is not None
    status = 200 if ok else 400
    return web.Response(
        status=status,
        reason=_PHRASES[status],
        body=b"",
        headers={"Content-Type": _LIBEVENT_DEFAULT_TYPE},
    )
