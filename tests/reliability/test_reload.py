"""Hot config reload: SIGHUP, file changes (the config's, its labels files')
and ConfigMap symlink swaps, under traffic, good and bad (issue 6, section 3)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.support.guard import GuardProcess, guard_process, scrape, write_atomic
from tests.support.protos import predict_request, predict_response
from tests.support.upstream import FakeUpstream, start_upstream

VALUES = np.array([[0.7], [1.2]], dtype=np.float32)
RULE_A = "{name: y, on_violation: clamp, threshold: 0.5, labels: [NO, YES]}"
RULE_B = "{name: y, on_violation: observe, threshold: 0.9, labels: [LOW, HIGH]}"
RULE_BAD = "{name: y, on_violation: clampp, threshold: 0.9, top_k: -1}"  # two problems
F32 = np.float32
# What each rule set makes of VALUES, in full: values, classes, labels, action.
EXPECTED = {
    "A": ([F32(0.7), F32(1.0)], [1, 1], [b"YES", b"YES"], "clamped"),
    "B": ([F32(0.7), F32(1.2)], [0, 1], [b"LOW", b"HIGH"], "observed"),
}


def _config(upstream: str, rule: str) -> str:
    return f"upstream: {upstream}\nmodels:\n  - name: m\n    outputs: [{rule}]\n"


def _rule_set(resp: predict_pb2.PredictResponse, trailers: dict[str, str]) -> str:
    """Which rule set produced this response; fails on anything else, such as a mix."""
    seen = (
        [F32(v) for v in resp.outputs["y"].float_val],
        list(resp.outputs["y_class"].int64_val),
        list(resp.outputs["y_label"].string_val),
        trailers.get("x-guard-action"),
    )
    for name, expected in EXPECTED.items():
        if seen == expected:
            return name
    raise AssertionError(f"response matches neither rule set A nor B: {seen}")


async def _guarded(stub: Any) -> str:
    call = stub.Predict(predict_request("m"), timeout=10)
    resp = await call
    return _rule_set(resp, dict(tuple(await call.trailing_metadata())))


def _reloads(guard: GuardProcess) -> dict[str, float]:
    out = {"success": 0.0, "failure": 0.0}
    for family in scrape(guard.metrics_url):
        for s in family.samples:
            if s.name == "guard_config_reloads_total":
                out[s.labels["result"]] = s.value
    return out


async def _wait_reloads(guard: GuardProcess, result: str, at_least: float) -> None:
    for _ in range(100):  # bounded: the file watcher polls once a second
        if _reloads(guard)[result] >= at_least:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"reloads {_reloads(guard)}, expected {result} >= {at_least}")


class ConfigMapDir:
    """The layout the kubelet gives a mounted ConfigMap, and its atomic update."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()

    def publish(self, text: str) -> None:
        self.publish_files({"guard.yaml": text})

    def publish_files(self, files: Mapping[str, str]) -> None:
        """A new generation of the map: its files' names and texts."""
        self.generation += 1
        stamp = f"..2026_01_01_00_00_{self.generation:02d}.{os.getpid()}"
        (self.root / stamp).mkdir()
        for name, content in files.items():
            (self.root / stamp / name).write_text(content)
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(f"..data/{name}")
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp)
        os.replace(tmp, self.root / "..data")  # the one atomic step
        if old is not None:
            for f in (self.root / old).iterdir():
                f.unlink()
            (self.root / old).rmdir()

    @property
    def path(self) -> Path:
        return self.root / "guard.yaml"


