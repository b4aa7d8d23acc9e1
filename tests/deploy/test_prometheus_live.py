"""The dashboard and alerts against a real Prometheus scraping a real `guard serve`.

A fake TF Serving (official tensorflow_serving stubs) answers with out-of-range values,
NaN/Inf, bad softmax rows, undecodable bytes, and the real outputs of the trained and
the untrained seed softmax (run in this process); a fake TF Serving REST API (a real
aiohttp server) answers REST predicts for some of the same models; `guard serve` runs as
a subprocess in front of both; Debian's `prometheus` scrapes the guard every second and
evaluates a copy of deploy/prometheus/guard-rules.yaml whose `for:` durations are
shortened. Then every dashboard query (variables substituted) must return data through
Prometheus' HTTP API, with series for both protocols, the value alerts must reach
`firing` (the model-health ones on the untrained model only), and `promtool check
metrics` must accept /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import yaml
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from guard.control.baseline import from_values
from guard.dev.models import (
    SOFTMAX_201,
    SOFTMAX_201_UNTRAINED,
    VERSION,
    build_models,
    random_inputs,
    saved_model_predict,
)
from tests.deploy.paths import DEPLOY
from tests.support.guard import start_guard
from tests.support.protos import predict_request, predict_response
from tests.support.rest_upstream import FakeRestUpstream

pytestmark = [pytest.mark.slow, pytest.mark.tf]

VALUE_ALERTS = {
    "GuardOutputOutOfRange",
    "GuardOutputNaN",
    "GuardRejectingResponses",
    "GuardSoftmaxBroken",
    "GuardModelNearUniform",
    "GuardModelStuck",
    "GuardOutputDrift",
}
HEALTH_ALERTS = {"GuardModelNearUniform", "GuardModelStuck", "GuardOutputDrift"}
REPO = DEPLOY.parent
SEED_BATCH = 64
# What Grafana would substitute: "All" (allValue .*) and windows that hold >= 2 scrapes.
SUBSTITUTIONS = {
    "$__rate_interval": "20s",
    "$__range": "5m",
    "$model": ".*",
    "$signature": ".*",
    "$output": ".*",
    "$protocol": ".*",
}


def _seed_outputs() -> dict[str, np.ndarray]:
    """The trained and the untrained softmax_201 on one batch of random images."""
    paths = build_models(REPO / ".cache" / "models")
    inputs = random_inputs(SOFTMAX_201, SEED_BATCH, seed=5)
    return {
        name: saved_model_predict(paths[name] / str(VERSION), inputs)["probabilities"]
        for name in (SOFTMAX_201, SOFTMAX_201_UNTRAINED)
    }


def _health_rule(baseline_from: np.ndarray) -> dict[str, Any]:
    """The seed softmax's rule: abstain below 0.5, drift against the trained model."""
    edges, fractions, _ = from_values(baseline_from.max(axis=-1))
    return {
        "name": "probabilities",
        "check_sum": True,
        "argmax": True,
        "min_confidence": 0.5,
        "baseline": {"edges": list(edges), "fractions": list(fractions)},
        "drift_window": 500,
    }


GUARD_CONFIG = {
    "models": [
        # The WideDeep story: sigmoid "probabilities" above 1, observed and thresholded.
        {
            "name": "wide_deep",
            "outputs": [
                {"name": "*", "on_violation": "observe", "threshold": 0.5, "labels": ["NO", "YES"]}
            ],
        },
        # A numerically broken model: NaN and -Inf cannot be clamped, so it is rejected.
        {"name": "broken", "outputs": [{"name": "*", "on_violation": "clamp"}]},
        # A softmax whose rows do not sum to 1.
        {
            "name": "softmax",
            "outputs": [
                {"name": "probs", "check_sum": True, "on_violation": "clamp", "argmax": True}
            ],
        },
        # A healthy model, for clean responses.
        {"name": "healthy", "outputs": [{"name": "*", "threshold": 0.5}]},
        # An upstream answer that is not a PredictResponse at all.
        {"name": "garbled", "outputs": [{"name": "*"}]},
    ]
}
MODELS = (
    "wide_deep",
    "broken",
    "softmax",
    "healthy",
    "garbled",
    SOFTMAX_201,
    SOFTMAX_201_UNTRAINED,
)
# TF Serving's REST answers (row format, one output each: its alias and signature shape)
# and the status the guard gives.
REST_PREDICTIONS = {
    "wide_deep": ("output_1", [-1, 1], '{"predictions": [[1.00285], [0.3]]}', 200),
    # NaN under clamp: rejected, as TF Serving answers INTERNAL (HTTP 500).
    "broken": ("y", [-1], '{"predictions": [0.5, NaN, -Infinity, 0.2]}', 500),
    "healthy": ("p", [-1], '{"predictions": [0.1, 0.9]}', 200),
}


