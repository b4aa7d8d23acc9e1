"""The benchmark harness's pieces, each against real servers on port 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from bench import load, nginx, payloads, upstream
from bench.passthrough import start_async
from bench.paths import Setup, start_nginx

ROOT = Path(__file__).resolve().parents[2]
MODEL = payloads.CannedModel(batch=4, classes=7)

H2LOAD_SAMPLE = """\
finished in 1.52s, 1315.80 req/s, 8.24MB/s
requests: 2000 total, 2000 started, 2000 done, 1990 succeeded, 10 failed, 3 errored, 1 timeout
status codes: 1990 2xx, 0 3xx, 0 4xx, 10 5xx
"""


def test_parse_h2load_counts_every_kind_of_error() -> None:
    tp = load.parse_h2load(H2LOAD_SAMPLE, concurrency=16)
    assert tp.rps == pytest.approx(1315.80)
    assert tp.seconds == pytest.approx(1.52)
    assert (tp.succeeded, tp.failed, tp.errored, tp.timeout) == (1990, 10, 3, 1)
    assert tp.errors == 10 + 3 + 1 + 10


def test_parse_h2load_reads_milliseconds() -> None:
    tp = load.parse_h2load(H2LOAD_SAMPLE.replace("1.52s", "15.2ms"), concurrency=16)
    assert tp.seconds == pytest.approx(0.0152)


def test_parse_h2load_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="cannot parse"):
        load.parse_h2load("connection refused", concurrency=1)


def test_proc_accounting_reads_this_process() -> None:
    pid = os.getpid()
    before = load.cpu_seconds(pid)
    after = before
    for _ in range(200):  # bounded: burn CPU until at least one clock tick is accounted
        sum(i * i for i in range(20_000))
        after = load.cpu_seconds(pid)
        if after > before:
            break
    assert after > before
    assert load.rss_mb(pid) > 10
    assert load.status_kb(pid, "VmHWM") >= load.status_kb(pid, "VmRSS")


def test_grpc_frame_prefixes_length() -> None:
    framed = payloads.grpc_frame(b"abc")
    assert framed == b"\x00\x00\x00\x00\x03abc"


def test_canned_response_is_an_official_predict_response() -> None:
    response = predict_pb2.PredictResponse.FromString(payloads.predict_response(MODEL))
    tensor = response.outputs[MODEL.output_name]
    assert response.model_spec.name == MODEL.name
    assert response.model_spec.version.value == MODEL.version
    assert response.model_spec.signature_name == MODEL.signature
    assert [d.size for d in tensor.tensor_shape.dim] == [4, 7]
    assert len(tensor.float_val) == 28 and not tensor.tensor_content
    rows = [sum(tensor.float_val[i * 7 : (i + 1) * 7]) for i in range(4)]
    assert rows == pytest.approx([1.0] * 4, abs=1e-5)


async def test_passthrough_forwards_bytes_and_errors() -> None:
    server, port = await upstream.start(MODEL, "127.0.0.1:0")
    proxy, channel, proxy_port = await start_async(f"127.0.0.1:{port}", "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}") as client:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(client)
            request = predict_pb2.PredictRequest.FromString(payloads.predict_request(MODEL))
            reply = await stub.Predict(request, timeout=10, metadata=(("x-test", "1"),))
            assert reply.SerializeToString() == payloads.predict_response(MODEL)

            status = await model_service_pb2_grpc.ModelServiceStub(client).GetModelStatus(
                get_model_status_pb2.GetModelStatusRequest(), timeout=10
            )
            assert status.model_version_status[0].state == (
                get_model_status_pb2.ModelVersionStatus.AVAILABLE
            )

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Classify(classification_pb2.ClassificationRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "canned upstream" in (err.value.details() or "")
    finally:
        await proxy.stop(0)
        await channel.close()
        await server.stop(0)


@pytest.fixture
def upstream_process(tmp_path: Path) -> Any:
    """The canned upstream as its own process, as bench.run starts it."""
    port_file = tmp_path / "up.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.upstream", "--port-file", str(port_file),
         "--batch", "4", "--classes", "7"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import time

        def target() -> str | None:
            return (
                f"127.0.0.1:{json.loads(port_file.read_text())['grpc']}"
                if port_file.exists()
                else None
            )

        load.wait_serving(target, proc, time.perf_counter(), timeout_s=60)
        yield target()
    finally:
        proc.terminate()
        proc.wait(10)


def test_nginx_hop_carries_h2load_and_grpc(upstream_process: str, tmp_path: Path) -> None:
    conf = nginx.write_config(tmp_path / "ngx", upstream_process, 1)
    assert "keepalive_requests 10000000" in conf.read_text()
    hop = start_nginx(Setup(upstream_process, tmp_path), "t")
    try:
        assert hop.startup_s is not None and hop.pid is not None
        request = payloads.predict_request(MODEL)
        data = tmp_path / "req.grpc"
        data.write_bytes(payloads.grpc_frame(request))
        tp = load.throughput(hop.port, data, requests=60, concurrency=16, proxy_pid=hop.pid)
        assert (tp.succeeded, tp.errors) == (60, 0)
        assert tp.proxy_cpu_s is not None and tp.proxy_rss_max_mb
        assert load.grpc_status_check(hop.target, request, calls=8, concurrency=4) == {"OK": 8}
        lat = load.latency_c1(hop.target, request, calls=10, warmup=2)
        assert lat.calls == 10 and lat.errors == 0 and lat.p99_ms >= lat.p50_ms
    finally:
        hop.stop()
    assert hop.proc is not None and hop.proc.poll() is not None


def test_bench_run_quick_end_to_end(tmp_path: Path) -> None:
    """The whole harness at tiny settings: every path runs and the report is written."""
    out, doc = tmp_path / "r.json", tmp_path / "b.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--no-micro", "--no-backend",
         "--no-rest", "--no-cases", "--out", str(out), "--doc", str(doc)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    (round_,) = results["rounds"]
    for name in ("direct", "nginx", "passthrough", "guard", "guard-w2"):
        assert "error" not in round_[name], round_[name]
        assert round_[name]["c16"]["errors"] == 0
        assert round_[name]["grpc_codes"] == {"OK": 16}
    derived = set(round_["guard"]["outputs"]) - set(round_["direct"]["outputs"])
    assert {"probabilities_class", "probabilities_top_k_label"} <= derived
    assert round_["passthrough"]["outputs"] == round_["direct"]["outputs"]
    assert "| (d) guard, demo rules |" in doc.read_text()


def test_the_written_part_of_the_benchmarks_doc_is_findings_md() -> None:
    """docs/benchmarks.md is rendered by bench.report, which appends
    bench/findings.md as it is: a section written into the doc itself was
    lost at the next ``make bench`` (2026-12-04)."""
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    findings = (ROOT / "bench" / "findings.md").read_text().rstrip()
    assert findings in doc, "write prose in bench/findings.md, then re-render the doc"
    written = doc[doc.index(findings) + len(findings) :]
    assert written.lstrip().startswith("## Guard config used") or not written.strip()


def test_percall_times_the_handler_against_its_fakes() -> None:
    """bench/percall.py drives CallHandler with fake gRPC objects; each
    change to what the handler asks of its context or server broke it
    unnoticed (peer(), arrivals, a second read for the end of the stream)."""
    proc = subprocess.run(
        [sys.executable, "bench/percall.py", "--calls", "50"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figure, unit = proc.stdout.split()[:2]
    assert float(figure) > 0 and unit == "µs"