async def test_sighup_reloads_and_a_bad_config_keeps_the_old_rules(tmp_path: Path) -> None:
    up = await start_upstream(FakeUpstream())
    up.reply("m", predict_response("m", {"y": VALUES}))
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(_config(up.address, RULE_A))
    try:
        async with guard_process(cfg, tmp_path) as guard:
            async with grpc.aio.insecure_channel(guard.address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                assert await _guarded(stub) == "A"
                assert _reloads(guard) == {"success": 0, "failure": 0}
                write_atomic(cfg, _config(up.address, RULE_B))
                guard.signal(signal.SIGHUP)
                await _wait_reloads(guard, "success", 1)
                assert await _guarded(stub) == "B"
                write_atomic(cfg, _config(up.address, RULE_BAD))
                guard.signal(signal.SIGHUP)
                await _wait_reloads(guard, "failure", 1)
                assert await _guarded(stub) == "B"  # the old rules stay
                assert _reloads(guard)["success"] <= 2  # SIGHUP, perhaps also the watcher
                # A reload into no rules at all works, and says so.
                write_atomic(cfg, f"upstream: {up.address}\nmodels: []\n")
                guard.signal(signal.SIGHUP)
                for _ in range(100):  # bounded: until the reload has taken effect
                    reply = await stub.Predict(predict_request("m"), timeout=10)
                    if "y_class" not in reply.outputs:
                        break
                    await asyncio.sleep(0.05)
                assert "y_class" not in reply.outputs
                # The retired model's series went with it.
                models = {s.labels.get("model") for f in scrape(guard.metrics_url)
                          for s in f.samples}  # fmt: skip
                assert "m" not in models and "__other__" in models, models
        log = guard.log()
        assert "config reload failed, keeping the previous rules" in log
        assert "field 'on_violation': 'clampp' is not allowed" in log
        # Both problems on the one line (a red-team pass: the second had a line of its own).
        (failed,) = [line for line in log.splitlines() if "config reload failed" in line]
        assert "'clampp' is not allowed" in failed and "field 'top_k'" in failed, failed
        assert "the new config has no model rules" in log
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_configmap_symlink_swap_is_picked_up_by_the_watcher(tmp_path: Path) -> None:
    up = await start_upstream(FakeUpstream())
    up.reply("m", predict_response("m", {"y": VALUES}))
    cm = ConfigMapDir(tmp_path / "configmap")
    cm.publish(_config(up.address, RULE_A))
    try:
        async with guard_process(cm.path, tmp_path) as guard:
            async with grpc.aio.insecure_channel(guard.address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                assert await _guarded(stub) == "A"
                cm.publish(_config(up.address, RULE_B))
                await _wait_reloads(guard, "success", 1)
                assert await _guarded(stub) == "B"
                cm.publish(_config(up.address, RULE_BAD))
                await _wait_reloads(guard, "failure", 1)
                assert await _guarded(stub) == "B"
                # Exactly one reload per change: the watcher does not repeat itself.
                await asyncio.sleep(1.5)
                assert _reloads(guard) == {"success": 1, "failure": 1}
    finally:
        assert up.server is not None
        await up.server.stop(0)


RULE_LABELS_FILE = "{name: y, on_violation: observe, threshold: 0.9, labels_file: labels.txt}"


async def _labels(stub: Any) -> list[bytes]:
    reply = await stub.Predict(predict_request("m"), timeout=10)
    return list(reply.outputs["y_label"].string_val)


async def test_a_labels_file_replaced_alone_reloads_the_rules(tmp_path: Path) -> None:
    """Found: the watcher followed the config file only; a new labels file was
    served only after some unrelated reload."""
    up = await start_upstream(FakeUpstream())
    up.reply("m", predict_response("m", {"y": VALUES}))
    cfg, labels = tmp_path / "guard.yaml", tmp_path / "labels.txt"
    cfg.write_text(_config(up.address, RULE_LABELS_FILE))
    labels.write_text("LOW\nHIGH\n")
    try:
        async with guard_process(cfg, tmp_path) as guard:
            async with grpc.aio.insecure_channel(guard.address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                assert await _labels(stub) == [b"LOW", b"HIGH"]
                write_atomic(labels, "NO\nYES\n")
                await _wait_reloads(guard, "success", 1)
                assert await _labels(stub) == [b"NO", b"YES"]
                write_atomic(labels, "NO\n\nYES\n")
                await _wait_reloads(guard, "failure", 1)
                assert await _labels(stub) == [b"NO", b"YES"]  # the old rules stay
                await asyncio.sleep(1.5)
                assert _reloads(guard) == {"success": 1, "failure": 1}
        assert f"'{labels}' line 2 is empty" in guard.log()
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_a_labels_configmap_swap_reloads_the_rules(tmp_path: Path) -> None:
    """The labels in a ConfigMap of their own, mounted apart from the config's:
    its ``..data`` swap changes nothing the config's mount holds. (In one
    ConfigMap, every swap also gives the config file a new real path.)"""
    up = await start_upstream(FakeUpstream())
    up.reply("m", predict_response("m", {"y": VALUES}))
    cm, labels_cm = ConfigMapDir(tmp_path / "config"), ConfigMapDir(tmp_path / "labels")
    labels_cm.publish_files({"labels.txt": "LOW\nHIGH\n"})
    cm.publish(_config(up.address, RULE_LABELS_FILE.replace("labels.txt", "../labels/labels.txt")))
    try:
        async with guard_process(cm.path, tmp_path) as guard:
            async with grpc.aio.insecure_channel(guard.address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                assert await _labels(stub) == [b"LOW", b"HIGH"]
                labels_cm.publish_files({"labels.txt": "NO\nYES\n"})
                await _wait_reloads(guard, "success", 1)
                assert await _labels(stub) == [b"NO", b"YES"]
                await asyncio.sleep(1.5)
                assert _reloads(guard) == {"success": 1, "failure": 0}
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_traffic_through_reloads_sees_exactly_one_rule_set_per_response(
    tmp_path: Path,
) -> None:
    up = await start_upstream(FakeUpstream())
    up.reply("m", predict_response("m", {"y": VALUES}))
    cm = ConfigMapDir(tmp_path / "configmap")
    cm.publish(_config(up.address, RULE_A))
    # (rule, how): SIGHUP after a swap, or the watcher alone.
    steps = [("B", "watch"), ("BAD", "hup"), ("A", "hup"), ("BAD", "watch"), ("B", "hup"),
             ("A", "watch"), ("BAD", "hup"), ("B", "watch")]  # fmt: skip
    rules = {"A": RULE_A, "B": RULE_B, "BAD": RULE_BAD}
    try:
        async with guard_process(cm.path, tmp_path) as guard:
            seen: Counter[str] = Counter()
            failures: list[str] = []
            stop = asyncio.Event()
            async with grpc.aio.insecure_channel(guard.address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

                async def traffic() -> None:
                    while not stop.is_set():
                        try:
                            seen[await _guarded(stub)] += 1
                        except (grpc.aio.AioRpcError, AssertionError) as exc:
                            failures.append(repr(exc))

                workers = [asyncio.create_task(traffic()) for _ in range(4)]
                current = "A"
                for rule, how in steps:
                    before = _reloads(guard)
                    cm.publish(_config(up.address, rules[rule]))
                    if how == "hup":
                        guard.signal(signal.SIGHUP)
                    result = "failure" if rule == "BAD" else "success"
                    await _wait_reloads(guard, result, before[result] + 1)
                    current = current if rule == "BAD" else rule
                    for _ in range(100):  # bounded: until traffic shows the new set
                        if await _guarded(stub) == current:
                            break
                    assert await _guarded(stub) == current
                stop.set()
                await asyncio.wait_for(asyncio.gather(*workers), 30)
        assert failures == []
        assert seen["A"] > 0 and seen["B"] > 0 and sum(seen.values()) > 50, seen
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_an_unreadable_config_counts_a_failure_and_the_watcher_survives(
    tmp_path: Path,
) -> None:
    up = await start_upstream(FakeUpstream())
    up.reply("m", predict_response("m", {"y": VALUES}))
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(_config(up.address, RULE_A))
    try:
        async with guard_process(cfg, tmp_path) as guard:
            async with grpc.aio.insecure_channel(guard.address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                assert await _guarded(stub) == "A"
                tmp = tmp_path / "binary"
                tmp.write_bytes(b"models: \xff\xfe\x00 not utf-8\n")
                os.replace(tmp, cfg)
                await _wait_reloads(guard, "failure", 1)
                assert await _guarded(stub) == "A"
                write_atomic(cfg, _config(up.address, RULE_B))  # the watcher still runs
                await _wait_reloads(guard, "success", 1)
                assert await _guarded(stub) == "B"
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_a_reload_into_a_fifo_labels_file_fails_and_the_guard_goes_on(
    tmp_path: Path,
) -> None:
    """Found: opening a FIFO with no writer never returned. The reload's thread
    blocked holding the reload lock, no later reload applied, and SIGTERM could
    not end the process (the event loop waits for its threads)."""
    up = await start_upstream(FakeUpstream())
    up.reply("m", predict_response("m", {"y": VALUES}))
    fifo = tmp_path / "labels.fifo"
    os.mkfifo(fifo)
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(_config(up.address, RULE_A))
    rule_fifo = f"{{name: y, on_violation: observe, threshold: 0.9, labels_file: '{fifo}'}}"
    try:
        async with guard_process(cfg, tmp_path) as guard:
            async with grpc.aio.insecure_channel(guard.address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                assert await _guarded(stub) == "A"
                write_atomic(cfg, _config(up.address, rule_fifo))
                guard.signal(signal.SIGHUP)
                await _wait_reloads(guard, "failure", 1)
                assert await _guarded(stub) == "A"
                write_atomic(cfg, _config(up.address, RULE_B))
                guard.signal(signal.SIGHUP)
                await _wait_reloads(guard, "success", 1)
                assert await _guarded(stub) == "B"
            guard.signal(signal.SIGTERM)
            assert await guard.wait(20) == 0
        assert f"'{fifo}' is a FIFO (named pipe), not a regular file" in guard.log()
    finally:
        try:  # a guard still blocked in open() (a regression) gets EOF
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        assert up.server is not None
        await up.server.stop(0)