def _free_port() -> int:
    # Prometheus cannot listen on port 0: take a free port from the kernel and release it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


GARBLED = b"\xff\xff\xff not a PredictResponse"


def _responses(seeds: dict[str, np.ndarray]) -> dict[str, predict_pb2.PredictResponse]:
    return {
        name: predict_response(name, {"probabilities": values}) for name, values in seeds.items()
    } | {
        "wide_deep": predict_response(
            "wide_deep", {"output_1": np.array([[1.00285], [1.001444], [0.000463], [0.3]])}
        ),
        "broken": predict_response(
            "broken", {"y": np.array([0.5, np.nan, -np.inf, 0.2], np.float32)}
        ),
        "softmax": predict_response(
            "softmax",
            {"probs": np.array([[0.2, 0.3, 0.1], [0.7, 0.2, 0.1]], np.float32)},
            encoding="content",
        ),
        "healthy": predict_response("healthy", {"p": np.array([0.1, 0.9], np.float32)}),
    }


class _Upstream(prediction_service_pb2_grpc.PredictionServiceServicer):
    """TF Serving stand-in: canned responses per model, with TF Serving's NOT_FOUND."""

    def __init__(self, seeds: dict[str, np.ndarray]) -> None:
        self.responses = _responses(seeds)

    async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802 - proto name
        name = request.model_spec.name
        if name not in self.responses:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})"
            )
        return self.responses[name]


class _GarbledPredict(grpc.GenericRpcHandler):
    """Answers Predict for model 'garbled' with bytes that are no PredictResponse.

    Registered before the official servicer; for every other model it serves the
    servicer's answer, serialized with the official message class.
    """

    def __init__(self, servicer: _Upstream) -> None:
        self._servicer = servicer

    def service(self, details: Any) -> Any:
        if details.method != "/tensorflow.serving.PredictionService/Predict":
            return None

        async def predict(request: predict_pb2.PredictRequest, context: Any) -> bytes:
            if request.model_spec.name == "garbled":
                return GARBLED
            response = await self._servicer.Predict(request, context)
            return bytes(response.SerializeToString())

        return grpc.unary_unary_rpc_method_handler(
            predict, request_deserializer=predict_pb2.PredictRequest.FromString
        )


@pytest.fixture(scope="module")
def seed_outputs() -> dict[str, np.ndarray]:
    return _seed_outputs()


@pytest.fixture
async def upstream(seed_outputs: dict[str, np.ndarray]) -> AsyncIterator[str]:
    """Start the fake TF Serving on a free loopback port; yield its address."""
    server = grpc.aio.server()
    servicer = _Upstream(seed_outputs)
    server.add_generic_rpc_handlers((_GarbledPredict(servicer),))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def rest_upstream() -> AsyncIterator[str]:
    """Start the fake TF Serving REST API on a free loopback port; yield its address."""
    fake = FakeRestUpstream()
    for model, (output, dims, body, _) in REST_PREDICTIONS.items():
        fake.predict(model, body)
        fake.metadata(model, {output: ("DT_FLOAT", dims)})
    await fake.start()
    yield fake.address
    await fake.stop()


@pytest.fixture
def guard_ports(
    upstream: str, rest_upstream: str, seed_outputs: dict[str, np.ndarray], tmp_path: Path
) -> Iterator[dict[str, int]]:
    """Start `guard serve` as a subprocess; yield its {"grpc", "rest", "metrics"} ports."""
    rule = _health_rule(seed_outputs[SOFTMAX_201])
    health = [{"name": name, "outputs": [rule]} for name in (SOFTMAX_201, SOFTMAX_201_UNTRAINED)]
    config = tmp_path / "guard.yaml"
    config.write_text(yaml.safe_dump({"models": GUARD_CONFIG["models"] + health}))
    rest = ("--rest-listen", "127.0.0.1:0", "--rest-upstream", rest_upstream)
    with start_guard(config, *rest, upstream=upstream, log_path=tmp_path / "guard.log") as guard:
        assert "rest" in guard.ports, guard.ports
        yield guard.ports


