"""Transport security: TLS/mTLS on both sides, certificate reload, and a
metrics port bound to loopback (issue 6, section 5)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.conftest import GuardFactory
from tests.reliability._certs import CA, Issued, await_serial, presented_serial
from tests.support.guard import guard_process
from tests.support.looplag import loop_lag
from tests.support.protos import predict_request, predict_response
from tests.support.upstream import FakeUpstream, start_upstream

VALUES = np.array([[0.2], [1.3]], dtype=np.float32)
RULES = {"models": [{"name": "m", "outputs": [{"name": "*", "on_violation": "clamp"}]}]}


def _upstream_credentials(ca: CA, *, mutual: bool = False) -> grpc.ServerCredentials:
    """A TLS upstream's credentials: a ``tf-serving`` certificate from ``ca``;
    ``mutual`` demands client certificates signed by ``ca`` too."""
    server = ca.issue("tf-serving", server=True)
    return grpc.ssl_server_credentials(
        [(server.key_pem, server.cert_pem)],
        root_certificates=ca.pem if mutual else None,
        require_client_auth=mutual,
    )


@pytest.fixture
async def plain_upstream() -> AsyncIterator[FakeUpstream]:
    up = await start_upstream(FakeUpstream())
    up.reply("m", predict_response("m", {"y": VALUES}))
    yield up
    assert up.server is not None
    await up.server.stop(0)


async def _predict(address: str, creds: grpc.ChannelCredentials | None) -> str:
    """One Predict over a fresh channel; the status code name."""
    channel = (
        grpc.aio.secure_channel(address, creds)
        if creds is not None
        else grpc.aio.insecure_channel(address)
    )
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        resp = await stub.Predict(predict_request("m"), timeout=5)
        assert list(resp.outputs["y"].float_val) == [pytest.approx(0.2), 1.0]  # guarded
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    finally:
        await channel.close()


async def test_tls_listening_side(
    make_guard: GuardFactory, plain_upstream: FakeUpstream, tmp_path: Path
) -> None:
    ca = CA()
    cert, key = ca.issue("guard", server=True).write(tmp_path, "server")
    guard = await make_guard(
        RULES, upstream=plain_upstream.address, tls={"cert_file": str(cert), "key_file": str(key)}
    )
    assert await _predict(guard.address, grpc.ssl_channel_credentials(ca.pem)) == "OK"
    assert await _predict(guard.address, None) == "UNAVAILABLE"  # plaintext is refused
    other = CA("someone else")
    assert await _predict(guard.address, grpc.ssl_channel_credentials(other.pem)) == "UNAVAILABLE"


async def test_mtls_listening_side_requires_a_client_certificate(
    make_guard: GuardFactory, plain_upstream: FakeUpstream, tmp_path: Path
) -> None:
    ca = CA()
    cert, key = ca.issue("guard", server=True).write(tmp_path, "server")
    tls = {"cert_file": str(cert), "key_file": str(key), "ca_file": str(ca.write(tmp_path))}
    guard = await make_guard(RULES, upstream=plain_upstream.address, tls=tls)
    client = ca.issue("client", server=False)
    stranger = CA("stranger").issue("client", server=False)

    def creds(issued: Issued | None) -> grpc.ChannelCredentials:
        if issued is None:
            return grpc.ssl_channel_credentials(ca.pem)
        return grpc.ssl_channel_credentials(ca.pem, issued.key_pem, issued.cert_pem)

    assert await _predict(guard.address, creds(None)) == "UNAVAILABLE"
    assert await _predict(guard.address, creds(stranger)) == "UNAVAILABLE"
    assert await _predict(guard.address, creds(client)) == "OK"


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_tls_to_the_upstream(make_guard: GuardFactory, tmp_path: Path, mutual: bool) -> None:
    ca = CA()
    up = FakeUpstream()
    up.reply("m", predict_response("m", {"y": VALUES}))
    await start_upstream(up, _upstream_credentials(ca, mutual=mutual))
    try:
        upstream_tls: dict[str, str] = {
            "ca_file": str(ca.write(tmp_path)),
            "server_name": "localhost",
        }
        if mutual:
            cert, key = ca.issue("guard", server=False).write(tmp_path, "guard-client")
            upstream_tls |= {"cert_file": str(cert), "key_file": str(key)}
        guard = await make_guard(RULES, upstream=up.address, upstream_tls=upstream_tls)
        assert await _predict(guard.address, None) == "OK"
        assert up.finished == 1
        # A guard that does not trust the upstream's CA (or, for mTLS, has no
        # client certificate) gets nowhere.
        wrong = CA("wrong").write(tmp_path / "wrong")
        bad_tls = {"ca_file": str(wrong)} if not mutual else {"ca_file": upstream_tls["ca_file"]}
        bad = await make_guard(RULES, upstream=up.address, upstream_tls=bad_tls)
        assert await _predict(bad.address, None) == "UNAVAILABLE"
        assert up.finished == 1
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_server_certificate_reloads_on_change(
    make_guard: GuardFactory, plain_upstream: FakeUpstream, tmp_path: Path
) -> None:
    ca = CA()
    first = ca.issue("guard", server=True)
    cert, key = first.write(tmp_path, "server")
    guard = await make_guard(
        RULES, upstream=plain_upstream.address, tls={"cert_file": str(cert), "key_file": str(key)}
    )
    port = guard.server.port
    assert await asyncio.to_thread(presented_serial, port, ca, h2=True) == first.serial

    # Renewed by the same CA: a new connection sees the new serial.
    second = ca.issue("guard", server=True)
    second.write(tmp_path, "server")
    assert await await_serial(port, ca, second.serial, h2=True) == second.serial

    # Rotated to a new CA: a client trusting only the new CA gets through.
    new_ca = CA("rotated CA")
    third = new_ca.issue("guard", server=True)
    third.write(tmp_path, "server")
    assert await await_serial(port, new_ca, third.serial, h2=True) == third.serial
    assert await _predict(guard.address, grpc.ssl_channel_credentials(new_ca.pem)) == "OK"
    assert await _predict(guard.address, grpc.ssl_channel_credentials(ca.pem)) == "UNAVAILABLE"


def _listen_address(port: int) -> set[str]:
    """Local addresses of listening TCP sockets on ``port`` (from /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


@pytest.mark.parametrize(
    ("listen", "expected"), [("127.0.0.1:0", {"0100007F"}), ("0.0.0.0:0", {"00000000"})]
)
async def test_metrics_listen_can_bind_to_loopback_only(
    plain_upstream: FakeUpstream, tmp_path: Path, listen: str, expected: set[str]
) -> None:
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(f"upstream: {plain_upstream.address}\nmodels: []\n")
    async with guard_process(cfg, tmp_path, "--metrics-listen", listen) as guard:
        assert _listen_address(guard.metrics_port) == expected


async def test_upstream_certificates_reload_on_change(
    make_guard: GuardFactory, tmp_path: Path
) -> None:
    """The upstream moves to certificates from a new CA and demands client
    certificates from that CA too; rotating the guard's files is enough."""

    def rotate_guard_files(ca: CA) -> dict[str, str]:
        tmp = ca.write(tmp_path / "staging")
        ca_file = tmp_path / "upstream-ca.crt"
        tmp.replace(ca_file)  # atomic, as a Secret update is
        cert, key = ca.issue("guard", server=False).write(tmp_path, "guard-client")
        return {"ca_file": str(ca_file), "cert_file": str(cert), "key_file": str(key)}

    old_ca, new_ca = CA("old CA"), CA("new CA")
    up = FakeUpstream()
    up.reply("m", predict_response("m", {"y": VALUES}))
    await start_upstream(up, _upstream_credentials(old_ca, mutual=True))
    files = rotate_guard_files(old_ca)
    guard = await make_guard(
        RULES, upstream=up.address, upstream_tls={**files, "server_name": "localhost"}
    )
    try:
        assert await _predict(guard.address, None) == "OK"
        # The upstream restarts on the same port with the new CA's certificates.
        assert up.server is not None
        await up.server.stop(0)
        await start_upstream(up, _upstream_credentials(new_ca, mutual=True), address=up.address)
        assert await _predict(guard.address, None) == "UNAVAILABLE"  # old trust fails
        rotate_guard_files(new_ca)
        codes = []
        for _ in range(100):  # bounded: 100 x 0.1 s; the watcher polls every second
            codes.append(await _predict(guard.address, None))
            if codes[-1] == "OK":
                break
            await asyncio.sleep(0.1)
        assert codes[-1] == "OK", codes
        assert set(codes) <= {"OK", "UNAVAILABLE"}
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_damaged_upstream_certificate_files_keep_the_old_channel(
    make_guard: GuardFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: a client certificate rotated in cut short replaced the working
    channel with one that could not connect: every call UNAVAILABLE. Then
    (red team): refused files were read and checked again every second, on
    the event loop (a 4 MiB CA: 7 s of CPU in 20 s)."""
    ca = CA()
    up = FakeUpstream()
    up.reply("m", predict_response("m", {"y": VALUES}))
    await start_upstream(up, _upstream_credentials(ca, mutual=True))
    client = ca.issue("guard", server=False)
    cert, key = client.write(tmp_path, "guard-client")
    files = {"ca_file": str(ca.write(tmp_path)), "cert_file": str(cert), "key_file": str(key)}
    guard = await make_guard(
        RULES, upstream=up.address, upstream_tls={**files, "server_name": "localhost"}
    )
    try:
        assert await _predict(guard.address, None) == "OK"
        Issued(client.cert_pem[:200], client.key_pem, client.serial).write(tmp_path, "guard-client")
        codes = []
        deadline = asyncio.get_running_loop().time() + 3  # past the watcher's poll and one more
        while asyncio.get_running_loop().time() < deadline:
            codes.append(await _predict(guard.address, None))
        assert set(codes) == {"OK"}, codes
        # Refused once per change, not read and checked again every second.
        refused = [r for r in caplog.records if "do not load" in r.getMessage()]
        assert len(refused) == 1 and "field 'cert_file'" in refused[0].getMessage()
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_an_upstream_tls_rotation_never_stalls_the_event_loop(
    make_guard: GuardFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: changed upstream_tls files were read and checked on the event
    loop: a 1 MB ca_file held every call for the time it took."""
    caplog.set_level(logging.INFO, "guard.upstream")
    ca = CA()
    up = FakeUpstream()
    up.reply("m", predict_response("m", {"y": VALUES}))
    await start_upstream(up, _upstream_credentials(ca))
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(ca.pem * (1_000_000 // len(ca.pem)))
    upstream_tls = {"ca_file": str(bundle), "server_name": "localhost"}
    guard = await make_guard(RULES, upstream=up.address, upstream_tls=upstream_tls)
    try:
        async with loop_lag(0.01) as lag:
            bundle.write_bytes(bundle.read_bytes() + ca.pem)
            for _ in range(100):
                await asyncio.sleep(0.1)
                if [r for r in caplog.records if "reconnecting" in r.getMessage()]:
                    break
            else:
                pytest.fail("the rotation was not picked up within 10 s")
        assert await _predict(guard.address, None) == "OK"
        assert lag.worst < 0.25, f"the event loop stalled for {lag.worst:.3f} s"
    finally:
        assert up.server is not None
        await up.server.stop(0)


async def test_guard_check_reaches_a_tls_upstream_with_upstream_tls(tmp_path: Path) -> None:
    ca = CA()
    up = await start_upstream(FakeUpstream(), _upstream_credentials(ca))
    ca_file = ca.write(tmp_path)
    rules = "models:\n  - name: m\n    outputs:\n      - {name: probs}\n"
    try:
        for tls, expected in (
            ("", 2),
            (f"upstream_tls: {{ca_file: {ca_file}, server_name: localhost}}\n", 0),
        ):
            cfg = tmp_path / "guard.yaml"
            cfg.write_text(tls + rules)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "guard", "check", "--config", str(cfg),
                "--upstream", up.address,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == expected, (out + err).decode()
        assert "all configured outputs exist" in out.decode()
    finally:
        assert up.server is not None
        await up.server.stop(0)
