"""The REST front-end's metadata cache against a hostile upstream: a real
aiohttp upstream on an ephemeral port, fetched from the way the REST
front-end fetches (its upstream client, bounded by ``read_limited``), and the guard itself in
process, in this event loop, so that its stalls are this loop's."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.control.config import parse_config
from guard.server.deadlines import Deadlines
from guard.server.rest import signatures
from guard.server.rest.client import UpstreamClient, get_limited
from guard.server.rest.signatures import (
    CACHE_BYTES_MAX,
    ENTRIES_MAX,
    METADATA_BYTES_MAX,
    OUTPUTS_MAX,
    SIGNATURES_MAX,
    SignatureCache,
    parse_metadata,
)
from tests.support.guard import RunningGuard, start_in_process
from tests.support.rest_upstream import metadata_body

Answer = Callable[[str, int | None, str | None], Awaitable[web.StreamResponse]]


def junk_metadata(version: int, junk_outputs: int) -> bytes:
    """The red-team's metadata: a usable ``serving_default`` and a signature
    of ``junk_outputs`` empty outputs (300,000 make 3.9 MB)."""
    good = '{"p":{"dtype":"DT_FLOAT","tensor_shape":{"dim":[{"size":"-1"},{"size":"1"}]}}}'
    junk = ",".join(f'"o{i}":{{}}' for i in range(junk_outputs))
    return (
        f'{{"model_spec":{{"name":"m","version":"{version}"}},"metadata":{{"signature_def":'
        f'{{"signature_def":{{"serving_default":{{"outputs":{good}}},'
        f'"junk":{{"outputs":{{{junk}}}}}}}}}}}}}'
    ).encode()


# Just under METADATA_BYTES_MAX: read and parsed, then refused as too many outputs.
UNDER_LIMIT = junk_metadata(1, 80_000)
WIDE_OUTPUTS = 200  # with names of 2,000 characters: kept, about 450 KB in memory


class Upstream:
    """TF Serving's REST metadata and predict, as ``answer`` decides; GETs counted."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.asked: Counter[str] = Counter()
        self.base = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            return web.Response(body=b'{"predictions": [[0.7], [0.2]]}')
        self.asked[request.path] += 1
        parts = request.path.split("/")  # "", v1, models, NAME, [versions|labels, X,] metadata
        version = int(parts[5]) if parts[4] == "versions" else None
        label = parts[5] if parts[4] == "labels" else None
        return await self.answer(parts[3], version, label)


@asynccontextmanager
async def upstream(answer: Answer) -> AsyncIterator[Upstream]:
    server = Upstream(answer)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def cache_on(server: Upstream, timeout_s: float = 10.0) -> AsyncIterator[SignatureCache]:
    """A cache that fetches as the REST front-end's ``_get`` does."""
    address = server.base.removeprefix("http://")
    client = UpstreamClient(address, Deadlines(), timeout_s, max_idle=4)

    async def fetch(path: str) -> tuple[int, bytes]:
        return await get_limited(client, path, METADATA_BYTES_MAX, "metadata")

    try:
        yield SignatureCache(fetch)
    finally:
        client.close()


def answering(body: Callable[[int | None], bytes], status: int = 200) -> Answer:
    async def answer(model: str, version: int | None, label: str | None) -> web.StreamResponse:
        return web.Response(status=status, body=body(version), content_type="application/json")

    return answer