def _test_rules(tmp_path: Path) -> Path:
    """guard-rules.yaml with every `for:` shortened to 2s."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "guard-rules.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


@pytest.fixture
def prometheus_url(guard_ports: dict[str, int], tmp_path: Path) -> Iterator[str]:
    with _prometheus(guard_ports["metrics"], tmp_path) as url:
        yield url


@contextlib.contextmanager
def _prometheus(metrics_port: int, tmp_path: Path) -> Iterator[str]:
    """Debian's prometheus scraping ``metrics_port`` every second, with the rules."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: install Debian's 'prometheus' package (make apt)"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(_test_rules(tmp_path))],
        "scrape_configs": [
            {
                "job_name": "guard",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            }
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("prometheus did not become ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


async def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    data = await asyncio.to_thread(_get, url)
    assert data["resultType"] == "vector", data
    return list(data["result"])


async def _firing(base: str) -> set[str]:
    data = await asyncio.to_thread(_get, f"{base}/api/v1/alerts")
    return {a["labels"]["alertname"] for a in data["alerts"] if a["state"] == "firing"}


async def _send_traffic(stub: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    for model in MODELS:
        try:
            await stub.Predict(predict_request(model), timeout=10)
        except grpc.aio.AioRpcError as exc:
            # broken: rejected (NaN under clamp); garbled: undecodable.
            assert exc.code() == grpc.StatusCode.INTERNAL, (model, exc.details())
            assert model in ("broken", "garbled"), (model, exc.details())


async def _send_rest_traffic(session: aiohttp.ClientSession, base: str) -> None:
    for model, (_, _, _, status) in REST_PREDICTIONS.items():
        url = f"{base}/v1/models/{model}:predict"
        async with session.post(url, data=b'{"instances": [[1.0], [2.0]]}') as resp:
            body = await resp.read()
            assert resp.status == status, (model, body)
            assert resp.headers["x-guard-action"], model


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "guard-dashboard.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in SUBSTITUTIONS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, expr
            queries.append((f"{panel['title']} [{target['refId']}]", expr))
    return queries


# REST series by name, beyond the dashboard (whose queries span both protocols).
PROTOCOL_QUERIES = [
    ("REST requests", 'sum(rate(guard_requests_total{protocol="rest", method="Predict"}[20s]))'),
    ("REST overhead p99", 'guard:overhead_seconds:p99_5m{protocol="rest"}'),
    ("gRPC overhead p99", 'guard:overhead_seconds:p99_5m{protocol="grpc"}'),
]


# Served by the --workers supervisor alone: queried in the workers test.
SUPERVISOR_ONLY = ("guard_worker_restarts_total",)


def _supervisor_only(query: tuple[str, str]) -> bool:
    return any(name in query[1] for name in SUPERVISOR_ONLY)


def _has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


async def test_dashboard_queries_and_alerts_on_real_prometheus(
    guard_ports: dict[str, int], prometheus_url: str
) -> None:
    queries = [q for q in _dashboard_queries() if not _supervisor_only(q)] + PROTOCOL_QUERIES
    assert len(queries) >= 15
    rest_base = f"http://127.0.0.1:{guard_ports['rest']}"
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{guard_ports['grpc']}") as channel,
        aiohttp.ClientSession() as session,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        missing: dict[str, str] = dict(queries)
        firing: set[str] = set()
        # Bounded: at most 240 rounds of traffic (each >= one scrape apart in practice).
        for _ in range(240):
            await _send_traffic(stub)
            await _send_rest_traffic(session, rest_base)
            for title, expr in list(missing.items()):
                if _has_finite_value(await _query(prometheus_url, expr)):
                    del missing[title]
            firing = await _firing(prometheus_url)
            if not missing and VALUE_ALERTS <= firing:
                break
            await asyncio.sleep(0.5)
        assert not missing, f"dashboard queries without data: {missing}"
        assert VALUE_ALERTS <= firing, f"not firing: {VALUE_ALERTS - firing}"
        assert "GuardUpstreamDown" not in firing
        assert "GuardProtocolUnavailable" not in firing

    # The dashboard's protocol breakdown and the recording rules hold both protocols.
    for expr in (
        'sum by (protocol) (rate(guard_requests_total{model=~".*", protocol=~".*"}[20s]))',
        "guard:overhead_seconds:p99_5m",
        'guard:upstream_duration_seconds:p99_5m{method="Predict"}',
        "guard:request_errors:ratio_rate5m",
    ):
        result = await _query(prometheus_url, expr)
        assert {r["metric"]["protocol"] for r in result} == {"grpc", "rest"}, (expr, result)
    # REST rejections are counted under the gRPC code TF Serving maps HTTP 500 to.
    rejected = await _query(
        prometheus_url, 'guard_requests_total{protocol="rest", model="broken", code="INTERNAL"}'
    )
    assert rejected and float(rejected[0]["value"][1]) > 0, rejected

    # The alerts carry the model that caused them.
    alerts = await asyncio.to_thread(_get, f"{prometheus_url}/api/v1/alerts")
    by_name: dict[str, set[str]] = {}
    for alert in alerts["alerts"]:
        by_name.setdefault(alert["labels"]["alertname"], set()).add(
            alert["labels"].get("model", "")
        )
    assert "wide_deep" in by_name["GuardOutputOutOfRange"]
    assert by_name["GuardOutputNaN"] == {"broken"}
    assert "broken" in by_name["GuardRejectingResponses"]
    assert by_name["GuardSoftmaxBroken"] == {"softmax"}
    # The untrained seed model is caught; the trained one, with the same rules, is not.
    for name in HEALTH_ALERTS:
        assert by_name[name] == {SOFTMAX_201_UNTRAINED}, name


def test_promtool_check_metrics(guard_ports: dict[str, int], promtool: str) -> None:
    url = f"http://127.0.0.1:{guard_ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        exposition = resp.read()
    assert b"guard_upstream_up" in exposition
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b"", result


async def test_worker_restarts_on_real_prometheus(
    upstream: str, promtool: str, tmp_path: Path
) -> None:
    """`guard serve --workers 2` under Prometheus: a killed worker fires
    GuardWorkerRestarted, the dashboard's supervisor queries have data, and
    promtool accepts the supervisor's summed exposition."""
    config = tmp_path / "guard.yaml"
    config.write_text(yaml.safe_dump({"models": GUARD_CONFIG["models"]}))
    supervised = start_guard(
        config, "--workers", "2", upstream=upstream, log_path=tmp_path / "guard.log"
    )
    with supervised as guard, _prometheus(guard.ports["metrics"], tmp_path) as url:
        seen = 'count_over_time(guard_worker_restarts_total{reason="exited"}[1m]) >= 2'
        for _ in range(100):  # bounded: until two scrapes saw it at 0
            if await _query(url, seen):
                break
            await asyncio.sleep(0.2)
        os.kill(guard.ports["workers"][0], signal.SIGKILL)
        queries = dict(q for q in _dashboard_queries() if _supervisor_only(q))
        assert queries
        alerts: list[dict[str, Any]] = []
        for _ in range(150):  # bounded: 30 s
            data = await asyncio.to_thread(_get, f"{url}/api/v1/alerts")
            alerts = [
                a for a in data["alerts"] if a["labels"]["alertname"] == "GuardWorkerRestarted"
            ]
            if alerts and all([await _positive(url, expr) for expr in queries.values()]):
                break
            await asyncio.sleep(0.2)
        assert [(a["state"], a["labels"]["reason"]) for a in alerts] == [("firing", "exited")]
        for title, expr in queries.items():
            assert await _positive(url, expr), title
        with urllib.request.urlopen(f"http://127.0.0.1:{guard.ports['metrics']}/metrics") as resp:
            exposition = resp.read()
    assert b"guard_requests_total" in exposition and b"guard_worker_restarts_total" in exposition
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


async def _positive(url: str, expr: str) -> bool:
    return any(float(r["value"][1]) > 0 for r in await _query(url, expr))
