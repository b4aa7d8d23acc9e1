"""``guard serve --workers N``: one port, N processes, metrics that add up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tensorflow_serving.apis import prediction_service_pb2_grpc

from guard.control.config import Config
from guard.control.process import Child, keep_fresh
from guard.control.workers import _Heartbeats, _Pool
from tests.support.guard import sample_sum, scrape
from tests.support.protos import predict_request, predict_response
from tests.support.upstream import FakeUpstream

FRESH_S = 1.1  # the supervisor's sums are at most 1 s old
STALL_S = 3.0  # worker_stall_timeout_s here (10 s by default)
RULES = "models:\n  - name: m\n    outputs:\n      - {name: '*', on_violation: clamp}\n"


@contextlib.asynccontextmanager
async def _supervisor(*args: str, **kwargs: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    """``guard serve ARGS`` (ARGS with ``--port-file F``), once it wrote F or
    exited; killed at the end if it still runs."""
    port_file = Path(args[args.index("--port-file") + 1])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "guard", "serve", *args, **kwargs
    )
    try:
        for _ in range(600):  # bounded: TF-free processes start well within this
            if port_file.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_two_workers_share_a_port_and_one_metrics_endpoint(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.reply("m", predict_response("m", {"p": np.array([[1.5], [0.5]], np.float32)}))
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(RULES)
    port_file = tmp_path / "ports.json"
    async with _supervisor(
        "--config", str(cfg), "--workers", "2",
        "--upstream", upstream.address, "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--port-file", str(port_file),
    ) as proc:  # fmt: skip
        ports = json.loads(port_file.read_text())
        assert len(ports["workers"]) == 2
        sent = 0
        # Fresh connections, so SO_REUSEPORT spreads them over the workers.
        for _ in range(16):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as ch:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
                for _ in range(5):
                    await stub.Predict(predict_request("m"), timeout=10)
                    sent += 1
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in scrape(f"http://127.0.0.1:{ports['metrics']}/metrics")
            for s in f.samples
        }
        ok = (("code", "OK"), ("method", "Predict"), ("model", "m"), ("protocol", "grpc"))
        assert samples[("guard_requests_total", ok)] == sent
        clamped = (("action", "clamped"), ("model", "m"), ("signature", "serving_default"),
                   ("version", "1"))  # fmt: skip
        assert samples[("guard_responses_total", clamped)] == sent
        assert samples[("guard_upstream_up", ())] == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead worker waits to be reaped by init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


async def test_workers_die_with_a_killed_supervisor(upstream: FakeUpstream, tmp_path: Path) -> None:
    port_file = tmp_path / "ports.json"
    async with _supervisor(
        "--workers", "2",
        "--upstream", upstream.address, "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--port-file", str(port_file),
    ) as proc:  # fmt: skip
        workers = json.loads(port_file.read_text())["workers"]
        proc.kill()  # SIGKILL: the supervisor gets no chance to forward anything
        await proc.wait()
        for _ in range(100):  # bounded: 10 s
            alive = [pid for pid in workers if _running(pid)]
            if not alive:
                break
            await asyncio.sleep(0.1)
        assert not alive, f"workers {alive} outlived their supervisor"


def _children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


async def _predict_fresh(port: int, n: int) -> None:
    """``n`` Predicts on fresh connections, which reach either worker."""
    for _ in range(n):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            await stub.Predict(predict_request("m"), timeout=10)


async def test_a_worker_that_dies_is_replaced(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.reply("m", predict_response("m", {"p": np.array([[0.5]], np.float32)}))
    port_file = tmp_path / "ports.json"
    workdirs = tmp_path / "tmp"  # where the workers' port files go
    workdirs.mkdir()
    async with _supervisor(
        "--workers", "2",
        "--upstream", upstream.address, "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--port-file", str(port_file),
        env={**os.environ, "TMPDIR": str(workdirs)},
    ) as proc:  # fmt: skip
        ports = json.loads(port_file.read_text())
        metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        await _predict_fresh(ports["grpc"], 8)
        assert sample_sum(metrics_url, "guard_requests_total", code="OK") == 8
        dead = ports["workers"][0]
        os.kill(dead, signal.SIGKILL)
        for _ in range(300):  # bounded: 30 s for the supervisor to start another
            alive = {pid for pid in _children(proc.pid) if _running(pid)}
            if len(alive) == 2 and dead not in alive:
                break
            await asyncio.sleep(0.1)
        assert len(alive) == 2 and dead not in alive, alive
        assert proc.returncode is None
        await asyncio.sleep(FRESH_S)  # scrapes within FRESH_S share one gathering
        # The dead worker's count stays in the sum: a drop would be a counter reset.
        assert sample_sum(metrics_url, "guard_requests_total", code="OK") == 8
        await _predict_fresh(ports["grpc"], 8)
        await asyncio.sleep(FRESH_S)
        assert sample_sum(metrics_url, "guard_requests_total", code="OK") == 16
        # The port file names the workers running (once the new one announced
        # its ports); the dead one's directory is gone.
        for _ in range(100):  # bounded
            if sorted(json.loads(port_file.read_text())["workers"]) == sorted(alive):
                break
            await asyncio.sleep(0.1)
        assert sorted(json.loads(port_file.read_text())["workers"]) == sorted(alive)
        assert len(list(workdirs.glob("guard-child-*"))) == 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert list(workdirs.glob("guard-child-*")) == []


async def test_workers_share_the_rest_port_too(tmp_path: Path) -> None:
    import aiohttp

    from tests.support.rest_upstream import FakeRestUpstream, Reply

    fake = FakeRestUpstream()
    await fake.start()
    fake.reply("GET", "/v1/models/m", Reply(body=b'{"ok": 1}'))
    cfg = tmp_path / "guard.yaml"
    cfg.write_text("models: []\n")
    port_file = tmp_path / "ports.json"
    try:
        async with _supervisor(
            "--config", str(cfg), "--workers", "2",
            "--upstream", "127.0.0.1:9", "--listen", "127.0.0.1:0", "--rest-listen", "127.0.0.1:0",
            "--rest-upstream", fake.address, "--metrics-listen", "127.0.0.1:0",
            "--port-file", str(port_file),
        ) as proc:  # fmt: skip
            ports = json.loads(port_file.read_text())
            for _ in range(12):  # fresh connections: SO_REUSEPORT spreads them
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"http://127.0.0.1:{ports['rest']}/v1/models/m") as r:
                        assert (r.status, await r.read()) == (200, b'{"ok": 1}')
            served = {
                s.labels["protocol"]: s.value
                for f in scrape(f"http://127.0.0.1:{ports['metrics']}/metrics")
                for s in f.samples
                if s.name == "guard_requests_total"
            }
            assert served == {"rest": 12}
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        await fake.stop()


_COUNT_SIGNALS = """
import signal, sys, time
def note(signum, _frame):
    with open(sys.argv[1], "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, note)
open(sys.argv[1], "a").close()
while True:
    time.sleep(0.05)
"""


def test_the_supervisor_tells_each_worker_to_stop_once(tmp_path: Path) -> None:
    """A worker whose drain has ended tears down without its signal
    handlers: a second SIGTERM then kills it (-15), and the supervisor
    exited 241. That happened when the test's SIGTERM came while a
    replacement was starting: the signal went to the running workers, and
    again to all once the replacement was up. Reloads (SIGHUP) still go to
    every worker each time."""
    pool = _Pool([], stall_s=Config().worker_stall_timeout_s)
    for n in range(2):
        log = tmp_path / f"w{n}.log"
        process = subprocess.Popen([sys.executable, "-c", _COUNT_SIGNALS, str(log)])
        pool.children.append(Child(process, {}, None, tmp_path))
        for _ in range(200):  # bounded: until its handlers are in place
            if log.exists():
                break
            time.sleep(0.025)
    try:
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            pool.signal(signum)
            time.sleep(0.2)  # pending signals would be delivered by number, not in order
        for n in range(2):
            assert (tmp_path / f"w{n}.log").read_text().split() == ["SIGHUP", "SIGTERM", "SIGHUP"]
    finally:
        for child in pool.children:
            child.process.kill()
            child.process.wait()


async def test_a_stopped_worker_is_killed_and_replaced(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """SIGSTOP: the process exists, so poll() says nothing, and the kernel keeps
    handing it a share of new connections that would wait for good. Its
    event loop stops touching its port file; after worker_stall_timeout_s
    the supervisor kills it, starts another, and counts it."""
    upstream.reply("m", predict_response("m", {"p": np.array([[0.5]], np.float32)}))
    port_file = tmp_path / "ports.json"
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(f"worker_stall_timeout_s: {STALL_S}\n{RULES}")
    async with _supervisor(
        "--config", str(cfg), "--workers", "2",
        "--upstream", upstream.address, "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--port-file", str(port_file),
    ) as proc:  # fmt: skip
        ports = json.loads(port_file.read_text())
        metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        stopped = ports["workers"][0]
        os.kill(stopped, signal.SIGSTOP)
        began = time.monotonic()
        for _ in range(400):  # bounded: 40 s
            alive = {pid for pid in _children(proc.pid) if _running(pid)}
            if len(alive) == 2 and stopped not in alive:
                break
            await asyncio.sleep(0.1)
        took = time.monotonic() - began
        assert len(alive) == 2 and stopped not in alive, alive
        assert STALL_S <= took < STALL_S + 8, took
        # Every fresh connection reaches a worker that answers.
        await asyncio.wait_for(_predict_fresh(ports["grpc"], 16), 30)
        assert sample_sum(metrics_url, "guard_worker_restarts_total", reason="stalled") == 1
        assert sample_sum(metrics_url, "guard_worker_restarts_total", reason="exited") == 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


def test_heartbeats_see_a_silent_worker_not_a_silent_supervisor(tmp_path: Path) -> None:
    """A worker is stalled once its port file has not changed for stall_s of
    the supervisor's watching; a gap in the supervisor's own polls (it was
    stopped itself) starts the watch again instead of killing everyone."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child = Child(process, {}, None, tmp_path)
    child.port_file.write_text("{}")
    beats = _Heartbeats(stall_s=0.5)
    try:
        assert beats.stalled([child]) == []
        for _ in range(4):  # beating: never stalled
            time.sleep(0.2)
            os.utime(child.port_file)
            assert beats.stalled([child]) == []
        for _ in range(2):  # silent for 0.4 s of polls: not yet
            time.sleep(0.2)
            assert beats.stalled([child]) == []
        time.sleep(0.2)
        [(found, silent_s)] = beats.stalled([child])
        assert found is child and silent_s > 0.5
        time.sleep(2.5)  # the supervisor did not poll for longer than it can see
        assert beats.stalled([child]) == []
        time.sleep(0.2)
        assert beats.stalled([child]) == []
        time.sleep(0.4)
        assert [c for c, _ in beats.stalled([child])] == [child]
    finally:
        process.kill()
        process.wait()


async def test_a_removed_port_file_is_written_again(tmp_path: Path) -> None:
    """A temporary-file cleaner that removes a worker's port file must not
    make the supervisor take the worker for stalled: the heartbeat writes it
    again, with the same ports."""
    path = tmp_path / "run" / "ports.json"
    path.parent.mkdir()
    ports = {"grpc": 1, "metrics": 2}
    beating = asyncio.create_task(keep_fresh(path, ports, interval_s=0.05))
    try:
        path.write_text("{}")
        before = path.stat().st_mtime_ns
        await asyncio.sleep(0.2)
        assert path.stat().st_mtime_ns > before
        path.unlink()
        await asyncio.sleep(0.2)
        assert json.loads(path.read_text()) == ports
        shutil.rmtree(tmp_path / "run")  # a cleaner that takes the whole directory
        await asyncio.sleep(0.2)
        assert json.loads(path.read_text()) == ports
    finally:
        beating.cancel()


async def test_a_replacement_that_cannot_start_leaves_the_others_serving(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The config on disk broken since the start (the workers kept their
    rules, as a failed reload does), then a worker dies: its replacement
    exits 2. The supervisor stopped everything; now the other worker serves
    and the replacement is tried again, with backoff, until the file is
    fixed."""
    upstream.reply("m", predict_response("m", {"p": np.array([[0.5]], np.float32)}))
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(RULES)
    port_file = tmp_path / "ports.json"
    async with _supervisor(
        "--config", str(cfg), "--workers", "2",
        "--upstream", upstream.address, "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--port-file", str(port_file),
        stderr=asyncio.subprocess.PIPE,
    ) as proc:  # fmt: skip
        ports = json.loads(port_file.read_text())
        cfg.write_text(RULES.replace("on_violation", "on_violaton"))
        os.kill(ports["workers"][0], signal.SIGKILL)
        await asyncio.sleep(4)  # the replacement fails (exit 2), and again after 1 s
        assert proc.returncode is None
        alive = {pid for pid in _children(proc.pid) if _running(pid)}
        assert ports["workers"][1] in alive and ports["workers"][0] not in alive  # (and a retry)
        await asyncio.wait_for(_predict_fresh(ports["grpc"], 8), 30)
        cfg.write_text(RULES)
        for _ in range(200):  # bounded: the next try comes within 4 s
            if len(json.loads(port_file.read_text())["workers"]) == 2:
                break
            await asyncio.sleep(0.1)
        started = json.loads(port_file.read_text())["workers"]  # those that started
        assert len(started) == 2 and ports["workers"][1] in started
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "a replacement worker failed to start; 1 of 2 serving, trying again" in log


# In a process started with `--workers 1` (a worker), sitecustomize waits
# while the file SLOW_START names exists: a start as slow as one that loads a
# large config, but stuck for as long as the test wants.
_SLOW_WORKERS = """
import os, sys, time
argv = sys.argv
if "--workers" in argv and argv[argv.index("--workers") + 1] == "1":
    while os.path.exists(os.environ["SLOW_START"]):
        time.sleep(0.05)
"""


@contextlib.contextmanager
def _slow_supervisor(tmp_path: Path, slow: bool) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``guard serve --workers 2`` whose workers start only while the returned
    file does not exist (created already with ``slow``); whatever is left of
    its process group is killed at the end."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_SLOW_WORKERS)
    flag = tmp_path / "slow"
    if slow:
        flag.touch()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "SLOW_START": str(flag)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "guard", "serve", "--workers", "2", "--upstream", "127.0.0.1:9",
         "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--port-file", str(tmp_path / "ports.json")],
        env=env, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc, flag
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _new_child(pid: int, known: set[int]) -> int:
    """A child of ``pid`` not in ``known``, once there is one (bounded: 30 s)."""
    for _ in range(600):
        new = {p for p in _children(pid) if _running(p)} - known
        if new:
            return new.pop()
        time.sleep(0.05)
    raise AssertionError(f"no new child of {pid}")


def _stops_at_once(proc: subprocess.Popen[bytes], pids: set[int]) -> None:
    """SIGTERM ``proc``: it exits 0 within 5 s, and none of ``pids`` runs on."""
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - began < 5, time.monotonic() - began
    assert not [pid for pid in pids if _running(pid)]


def test_sigterm_while_the_workers_start_stops_at_once(tmp_path: Path) -> None:
    """The supervisor went on waiting for a starting worker's port file (up
    to 60 s), started the next, and only then drained."""
    with _slow_supervisor(tmp_path, slow=True) as (proc, _):
        starting = _new_child(proc.pid, set())
        time.sleep(0.3)  # still starting
        _stops_at_once(proc, {starting})


def test_sigterm_while_a_replacement_starts_stops_at_once(tmp_path: Path) -> None:
    with _slow_supervisor(tmp_path, slow=False) as (proc, flag):
        port_file = tmp_path / "ports.json"
        for _ in range(600):  # bounded: 30 s
            if port_file.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        workers = set(json.loads(port_file.read_text())["workers"])
        flag.touch()
        os.kill(min(workers), signal.SIGKILL)
        replacement = _new_child(proc.pid, workers)
        time.sleep(0.3)
        _stops_at_once(proc, workers | {replacement})
