"""The REST front-end's pure parts: the bounded request peek, TF Serving's
URL grammar and status mapping, and the metadata cache."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.dataplane.errors import Status
from guard.server.rest import peek as peek_module
from guard.server.rest import signatures
from guard.server.rest.peek import NotInflated, RequestPeek, inflate, peek_request
from guard.server.rest.routes import Route, code_of_status, http_status, route
from guard.server.rest.signatures import SignatureCache, metadata_path, parse_metadata
from tests.native import native
from tests.support.rest_upstream import metadata_body

# Each peek test runs on the Python walk (the reference) and on the native one.
ROUTES = pytest.mark.parametrize("route_name", ["reference", "native"])


def peek_on(route_name: str, body: bytes) -> RequestPeek:
    scan = native().request_peek if route_name == "native" else None
    return peek_request(body, scan)


@pytest.mark.parametrize(
    ("body", "signature", "fmt"),
    [
        (b'{"instances": [[1, 2]]}', None, "row"),
        (b'{"signature_name": "s", "inputs": {"a": [1]}}', "s", "columnar"),
        (b'{"inputs": {"x": ["{", "[[", "\\"]"]}, "signature_name": "late"}', "late", "columnar"),
        (b'{"instances": [{"b64": "AAA="}], "signature\\u005fname": "esc"}', "esc", "row"),
        (b' \n{"instances": [], "signature_name": "x\\"y"}', 'x"y', "row"),
        (b'{"signature_name": 5, "instances": []}', None, "row"),  # the upstream judges it
        # A UTF-8 byte order mark: rapidjson (TF Serving) and json.loads skip it;
        # the peek read no object there, and serving_default's rules applied.
        (b'\xef\xbb\xbf{"signature_name": "strict", "instances": []}', "strict", "row"),
        (b'\xef\xbb\xbf \n{"inputs": [], "signature_name": "s"}', "s", "columnar"),
    ],
)
@ROUTES
def test_the_peek_finds_the_signature_and_format_as_json_does(
    body: bytes, signature: str | None, fmt: str, route_name: str
) -> None:
    found = peek_on(route_name, body)
    doc = json.loads(body)
    expected = doc.get("signature_name")
    assert found.signature == (expected if isinstance(expected, str) else None) == signature
    assert found.format == fmt
    assert found.complete


@ROUTES
def test_the_peek_never_reads_numbers_and_stops_at_its_bound(route_name: str) -> None:
    numbers = b"[" + b",".join([b"[1.5, 2.5, 3.5]"] * 200_000) + b"]"
    body = b'{"instances": ' + numbers + b', "signature_name": "s"}'
    started = time.perf_counter()
    assert peek_on(route_name, body).signature == "s"
    assert time.perf_counter() - started < 0.5  # bytes.count over 3 MB, not a parse

    strings = b'{"instances": [' + b",".join([b'"a"'] * (peek_module.PEEK_STRINGS_MAX + 1))
    bounded = peek_on(route_name, strings + b'], "signature_name": "s"}')
    assert (bounded.signature, bounded.complete, bounded.exceeded) == (None, False, True)
    keys = b"{" + b"".join(b'"k%d": 0, ' % i for i in range(1000)) + b'"signature_name": "s"}'
    by_keys = peek_on(route_name, b'{"instances": [], ' + keys[1:])
    assert (by_keys.signature, by_keys.format, by_keys.exceeded) == (None, "row", True)
    for bad in (b"[1, 2]", b'{"instances": [1, 2', b'{"a": "unterminated'):
        found = peek_on(route_name, bad)
        assert not found.complete and not found.exceeded  # the upstream judges these


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["instances", "inputs", "signature_name", "x", "{", 'a"b']),
        st.recursive(
            st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=5),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
            max_leaves=8,
        ),
    )
)
def test_the_peek_agrees_with_json_loads(doc: dict[str, object]) -> None:
    found = peek_request(json.dumps(doc).encode())
    signature = doc.get("signature_name")
    assert found.signature == (signature if isinstance(signature, str) else None)
    first = next((k for k in doc if k in ("instances", "inputs")), None)
    assert found.format == {"instances": "row", "inputs": "columnar", None: None}[first]


@ROUTES
def test_a_long_string_after_an_escaped_key_is_passed_in_bounded_memory(route_name: str) -> None:
    """Red team: an escaped top-level key sends the native peek back to the
    Python walk, whose string pattern kept state for every byte of a string:
    8 MB took the guard to 1 GB, and 4 KB of gzip to 561 MB. Both routes now
    pass a 2 MB string (plain or escapes) in a few KB."""
    for filler in (b"a" * 2_000_000, b'\\"' * 1_000_000):
        body = b'{"a\\u0062": 1, "instances": [["' + filler + b'"]], "signature_name": "s"}'
        tracemalloc.start()
        try:
            found = peek_on(route_name, body)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (found.signature, found.format, found.complete) == ("s", "row", True)
        assert peak < 256 * 1024, f"the peek held {peak} bytes"


def test_inflate_is_bounded_and_takes_one_whole_stream() -> None:
    doc = b'{"signature_name": "z"}' + b" " * 1000
    body = gzip.compress(doc)
    assert inflate(body, 2000) == doc == inflate(zlib.compress(doc), 2000)
    with pytest.raises(NotInflated) as large:
        inflate(body, 100)
    assert large.value.too_large
    for bad in (b"not gzip", body[:-9], body + b"\0", body + body):
        with pytest.raises(NotInflated) as broken:
            inflate(bad, 2000)
        assert not broken.value.too_large


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/models/m:predict", Route("Predict", "m")),
        ("POST", "/v1/models/m/versions/3:PREDICT", Route("Predict", "m", 3)),
        ("POST", "/v1/models/a%2Fb/labels/canary:predict", Route("Predict", "a/b", None, "canary")),
        ("POST", "/v1/models/m:classify", Route("Classify", "m")),
        ("POST", "/v1/models/m:regress", Route("Regress", "m")),
        ("GET", "/v1/models/m/versions/2/metadata", Route("GetModelMetadata", "m")),
        ("GET", "/v1/models/m", Route("GetModelStatus", "m")),
        ("GET", "/v1/models/m:predict", Route("__other__")),
        ("PUT", "/v1/models/m:predict", Route("__other__")),
        ("POST", "/v1/models/m/versions/99999999999999999999:predict", Route("__other__")),
        # Past Python's 4,300-digit int(): a ValueError and a 500, found by a red-team pass.
        ("POST", "/v1/models/m/versions/" + "1" * 5000 + ":predict", Route("__other__")),
        ("POST", "/v1/models/m/versions/" + "0" * 5000 + "7:predict", Route("Predict", "m", 7)),
    ],
)
def test_routes_follow_tf_servings_url_grammar(method: str, path: str, expected: Route) -> None:
    assert route(method, path) == expected
    assert route(method, path) == expected  # the second time from the cache


def test_the_route_cache_is_bounded_against_a_flood_of_urls() -> None:
    from guard.server.rest import routes

    for i in range(5000):
        assert route("POST", f"/v1/models/m{i}:predict") == Route("Predict", f"m{i}")
    assert 0 < len(routes._ROUTES) <= 1024
    long = "/v1/models/" + "x" * 2000 + ":predict"
    assert route("POST", long) == Route("Predict", "x" * 2000)
    assert ("POST", long) not in routes._ROUTES._data  # too heavy to keep


def test_status_codes_follow_tf_servings_mapping() -> None:
    assert http_status(Status.INTERNAL) == 500
    assert http_status(Status.RESOURCE_EXHAUSTED) == 429
    statuses = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
                504: "DEADLINE_EXCEEDED", 408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED",
                502: "UNAVAILABLE", 418: "UNKNOWN", 304: "OK", 307: "OK",
                999: "UNKNOWN", 417: "INVALID_ARGUMENT"}  # fmt: skip
    for status, code in statuses.items():
        assert code_of_status(status) == code


def test_metadata_is_parsed_and_bad_metadata_says_why() -> None:
    meta = parse_metadata(200, metadata_body("m", {"p": ("DT_FLOAT", [-1, 201])}, version=7))
    assert meta.version == 7
    assert meta.signatures["serving_default"]["p"].dims == (-1, 201)
    assert meta.signatures["serving_default"]["p"].dtype == "DT_FLOAT"
    assert parse_metadata(404, b"{}").problem == "the upstream answered its metadata with HTTP 404"
    assert (parse_metadata(200, b"[]").problem or "").startswith("its metadata could not be read")
    assert metadata_path("a/b", 2, None) == "/v1/models/a%2Fb/versions/2/metadata"
    assert metadata_path("m", None, "canary") == "/v1/models/m/labels/canary/metadata"


async def test_the_cache_asks_once_and_follows_a_new_latest_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []
    version = {"now": 1}

    async def fetch(path: str) -> tuple[int, bytes]:
        asked.append(path)
        return 200, metadata_body("m", {"p": ("DT_FLOAT", [-1])}, version=version["now"])

    cache = SignatureCache(fetch)
    first = [await cache.get("m", None, None) for _ in range(3)]
    assert [m.version for m in first] == [1, 1, 1]
    assert asked == ["/v1/models/m/metadata"]

    monkeypatch.setattr(signatures, "LATEST_TTL_S", 0.0)
    await cache.get("m", 5, None)  # a fixed version: cached for good
    await cache.get("m", 5, None)
    assert asked.count("/v1/models/m/versions/5/metadata") == 1

    cache = SignatureCache(fetch)  # entries for the latest version now expire at once
    assert (await cache.get("m", None, None)).version == 1
    version["now"] = 2
    assert (await cache.get("m", None, None)).version == 2


# Top-level members as a client might write them, escapes, strings at the
# signature's bound, brackets inside strings, bad UTF-8; then cut anywhere.
_KEYS = st.sampled_from(
    [b'"instances"', b'"inputs"', b'"signature_name"', b'"x"', b'"signature\\u005fname"',
     b'"sig\xffx"', b'"{["']
)  # fmt: skip
_STRINGS = st.one_of(
    st.sampled_from([b'"s"', b'"a\\"b"', b'"[{"', b'"\xff\xfe"', b'""']),
    st.integers(1020, 1026).map(lambda n: b'"' + b"y" * n + b'"'),
)
_VALUES = st.recursive(
    _STRINGS | st.sampled_from([b"1.5", b"null", b"[]", b"{}"]),
    lambda inner: (
        st.lists(inner, max_size=3).map(lambda xs: b"[" + b", ".join(xs) + b"]")
        | st.lists(st.tuples(_KEYS, inner), max_size=2).map(
            lambda kv: b"{" + b",".join(k + b":" + v for k, v in kv) + b"}"
        )
    ),
    max_leaves=6,
)
_WS = st.sampled_from([b"", b" ", b"\n  ", b"\t"])


@st.composite
def _request_bodies(draw: st.DrawFn) -> bytes:
    members = draw(st.lists(st.tuples(_WS, _KEYS, _WS, _VALUES), max_size=5))
    body = draw(_WS) + b"{" + b",".join(w1 + k + w2 + b":" + v for w1, k, w2, v in members) + b"}"
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    return body


@settings(max_examples=1500, deadline=None)
@given(_request_bodies())
def test_the_native_peek_agrees_with_the_reference(body: bytes) -> None:
    scan = native().request_peek
    assert scan is not None
    found = scan(body, peek_module.PEEK_STRINGS_MAX, peek_module.PEEK_KEY_BYTES_MAX, 1024)
    if found is None:  # left to the reference: only for an escaped key or signature
        assert b"\\" in body
        return
    assert peek_request(body, scan) == peek_request(body)