@asynccontextmanager
async def loop_watch() -> AsyncIterator[list[float]]:
    """The longest the event loop went without running a 1 ms timer, in ``[0]``."""
    worst = [0.0]
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst[0] = max(worst[0], now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        yield worst
    finally:
        stop.set()
        await ticker


@contextmanager
def traced() -> Iterator[list[int]]:
    """Python memory held at the end (``[0]``) and at most (``[1]``), in bytes."""
    gc.collect()
    tracemalloc.start()
    found = [0, 0]
    try:
        yield found
    finally:
        gc.collect()
        found[0], found[1] = tracemalloc.get_traced_memory()
        tracemalloc.stop()


# ------------------------------------------------------------- the 40-version attack


async def test_forty_versions_of_huge_metadata_keep_nothing_big_and_the_loop_moving() -> None:
    assert len(UNDER_LIMIT) < METADATA_BYTES_MAX < len(junk_metadata(1, 300_000))
    bodies = {"metabig": junk_metadata(1, 300_000), "under": UNDER_LIMIT}

    async def answer(model: str, version: int | None, label: str | None) -> web.StreamResponse:
        return web.Response(body=bodies[model], content_type="application/json")

    async with upstream(answer) as server, cache_on(server) as cache:
        gc.collect()
        blocks = sys.getallocatedblocks()
        async with loop_watch() as stall:
            big = [await cache.get("metabig", v, None) for v in range(1, 41)]
            under = [await cache.get("under", v, None) for v in range(1, 41)]
        gc.collect()
        # Python objects still held: about 700 thousand per entry before they were bounded.
        assert sys.getallocatedblocks() - blocks < 20_000
        assert stall[0] < 0.15, f"the loop stalled {stall[0]:.3f} s"
        assert {m.problem for m in big} == {
            f"the metadata request failed: the metadata is larger than {METADATA_BYTES_MAX} bytes"
        }
        assert {m.problem for m in under} == {
            f"its signatures declare 80001 outputs, more than the {OUTPUTS_MAX} the guard keeps "
            "per model version"
        }
        assert {m.version for m in under} == {1} and all(not m.signatures for m in under)
        assert len(cache) == 80
        assert cache.weight < 80 * 1024  # about 1 KB per entry: the key and the reason
        with traced() as memory:  # traced, each read takes 0.15 s: a few are enough
            for v in range(41, 49):
                await cache.get("under", v, None)
        assert memory[0] < 256 * 1024, f"{memory[0]} bytes kept after 8 more versions"
        assert memory[1] < 32 * 1024 * 1024, f"{memory[1]} bytes at most while reading one"
        assert sum(server.asked.values()) == 88
        await cache.get("under", 48, None)  # remembered: not asked again
        assert sum(server.asked.values()) == 88


async def test_metadata_that_is_kept_is_weighed_as_it_takes_and_the_cache_stays_in_bounds() -> None:
    # Made before anything is traced: the upstream, in this process, holds its last answer.
    bodies = {
        v: metadata_body("wide", {f"{v}_{i}_" + "n" * 2000: ("DT_FLOAT", [-1, 1000 + i])
                                  for i in range(WIDE_OUTPUTS)}, v)
        for v in range(1, 41)
    }  # fmt: skip

    async with upstream(answering(lambda v: bodies[v or 0])) as server, cache_on(server) as cache:
        with traced() as one:
            first = await cache.get("wide", 1, None)
        assert len(first.signatures["serving_default"]) == WIDE_OUTPUTS
        assert first.signatures["serving_default"]["1_7_" + "n" * 2000].dims == (-1, 1007)
        assert 0.9 * one[0] < cache.weight < 1.1 * one[0], (cache.weight, one[0])
        with traced() as many:
            for v in range(2, 41):
                await cache.get("wide", v, None)
        assert cache.weight <= CACHE_BYTES_MAX
        assert len(cache) < 40
        assert many[0] < CACHE_BYTES_MAX + 2 * 1024 * 1024, f"{many[0]} bytes kept"
        await cache.get("wide", 40, None)  # the newest is kept
        assert server.asked["/v1/models/wide/versions/40/metadata"] == 1
        await cache.get("wide", 1, None)  # the oldest went first
        assert server.asked["/v1/models/wide/versions/1/metadata"] == 2


async def _guard_in_front_of(server: Upstream, rules: list[dict[str, Any]]) -> RunningGuard:
    """A guard in this process, its REST upstream ``server``."""
    config = {
        "listen": "127.0.0.1:0",
        "upstream": "127.0.0.1:9",
        "rest_listen": "127.0.0.1:0",
        "rest_upstream": server.base.removeprefix("http://"),
        "models": rules,
    }
    return await start_in_process(parse_config(config, "test.yaml", Path.cwd()))


async def test_the_guard_answers_others_while_a_client_walks_forty_versions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with upstream(answering(lambda v: junk_metadata(v or 1, 80_000))) as server:
        rules = [{"name": "*", "outputs": [{"name": "*", "threshold": 0.5, "labels": ["n", "y"]}]}]
        guard = await _guard_in_front_of(server, rules)
        try:
            async with aiohttp.ClientSession() as session, loop_watch() as stall:
                for v in range(1, 41):
                    url = f"{guard.rest_url}/v1/models/m/versions/{v}:predict"
                    async with session.post(url, data=b'{"instances": [[1], [2]]}') as response:
                        status, text = response.status, await response.text()
            assert guard.rest is not None
            held = guard.rest._signatures  # noqa: SLF001 - what the guard holds
        finally:
            await guard.stop()
    assert status == 500
    assert "its signatures declare 80001 outputs, more than the 2048" in json.loads(text)["error"]
    assert stall[0] < 0.15, f"the loop stalled {stall[0]:.3f} s"
    assert len(held) == 40 and held.weight < 40 * 1024
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# ------------------------------------------------------------- bad answers, failures


def infinite_dim(version: int | None) -> bytes:
    return metadata_body("m", {"p": ("DT_FLOAT", [-1])}).replace(b'"-1"', b"Infinity")


async def test_an_infinite_dim_is_a_clear_problem_remembered_like_other_bad_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with upstream(answering(infinite_dim)) as server, cache_on(server) as cache:
        first = await cache.get("m", None, None)
        again = await cache.get("m", None, None)
        assert first.problem == (
            "its metadata could not be read: a dim size of output 'p' of signature "
            "'serving_default' is Infinity, not an integer"
        )
        assert again is first
        assert server.asked["/v1/models/m/metadata"] == 1
        monkeypatch.setattr(signatures, "LATEST_TTL_S", 0.0)
        await cache.get("m", 1, None)  # remembered as long as the latest version's metadata
        await cache.get("m", 1, None)
        assert server.asked["/v1/models/m/versions/1/metadata"] == 2


async def test_an_infinite_dim_gets_the_client_the_reason_and_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with upstream(answering(infinite_dim)) as server:
        rules = [{"name": "m", "outputs": [{"name": "*", "threshold": 0.5}]}]
        guard = await _guard_in_front_of(server, rules)
        try:
            async with aiohttp.ClientSession() as session:
                answers = []
                for _ in range(3):
                    url = f"{guard.rest_url}/v1/models/m:predict"
                    async with session.post(url, data=b'{"instances": [[1], [2]]}') as response:
                        answers.append((response.status, await response.json()))
        finally:
            await guard.stop()
    assert {status for status, _ in answers} == {500}
    error = answers[0][1]["error"]
    assert "is Infinity, not an integer" in error and "internal error" not in error
    assert server.asked["/v1/models/m/metadata"] == 1
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_timed_out_request_says_so_and_a_failure_is_remembered_briefly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def answer(model: str, version: int | None, label: str | None) -> web.StreamResponse:
        if model == "slow":
            await asyncio.sleep(1)
        return web.Response(status=503, body=b'{"error": "not ready"}')

    assert signatures.FAILURE_TTL_S == 1.0
    monkeypatch.setattr(signatures, "FAILURE_TTL_S", 0.3)
    async with upstream(answer) as server, cache_on(server, timeout_s=0.2) as cache:
        slow = await cache.get("slow", None, None)
        assert slow.problem == "the metadata request timed out"
        down = [await cache.get("down", None, None) for _ in range(3)]
        assert {m.problem for m in down} == {"the upstream answered its metadata with HTTP 503"}
        assert server.asked["/v1/models/down/metadata"] == 1
        await asyncio.sleep(0.35)
        await cache.get("down", None, None)
        assert server.asked["/v1/models/down/metadata"] == 2


async def test_failures_for_any_number_of_labels_stay_within_the_bounds() -> None:
    async with upstream(answering(lambda v: b'{"error": "no such label"}', 404)) as server:
        async with cache_on(server) as cache:
            for i in range(ENTRIES_MAX + 50):
                meta = await cache.get("m", None, f"label-{i}-" + "x" * 900)
            assert meta.problem == "the upstream answered its metadata with HTTP 404"
            assert len(cache) == ENTRIES_MAX
            assert cache.weight < ENTRIES_MAX * 2048
            assert sum(server.asked.values()) == ENTRIES_MAX + 50


async def test_a_waiting_request_gets_the_metadata_when_the_fetching_one_goes_away() -> None:
    async def answer(model: str, version: int | None, label: str | None) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.Response(body=metadata_body("m", {"p": ("DT_FLOAT", [-1])}, version=4))

    async with upstream(answer) as server, cache_on(server) as cache:
        first = asyncio.create_task(cache.get("m", None, None))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(cache.get("m", None, None))
        await asyncio.sleep(0.05)
        first.cancel()
        assert (await second).version == 4
        assert first.cancelled()
        assert server.asked["/v1/models/m/metadata"] == 2


# ------------------------------------------------------------- parse_metadata


def _doc(outputs: Any = None, **shape: Any) -> dict[str, Any]:
    info = {"dtype": "DT_FLOAT", "tensor_shape": shape or {"dim": [{"size": "-1"}]}}
    return {
        "model_spec": {"name": "m", "version": "2"},
        "metadata": {
            "signature_def": {
                "signature_def": {"serving_default": {"outputs": outputs or {"p": info}}}
            }
        },
    }


def _many(count: int, per: int) -> dict[str, Any]:
    doc = _doc()
    defs: dict[str, Any] = {
        f"s{i}": {"outputs": {f"o{j}": {} for j in range(per)}} for i in range(count)
    }
    doc["metadata"]["signature_def"]["signature_def"] = defs
    return doc


OUT = "output 'p' of signature 'serving_default'"
WHAT = f"a dim size of {OUT}"
KEEPS = "the guard keeps per model version"
BAD_SIGNATURE_DEF: dict[str, Any] = {
    "model_spec": {},
    "metadata": {"signature_def": {"signature_def": []}},
}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (json.dumps(_doc(dim=[{"size": 1.5}])), f"{WHAT} is 1.5, not an integer"),
        (json.dumps(_doc(dim=[{"size": True}])), f"{WHAT} is a boolean, not an integer"),
        (json.dumps(_doc(dim=[{"size": "1_0"}])), f'{WHAT} is "1_0", not an integer'),
        (json.dumps(_doc(dim=[{"size": [1]}])), f"{WHAT} is an array, not an integer"),
        (json.dumps(_doc(dim=[{"size": 2**63}])), f"{WHAT} is {2**63}, outside int64"),
        (json.dumps(_doc(dim=[{"size": "9" * 5000}])), '...(5000 characters)", not an integer'),
        (json.dumps(_doc(dim=[{"size": 1}] * 255)), f"{OUT} has no list of at most 254 dims"),
        (json.dumps(_doc(dim=[{}])), "it has no 'size' member"),
        (json.dumps(_doc({"p": {"dtype": {}}})), f"{OUT} has a dtype that is not a dtype name"),
        (json.dumps({"model_spec": {"version": "NaN"}}), 'its version is "NaN", not an integer'),
        (json.dumps(BAD_SIGNATURE_DEF), "its signature_def is not a JSON object"),
        ("[" * 100_000, "it nests too deeply"),
        (json.dumps(_many(SIGNATURES_MAX + 1, 0)), f"more than the {SIGNATURES_MAX} {KEEPS}"),
        (json.dumps(_many(3, 700)), f"declare 2100 outputs, more than the {OUTPUTS_MAX} {KEEPS}"),
        (json.dumps(_doc({"p" * 1_100_000: {}})), f"take more than the 1024 KiB {KEEPS}"),
    ],
)
def test_bad_metadata_says_what_is_wrong_with_it(text: str, problem: str) -> None:
    meta = parse_metadata(200, text.encode())
    assert meta.problem is not None and meta.problem.endswith(problem), meta.problem
    assert meta.signatures == {}
    assert len(meta.problem) < 400


