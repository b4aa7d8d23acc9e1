"""The REST front-end over real HTTP, in front of a fake TF Serving REST
upstream (a real aiohttp server): forwarding, guarding, metrics.

Upstream bodies are written by the local backend's writer
(:func:`guard.dev.backend.json_tensor.predict_response`, TF Serving's
``json_tensor.cc`` layout), so they are byte for byte what TF Serving sends.
Expected values are computed with numpy from the arrays the bodies were made of.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from guard.control.config import parse_config
from guard.dev.backend.json_tensor import predict_response
from guard.server.rest.http import forward_headers, response_headers
from tests.support.guard import RunningGuard, samples_by, start_in_process
from tests.support.rest_upstream import FakeRestUpstream, Reply, metadata_body

DT_FLOAT, DT_DOUBLE, DT_STRING, DT_INT64 = 1, 2, 7, 9

MakeGuard = Callable[..., Awaitable[RunningGuard]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeRestUpstream]:
    upstream = FakeRestUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def make_guard(fake: FakeRestUpstream) -> AsyncIterator[MakeGuard]:
    started: list[RunningGuard] = []

    async def factory(models: list[dict[str, Any]], **overrides: Any) -> RunningGuard:
        data: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "upstream": "127.0.0.1:9",  # no gRPC upstream: these tests speak REST only
            "rest_listen": "127.0.0.1:0",
            "rest_upstream": fake.address,
            "health_check_interval_s": 5.0,
            "models": models,
        }
        data.update(overrides)
        running = await start_in_process(parse_config(data, "test.yaml", Path.cwd()))
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.stop()


async def post(
    url: str, body: bytes | str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = body.encode() if isinstance(body, str) else body
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(url, data=data, headers=headers or {}) as response:
            return response.status, dict(response.headers), await response.read()


def rest_requests(guard: RunningGuard, **labels: str) -> float:
    return guard.sample("guard_requests_total", {"protocol": "rest", **labels}) or 0.0


def series(model: str, output: str) -> dict[str, str]:
    return {"model": model, "version": "1", "signature": "serving_default", "output": output}


SIGMOID_RULE = {
    "name": "wide_deep",
    "outputs": [
        {"name": "output_1", "on_violation": "clamp", "threshold": 0.5, "labels": ["NO", "YES"]}
    ],
}
WIDE = np.array([[1.00285], [0.074706882], [0.83481872], [1.0007]], dtype=np.float32)


# ------------------------------------------------------------------ guarding


async def test_row_format_single_output_is_clamped_and_labelled_under_guard_outputs(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    body = predict_response([("output_1", WIDE, DT_FLOAT)], "row")
    fake.predict("wide_deep", body)
    fake.metadata("wide_deep", {"output_1": ("DT_FLOAT", [-1, 1])})
    guard = await make_guard([SIGMOID_RULE])
    request = '{"instances": [[1.0], [2.0], [3.0], [4.0]]}'

    status, headers, out = await post(f"{guard.rest_url}/v1/models/wide_deep:predict", request)

    assert status == 200
    (forwarded,) = [s for s in fake.seen if s.method == "POST"]
    assert forwarded.body == request.encode()  # forwarded unchanged
    doc = json.loads(out)
    clipped = np.clip(WIDE, 0.0, 1.0)
    np.testing.assert_array_equal(np.array(doc["predictions"], dtype=np.float32), clipped)
    classes = (clipped > 0.5).astype(np.int64).ravel()
    rows = doc["guard_outputs"]
    assert [r["output_1_class"] for r in rows] == [[c] for c in classes]
    assert [r["output_1_label"] for r in rows] == [[["NO", "YES"][c]] for c in classes]
    assert headers["x-guard-action"] == "clamped"
    assert headers["x-guard-violations"] == "2"
    assert headers["Content-Type"] == "application/json"
    labels = series("wide_deep", "output_1")
    assert guard.sample("guard_output_violations_total", {**labels, "kind": "above_max"}) == 2
    assert rest_requests(guard, model="wide_deep", method="Predict", code="OK") == 1


async def test_columnar_several_outputs_derive_next_to_their_source(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 6)).astype(np.float32)
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    ids = np.arange(3, dtype=np.int64)
    body = predict_response([("ids", ids, DT_INT64), ("probs", probs, DT_FLOAT)], "columnar")
    fake.predict("m", body)
    fake.metadata("m", {"ids": ("DT_INT64", [-1]), "probs": ("DT_FLOAT", [-1, 6])})
    rule = {"name": "m", "outputs": [{"name": "*", "argmax": True, "top_k": 2}]}
    guard = await make_guard([rule])

    status, headers, out = await post(f"{guard.rest_url}/v1/models/m:predict", '{"inputs": [1]}')

    assert status == 200, out
    doc = json.loads(out)["outputs"]
    assert list(doc)[:2] == ["ids", "probs"]
    assert doc["ids"] == [0, 1, 2]  # not a float: left as it was
    np.testing.assert_array_equal(np.array(doc["probs"], np.float32), probs)
    assert doc["probs_class"] == np.argmax(probs, -1).tolist()
    np.testing.assert_array_equal(np.array(doc["probs_score"], np.float32), probs.max(-1))
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    assert doc["probs_top_k_class"] == top.tolist()
    assert headers["x-guard-action"] == "clean"
    # Only derived outputs: every original value keeps its text.
    assert out.startswith(body[: body.index(b"\n    }")])


async def test_a_response_no_rule_touches_is_byte_identical_with_its_headers(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    body = predict_response([("output_1", WIDE, DT_FLOAT)], "row")
    fake.predict("other", body, headers={"Content-Type": "application/json", "X-Up": "1"})
    guard = await make_guard([SIGMOID_RULE])

    status, headers, out = await post(f"{guard.rest_url}/v1/models/other:predict", "{}")

    assert (status, out) == (200, body)
    assert headers["X-Up"] == "1"
    assert headers["Content-Type"] == "application/json"
    assert "x-guard-action" not in headers
    assert not [s for s in fake.seen if s.path.endswith("/metadata")]  # no rule: not asked


async def test_observe_keeps_the_bytes_and_counts_nan_and_infinity(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    values = np.array([[0.5], [math.nan], [math.inf], [-math.inf], [1.5]], dtype=np.float32)
    body = predict_response([("p", values, DT_FLOAT)], "row")
    assert b"NaN" in body and b"-Infinity" in body
    fake.predict("m", body)
    fake.metadata("m", {"p": ("DT_FLOAT", [-1, 1])})
    guard = await make_guard([{"name": "m", "outputs": [{"name": "p", "on_violation": "observe"}]}])

    status, headers, out = await post(f"{guard.rest_url}/v1/models/m:predict", '{"instances": []}')

    assert (status, out) == (200, body)
    assert headers["x-guard-action"] == "observed"
    assert headers["x-guard-violations"] == "4"
    labels = series("m", "p")
    for kind, n in (("nan", 1), ("inf", 2), ("above_max", 1)):
        assert guard.sample("guard_output_violations_total", {**labels, "kind": kind}) == n


async def test_reject_answers_as_tf_serving_answers_internal_with_the_grpc_text(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.predict("wide_deep", predict_response([("output_1", WIDE, DT_FLOAT)], "row"))
    fake.metadata("wide_deep", {"output_1": ("DT_FLOAT", [-1, 1])})
    rule = {"name": "wide_deep", "outputs": [{"name": "*", "on_violation": "reject"}]}
    guard = await make_guard([rule])

    status, headers, out = await post(f"{guard.rest_url}/v1/models/wide_deep:predict", "{}")

    assert status == 500  # http_server.cc: INTERNAL -> 500
    assert json.loads(out) == {
        "error": "guard: model 'wide_deep' output 'output_1': 2 values above 1.0"
    }
    assert out.startswith(b'{\n    "error": ')  # TF Serving's layout
    assert headers["x-guard-action"] == "rejected"
    assert headers["x-guard-violations"] == "2"  # as on every guarded answer (red team)
    assert rest_requests(guard, model="wide_deep", method="Predict", code="INTERNAL") == 1
    labels = {"model": "wide_deep", "version": "1", "signature": "serving_default"}
    assert guard.sample("guard_responses_total", {**labels, "action": "rejected"}) == 1


async def test_signature_name_in_the_body_picks_the_rules_even_after_the_inputs(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    guard = await _other_rejects(fake, make_guard)
    url = f"{guard.rest_url}/v1/models/m:predict"

    other = await post(url, '{"instances": [["a", {"b": "}"}]], "signature_name": "other"}')
    default = await post(url, '{"instances": [[1]]}')

    assert other[0] == 500
    assert json.loads(other[2])["error"] == "guard: model 'm' output 'q': 1 values above 1.0"
    assert default[0] == 200
    assert default[1]["x-guard-action"] == "observed"


async def test_a_gzip_body_not_read_whole_is_refused_never_guarded_as_the_default(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """Red team: a gzip body that inflated past max_request_mb (40 KB on the
    wire), or did not inflate, was peeked as empty: guarded by
    serving_default's rules, where TF Serving (which inflates up to 100 MB)
    answers with "other"'s, and sent on past the limit. It is refused now,
    and never goes upstream."""
    guard = await _other_rejects(fake, make_guard, max_request_mb=1)
    url, gz = f"{guard.rest_url}/v1/models/m:predict", {"Content-Encoding": "gzip"}
    doc = b'{"signature_name": "other", "instances": [[1]]}'
    small = await post(url, gzip.compress(doc), gz)
    assert small[0] == 500 and b"1 values above 1.0" in small[2]  # read: other's rules
    whole = gzip.compress(doc + b" " * (1 << 20))
    cases = {
        "inflated request body is larger than max_request_mb (1 MiB)": (413, whole),
        "does not decompress": (400, b"\x1f\x8b not gzip"),
        "ends before its compressed stream does": (400, whole[: len(whole) // 2]),
        "bytes after its compressed stream": (400, gzip.compress(doc) + gzip.compress(doc)),
    }
    for words, (status, body) in cases.items():
        got = await post(url, body, gz)
        assert got[0] == status and words in json.loads(got[2])["error"], (words, got)
    assert len([s for s in fake.seen if s.method == "POST"]) == 1  # only the small one
    assert guard.sample("guard_refused_requests_total", {"reason": "request_too_large"}) == 1


async def test_a_body_behind_a_byte_order_mark_is_guarded_by_its_signature(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """Red team: TF Serving's rapidjson skips a leading UTF-8 BOM and served
    signature 'other'; the guard's peek read no object, and the answer went
    back under serving_default's observe rule, past other's reject."""
    guard = await _other_rejects(fake, make_guard)
    url = f"{guard.rest_url}/v1/models/m:predict"
    doc = b'\xef\xbb\xbf{"signature_name": "other", "instances": [[1]]}'
    for body, headers in ((doc, {}), (gzip.compress(doc), {"Content-Encoding": "gzip"})):
        status, answer_headers, out = await post(url, body, headers)
        assert status == 500 and answer_headers["x-guard-action"] == "rejected"
        assert json.loads(out)["error"] == "guard: model 'm' output 'q': 1 values above 1.0"


async def test_a_gzip_body_waits_for_the_inflater_at_most_request_timeout_s(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """Red team: gzip bodies are inflated for the peek one at a time, and a
    body waited for every one queued ahead of it (eight clients of 31 KB
    bodies inflating to 32 MiB held a gzip predict 0.48 s; more, longer).
    A body whose turn does not come within request_timeout_s gets 503 saying
    so, counted as a request_timeout refusal; the rest are guarded."""
    guard = await _other_rejects(fake, make_guard, request_timeout_s=0.2)
    url, gz = f"{guard.rest_url}/v1/models/m:predict", {"Content-Encoding": "gzip"}
    body = gzip.compress(b'{"instances": [[1]], "pad": "' + b" " * (24 << 20) + b'"}', 1)

    answers = await asyncio.gather(*(post(url, body, gz) for _ in range(32)))

    statuses = [status for status, _, _ in answers]
    late = [json.loads(out)["error"] for status, _, out in answers if status == 503]
    assert set(statuses) == {200, 503}, statuses  # the first in line is never late
    assert all("took more than request_timeout_s (0.2 s) to inflate" in e for e in late), late
    assert len([s for s in fake.seen if s.method == "POST"]) == statuses.count(200)
    assert guard.sample("guard_refused_requests_total", {"reason": "request_timeout"}) == len(late)
    assert rest_requests(guard, model="m", method="Predict", code="UNAVAILABLE") == len(late)


async def test_a_ruled_output_of_no_declared_dtype_that_is_not_decimals_is_refused(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """Red team: with the metadata answered 404, integers ([[2]]), strings or
    booleans for an output under a reject rule passed as clean (a client
    reading 2 read a value above 1.0). The guard cannot tell a float written
    as integers from an integer output without the metadata: refused."""
    rules = [{"name": "m", "outputs": [{"name": "p", "on_violation": "reject"}]}]
    guard = await make_guard(rules)  # the fake answers the metadata 404
    not_numbers = "values that are not numbers"
    url = f"{guard.rest_url}/v1/models/m:predict"
    bodies = {
        '{"outputs": {"p": [[2], [0]], "q": [[0.5], [0.5]]}}': "integers",
        '{"outputs": {"p": [["2.0"], ["NaN"]], "q": [[0.5], [0.5]]}}': not_numbers,
        '{"outputs": {"p": [[true], [false]], "q": [[0.5], [0.5]]}}': not_numbers,
        '{"predictions": [{"p": [7], "q": [0.5]}, {"p": [0], "q": [0.5]}]}': "integers",
    }
    for body, held in bodies.items():
        fake.predict("m", body)
        request = '{"instances": [1, 2]}' if "predictions" in body else '{"inputs": [1, 2]}'
        status, headers, out = await post(url, request)
        error = json.loads(out)["error"]
        assert status == 500 and headers["x-guard-action"] == "rejected", (body, status)
        assert f"output 'p': the response holds {held}" in error, error
        assert "cannot learn the output's dtype" in error and "HTTP 404" in error, error
    fake.metadata("m", {"p": ("DT_INT64", [-1, 1]), "q": ("DT_FLOAT", [-1, 1])})
    fake.predict("m", '{"outputs": {"p": [[2], [0]], "q": [[0.5], [0.5]]}}')
    declared = await make_guard(rules)  # a fresh guard: the 404 is remembered for a second
    answer = await post(f"{declared.rest_url}/v1/models/m:predict", '{"inputs": [1, 2]}')
    assert answer[0] == 200 and answer[1]["x-guard-action"] == "clean"  # integers, as declared


async def test_an_undeclared_output_named_as_a_ruled_one_but_for_case_is_refused(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """Red team: the signature declares p (under a reject rule) and q, and the
    answer names 'P': it passed as clean, no rule on 'P', while a Go client,
    whose reader ignores case, read its 1.5 as p."""
    fake.metadata("m", {"p": ("DT_FLOAT", [-1, 1]), "q": ("DT_FLOAT", [-1, 1])})
    guard = await make_guard([{"name": "m", "outputs": [{"name": "p", "on_violation": "reject"}]}])
    url = f"{guard.rest_url}/v1/models/m:predict"
    for body, request in (
        ('{"outputs": {"P": [[1.5]], "q": [[0.5]]}}', '{"inputs": [1]}'),
        ('{"predictions": [{"P": [1.5], "q": [0.5]}]}', '{"instances": [1]}'),
    ):
        fake.predict("m", body)
        status, _, out = await post(url, request)
        assert status == 500, body
        assert "output 'P': the signature does not declare it, and declares 'p'" in out.decode()
    fake.predict("m", '{"outputs": {"p": [[0.5]], "Q": [[1.5]]}}')  # no rule on q: as it came
    assert (await post(url, '{"inputs": [1]}'))[0] == 200


async def _other_rejects(
    fake: FakeRestUpstream, make_guard: MakeGuard, **settings: Any
) -> RunningGuard:
    """A guard whose rules reject for signature "other" and observe for the
    default, in front of model m answering 2.0 (above 1.0) for either."""
    values = np.array([[2.0]], dtype=np.float32)
    fake.predict("m", predict_response([("p", values, DT_FLOAT)], "row"))
    fake.reply("GET", "/v1/models/m/metadata", Reply(body=_two_signatures()))
    rules = [
        {"name": "m", "signature": "other", "outputs": [{"name": "*", "on_violation": "reject"}]},
        {"name": "m", "outputs": [{"name": "*", "on_violation": "observe"}]},
    ]
    return await make_guard(rules, **settings)


def _two_signatures() -> bytes:
    doc = json.loads(_metadata("p"))
    sigs = doc["metadata"]["signature_def"]["signature_def"]
    sigs["other"] = json.loads(_metadata("q"))["metadata"]["signature_def"]["signature_def"][
        "serving_default"
    ]
    return json.dumps(doc).encode()


def _metadata(alias: str) -> bytes:
    from tests.support.rest_upstream import metadata_body

    return metadata_body("m", {alias: ("DT_FLOAT", [-1, 1])})


# ----------------------------------------------------------------- forwarding


async def test_other_methods_and_upstream_errors_pass_unchanged(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    status_body = b'{\n "model_version_status": []\n}\n'
    fake.reply("GET", "/v1/models/wide_deep", Reply(body=status_body, headers={"X-Up": "s"}))
    error = b'{ "error": "Servable not found for request: Latest(wide_deep)" }'
    fake.predict("wide_deep", error, status=404)
    guard = await make_guard([SIGMOID_RULE])

    async with aiohttp.ClientSession() as session:
        url = URL(f"{guard.rest_url}/v1/models/wide_deep?x=%2F", encoded=True)
        async with session.get(url) as response:
            got = (response.status, response.headers["X-Up"], await response.read())
    status, _, out = await post(f"{guard.rest_url}/v1/models/wide_deep:predict", "{}")

    assert got == (200, "s", status_body)
    assert fake.seen[0].path == "/v1/models/wide_deep?x=%2F"
    assert (status, out) == (404, error)
    assert rest_requests(guard, model="wide_deep", method="GetModelStatus", code="OK") == 1
    assert rest_requests(guard, model="wide_deep", method="Predict", code="NOT_FOUND") == 1


async def test_hop_by_hop_headers_stay_on_their_hop(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.reply("POST", "/v1/models/x:classify", Reply(body=b"{}"))
    guard = await make_guard([])
    headers = {"Connection": "keep-alive, X-Private", "X-Private": "1", "X-Kept": "2"}

    status, _, _ = await post(f"{guard.rest_url}/v1/models/x:classify", "{}", headers)

    assert status == 200
    seen = {k.lower(): v for k, v in fake.seen[0].headers.items()}
    assert seen["x-kept"] == "2"
    assert "x-private" not in seen
    assert rest_requests(guard, model="__other__", method="Classify", code="OK") == 1


def test_forwarded_headers_keep_order_and_repeats_less_those_of_one_hop() -> None:
    """Against a plain filter: repeated end-to-end headers stay, in order; the
    hop-by-hop ones, those a Connection header names (any case), and the
    client's Host and Content-Length going upstream (Content-Length kept coming
    back) do not."""
    pairs = [("Host", "x"), ("X-A", "1"), ("connection", "keep-alive, X-Private"),
             ("x-PRIVATE", "2"), ("X-A", "3"), ("Content-Length", "4"), ("TE", "trailers"),
             ("Transfer-Encoding", "chunked"), ("Keep-Alive", "5"), ("X-B", "6"),
             ("te", "x")]  # fmt: skip
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    one_hop = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
               "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
               "x-private"}  # fmt: skip

    def plain(drop: set[str]) -> list[tuple[str, str]]:
        return [(k, v) for k, v in pairs if k.lower() not in drop]

    # The upstream's Host takes the client's place; the length goes last.
    forwarded = [("Host", "up:1")] + plain(one_hop | {"host", "content-length", "expect"})
    assert list(forward_headers(headers, "up:1", 7).items()) == [
        *forwarded,
        ("Content-Length", "7"),
    ]
    assert list(forward_headers(headers, "up:1", None).items()) == forwarded
    assert list(response_headers(headers).items()) == plain(one_hop | {"content-length"})
    assert list(response_headers(headers, keep_length=True).items()) == plain(one_hop)


async def test_the_upstream_sees_the_clients_headers_and_none_of_aiohttps(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """A client that sends no Accept, Accept-Encoding, User-Agent or
    Content-Type gets none added on its way (an Accept-Encoding could make
    the upstream compress what the guard must read); what it sends, a
    request with a body included, arrives as it was sent."""
    fake.reply("POST", "/v1/models/x:classify", Reply(body=b"{}"))
    fake.predict("x", b"{}")
    guard = await make_guard([])
    host, port = guard.rest_url.removeprefix("http://").rsplit(":", 1)
    bare = b"POST /v1/models/x:classify HTTP/1.1\r\nHost: h\r\nX-Kept: 2\r\n"
    full = (
        b"POST /v1/models/x:predict HTTP/1.1\r\nHost: h\r\nAccept: text/x-mine\r\n"
        b"Accept-Encoding: identity\r\nUser-Agent: mine/1\r\nContent-Type: text/x-mine\r\n"
    )
    for head in (bare, full):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
        writer.close()

    seen = [{k.lower(): v for k, v in s.headers.items()} for s in fake.seen]
    assert seen[0] == {"host": fake.address, "x-kept": "2", "content-length": "2"}
    assert {k: seen[1][k] for k in ("accept", "accept-encoding", "user-agent", "content-type")} == {
        "accept": "text/x-mine", "accept-encoding": "identity", "user-agent": "mine/1",
        "content-type": "text/x-mine",
    }  # fmt: skip
    assert all(s.body == b"{}" for s in fake.seen)


async def test_cookies_an_upstream_sets_go_to_that_client_and_no_other(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """The guard's one upstream session serves every client: a cookie the
    upstream sets (reached by name, as a Service is) is passed back to the
    client it was set for, and never sent again by the guard itself."""
    cookie = {"Content-Type": "application/json", "Set-Cookie": "session=a; Path=/"}
    fake.reply("GET", "/v1/models/x", Reply(body=b"{}", headers=cookie))
    port = fake.address.rsplit(":", 1)[1]
    guard = await make_guard([], rest_upstream=f"localhost:{port}")

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for _ in range(2):
            async with session.get(f"{guard.rest_url}/v1/models/x") as response:
                assert response.status == 200
                assert response.headers["Set-Cookie"] == "session=a; Path=/"

    assert [s.headers.get("Cookie") for s in fake.seen] == [None, None]


# ------------------------------------------------------------------ bad input


async def test_a_body_that_is_not_json_is_an_error_only_when_a_rule_applies(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.predict("wide_deep", b"<html>oops</html>")
    fake.predict("free", b"<html>oops</html>")
    guard = await make_guard([SIGMOID_RULE])

    guarded = await post(f"{guard.rest_url}/v1/models/wide_deep:predict", "{}")
    free = await post(f"{guard.rest_url}/v1/models/free:predict", "{}")

    assert guarded[0] == 500
    error = json.loads(guarded[2])["error"]
    assert error.startswith("guard: cannot read the REST predict response of model 'wide_deep'")
    assert free[:1] == (200,) and free[2] == b"<html>oops</html>"
    assert guard.sample("guard_decode_errors_total", {"model": "wide_deep"}) == 1


async def test_a_shape_the_signature_does_not_declare_is_a_clear_error(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.predict("wide_deep", predict_response([("output_1", WIDE, DT_FLOAT)], "row"))
    fake.metadata("wide_deep", {"output_1": ("DT_FLOAT", [-1, 2])})
    guard = await make_guard([SIGMOID_RULE])

    status, _, out = await post(f"{guard.rest_url}/v1/models/wide_deep:predict", "{}")

    assert status == 500
    assert json.loads(out)["error"] == (
        "guard: model 'wide_deep' output 'output_1': the response holds shape [4, 1], "
        "but the signature declares [-1, 2]"
    )


async def test_an_unnamed_output_without_metadata_is_a_clear_error(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.predict("wide_deep", predict_response([("output_1", WIDE, DT_FLOAT)], "row"))
    guard = await make_guard([SIGMOID_RULE])  # the fake has no metadata: 404

    status, _, out = await post(f"{guard.rest_url}/v1/models/wide_deep:predict", "{}")

    assert status == 500
    error = json.loads(out)["error"]
    assert "does not name its output" in error
    assert "HTTP 404" in error


async def test_strings_under_a_rule_are_left_as_they_are(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    words = np.array([[b"a"], [b"b"]], dtype=object)
    body = predict_response([("w", words, DT_STRING)], "row")
    fake.predict("m", body)
    fake.metadata("m", {"w": ("DT_STRING", [-1, 1])})
    guard = await make_guard([{"name": "m", "outputs": [{"name": "*", "threshold": 0.5}]}])

    status, headers, out = await post(f"{guard.rest_url}/v1/models/m:predict", "{}")

    assert (status, out) == (200, body)
    assert headers["x-guard-action"] == "clean"


async def test_deep_nesting_in_a_response_is_a_clear_error(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    deep = '{"predictions": ' + '[{"a": ' * 3000 + "1" + "}]" * 3000 + "}"
    fake.predict("wide_deep", deep)
    guard = await make_guard([SIGMOID_RULE])

    status, _, out = await post(f"{guard.rest_url}/v1/models/wide_deep:predict", "{}")

    assert status == 500
    assert json.loads(out)["error"].startswith("guard: cannot read the REST predict response")


async def test_a_request_whose_keys_the_peek_cannot_reach_is_refused_when_rules_apply(
    fake: FakeRestUpstream, make_guard: MakeGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guard.server.rest import peek

    monkeypatch.setattr(peek, "PEEK_STRINGS_MAX", 10)
    fake.predict("wide_deep", predict_response([("output_1", WIDE, DT_FLOAT)], "row"))
    fake.metadata("wide_deep", {"output_1": ("DT_FLOAT", [-1, 1])})
    fake.predict("free", b"{}")
    guard = await make_guard([SIGMOID_RULE])
    strings = '{"instances": [' + ",".join(['"s"'] * 20) + '], "signature_name": "x"}'

    guarded = await post(f"{guard.rest_url}/v1/models/wide_deep:predict", strings)
    free = await post(f"{guard.rest_url}/v1/models/free:predict", strings)
    not_an_object = await post(f"{guard.rest_url}/v1/models/wide_deep:predict", "[1, 2")

    assert guarded[0] == 400
    assert '"signature_name" before "instances"' in json.loads(guarded[2])["error"]
    assert free[0] == 200  # no rule: the upstream judges it
    assert not [s for s in fake.seen if s.body == strings.encode() and "wide" in s.path]
    assert not_an_object[0] == 200  # forwarded: the fake answers anything; TF Serving says 400
    assert not_an_object[1]["x-guard-action"] == "clamped"


async def test_an_unreachable_or_slow_upstream_is_named_in_the_answer(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.reply("GET", "/v1/models/slow", Reply(body=b"{}", delay_s=2.0))
    slow = await make_guard([], default_timeout_s=0.3)
    gone = await make_guard([], rest_upstream="127.0.0.1:9")

    timed_out = await _get(f"{slow.rest_url}/v1/models/slow")
    unreachable = await _get(f"{gone.rest_url}/v1/models/m")

    assert timed_out[0] == 504
    assert "default_timeout_s (0.3 s)" in json.loads(timed_out[1])["error"]
    assert unreachable[0] == 503
    error = json.loads(unreachable[1])["error"]
    assert error.startswith("guard: cannot reach the REST upstream 127.0.0.1:9: "), error
    assert "ssl:default" not in error and "Cannot connect to host" not in error, error
    labels = {"model": "__other__", "method": "GetModelStatus"}
    assert rest_requests(slow, **labels, code="DEADLINE_EXCEEDED") == 1
    assert rest_requests(gone, **labels, code="UNAVAILABLE") == 1


async def _get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            return response.status, await response.read()


async def test_a_reload_applies_to_rest_calls_too(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    fake.predict("wide_deep", predict_response([("output_1", WIDE, DT_FLOAT)], "row"))
    fake.metadata("wide_deep", {"output_1": ("DT_FLOAT", [-1, 1])})
    guard = await make_guard([SIGMOID_RULE])
    url = f"{guard.rest_url}/v1/models/wide_deep:predict"
    assert (await post(url, "{}"))[1]["x-guard-action"] == "clamped"

    reject = {"name": "wide_deep", "outputs": [{"name": "*", "on_violation": "reject"}]}
    data = {"upstream": "127.0.0.1:9", "rest_upstream": fake.address, "models": [reject]}
    guard.server.swap_rules(parse_config(data, "reloaded.yaml", Path.cwd()))

    status, headers, _ = await post(url, "{}")
    assert (status, headers["x-guard-action"]) == (500, "rejected")


@pytest.mark.parametrize("rows", [1, 20_000])
async def test_a_signature_without_rules_passes_without_asking_for_metadata(
    fake: FakeRestUpstream, make_guard: MakeGuard, rows: int
) -> None:
    """As it came, headers and framing included; an answer over 64 KiB (the
    second case, 1 MB) is written a chunk at a time, with its length."""
    body = predict_response([("output_1", np.tile(WIDE, (rows, 1)), DT_FLOAT)], "row")
    fake.predict("wide_deep", body, headers={"Content-Type": "application/json", "X-Up": "1"})
    rule = {"name": "wide_deep", "signature": "other", "outputs": [{"name": "*"}]}
    guard = await make_guard([rule])

    status, headers, out = await post(f"{guard.rest_url}/v1/models/wide_deep:predict", "{}")

    assert (status, out) == (200, body)
    assert (headers["X-Up"], headers["Content-Type"]) == ("1", "application/json")
    assert headers["Content-Length"] == str(len(body)) and "Transfer-Encoding" not in headers
    assert "x-guard-action" not in headers
    assert [s.method for s in fake.seen] == ["POST"]


async def test_row_format_several_outputs_activation_and_multi_label_threshold(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    from guard.dataplane.codec.restjson import decimal_texts

    logits = np.array([[-2.0, 0.5, 3.25], [0.0, -0.75, 1.5]], dtype=np.float32)
    extra = np.array([[0.25], [2.5]], dtype=np.float32)
    body = predict_response([("extra", extra, DT_FLOAT), ("logits", logits, DT_FLOAT)], "row")
    fake.predict("m", body)
    fake.metadata("m", {"extra": ("DT_FLOAT", [-1, 1]), "logits": ("DT_FLOAT", [-1, 3])})
    rules = [
        {"name": "logits", "activation": "sigmoid", "threshold": [0.3, 0.5, 0.9]},
        {"name": "extra", "on_violation": "clamp"},
    ]
    guard = await make_guard([{"name": "m", "outputs": rules}])

    status, headers, out = await post(f"{guard.rest_url}/v1/models/m:predict", "{}")

    assert status == 200, out
    rows = json.loads(out)["predictions"]
    expected = (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    got = np.array([r["logits"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    for text in decimal_texts(got):  # written as TF Serving writes a float32
        assert text.encode() in out
    assert [r["logits_class"] for r in rows] == (got > [0.3, 0.5, 0.9]).astype(int).tolist()
    assert [r["extra"] for r in rows] == [[0.25], [1.0]]
    assert list(rows[0]) == ["extra", "logits", "logits_class"]
    assert headers["x-guard-action"] == "clamped"
    assert headers["x-guard-violations"] == "1"


async def test_a_model_s_new_versions_keep_their_own_series_over_rest(
    fake: FakeRestUpstream, make_guard: MakeGuard
) -> None:
    """As over gRPC (test_proxy.py): a model keeps its last 8 versions'
    series, and a version that comes back is counted under its own label
    again, through the plans made before."""
    body = predict_response([("output_1", WIDE, DT_FLOAT)], "row")
    for version in range(1, 11):  # the version a REST answer is counted under: its metadata's
        path = f"/v1/models/wide_deep/versions/{version}"
        meta = metadata_body("wide_deep", {"output_1": ("DT_FLOAT", [-1, 1])}, version)
        fake.reply("POST", f"{path}:predict", Reply(body=body))
        fake.reply("GET", f"{path}/metadata", Reply(body=meta))
    guard = await make_guard([SIGMOID_RULE])
    request = '{"instances": [[1.0], [2.0], [3.0], [4.0]]}'
    for version in [*range(1, 11), 1]:
        url = f"{guard.rest_url}/v1/models/wide_deep/versions/{version}:predict"
        assert (await post(url, request))[0] == 200
    counted = samples_by(
        guard.metrics_url, "guard_output_values_total", "version", model="wide_deep"
    )
    assert counted == {**{str(v): 4.0 for v in range(4, 11)}, "1": 4.0}