def test_unknown_ranks_and_proto3_ints_are_read() -> None:
    doc = _doc({"a": {"dtype": "DT_INT64", "tensor_shape": {"unknown_rank": True}},
                "b": {"tensor_shape": {"dim": [{"size": 3}, {"size": "-1"}]}},
                "c": {"dtype": "DT_FLOAT"}})  # fmt: skip
    meta = parse_metadata(200, json.dumps(doc).encode())
    assert meta.problem is None and meta.version == 2
    outputs = meta.signatures["serving_default"]
    assert [(o.dtype, o.dims) for o in outputs.values()] == [
        ("DT_INT64", None),
        ("", (3, -1)),
        ("DT_FLOAT", ()),
    ]


_JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
_PLACES = ["version", "defs", "sig", "outputs", "info", "shape", "dim", "entry", "size"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_PLACES), _JSON)
def test_any_json_anywhere_in_the_metadata_is_read_or_refused_with_a_reason(
    place: str, value: Any
) -> None:
    doc = _doc()
    spec, defs = doc["model_spec"], doc["metadata"]["signature_def"]["signature_def"]
    info = defs["serving_default"]["outputs"]["p"]
    targets = {
        "version": (spec, "version"), "defs": (doc["metadata"]["signature_def"], "signature_def"),
        "sig": (defs, "serving_default"), "outputs": (defs["serving_default"], "outputs"),
        "info": (defs["serving_default"]["outputs"], "p"), "shape": (info, "tensor_shape"),
        "dim": (info["tensor_shape"], "dim"), "entry": (info["tensor_shape"]["dim"], 0),
        "size": (info["tensor_shape"]["dim"][0], "size"),
    }  # fmt: skip
    holder, key = targets[place]
    holder[key] = value
    meta = parse_metadata(200, json.dumps(doc).encode())
    if meta.problem is None:
        for outputs in meta.signatures.values():
            for out in outputs.values():
                assert isinstance(out.dtype, str)
                assert out.dims is None or all(-(2**63) <= d < 2**63 for d in out.dims)
    else:
        assert meta.problem.startswith("its metadata could not be read")
        assert meta.signatures == {} and len(meta.problem) < 400
