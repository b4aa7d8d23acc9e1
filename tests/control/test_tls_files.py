"""TLS files are loaded at config validation: a junk, empty, swapped,
mismatched or encrypted file is a config error naming the field and the file
(found: they passed ``guard check``, then ``guard serve`` died with "Failed to
bind to address", naming neither TLS nor the file)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448

from guard.control.config import load_config
from guard.dataplane.errors import ConfigError
from tests.reliability._certs import CA

GUARD = [sys.executable, "-m", "guard"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt; server.crt/.key and client.crt/.key it signed; other.key (of
    no certificate here); junk, empty, a cut-short certificate, an encrypted
    key; ed448.crt/.key."""
    d = tmp_path_factory.mktemp("pki")
    ca = CA()
    ca.write(d, "ca")
    ca.issue("localhost", server=True).write(d, "server")
    ca.issue("guard", server=False).write(d, "client")
    (d / "other.key").write_bytes(ca.issue("other", server=True).key_pem)
    (d / "junk.pem").write_text("garbage\n")
    (d / "empty.pem").write_bytes(b"")
    cert = (d / "server.crt").read_bytes()
    (d / "cut.crt").write_bytes(cert[: len(cert) // 2] + b"\n-----END CERTIFICATE-----\n")
    key = serialization.load_pem_private_key((d / "server.key").read_bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (d / "encrypted.key").write_bytes(encrypted)
    # OpenSSL takes an Ed448 certificate; gRPC's BoringSSL does not.
    ca.issue("localhost", server=True, key=ed448.Ed448PrivateKey.generate()).write(d, "ed448")
    return d


def _write(tmp_path: Path, pki: Path, section: str, **files: str) -> Path:
    tls = ", ".join(f"{k}: '{pki / v}'" for k, v in files.items())
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(f"upstream: 127.0.0.1:1\n{section}: {{{tls}}}\nmodels: []\n")
    return cfg


def _error(tmp_path: Path, pki: Path, section: str = "tls", **files: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, pki, section, **files))
    return str(info.value)


def test_a_valid_set_loads(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(_write(tmp_path, pki, "tls", cert_file="server.crt",
                             key_file="server.key", ca_file="ca.crt"))  # fmt: skip
    assert cfg.tls is not None and cfg.tls.cert_file == str(pki / "server.crt")
    cfg = load_config(_write(tmp_path, pki, "upstream_tls", ca_file="ca.crt",
                             cert_file="client.crt", key_file="client.key"))  # fmt: skip
    assert cfg.upstream_tls is not None and cfg.upstream_tls.key_file == str(pki / "client.key")


SERVER = {"cert_file": "server.crt", "key_file": "server.key"}


@pytest.mark.parametrize(
    ("files", "field", "expected"),
    [
        ({"cert_file": "junk.pem"}, "cert_file", "junk.pem' holds no PEM certificate"),
        ({"cert_file": "empty.pem"}, "cert_file", "empty.pem' holds no PEM certificate"),
        ({"cert_file": "cut.crt"}, "cert_file", "cut.crt' holds a PEM certificate that cannot"),
        ({"key_file": "junk.pem"}, "key_file", "junk.pem' holds no PEM private key"),
        ({"key_file": "empty.pem"}, "key_file", "empty.pem' holds no PEM private key"),
        ({"key_file": "other.key"}, "key_file", "does not match the certificate"),
        ({"key_file": "encrypted.key"}, "key_file", "encrypted.key' is encrypted"),
        ({"ca_file": "junk.pem"}, "ca_file", "junk.pem' holds no PEM certificate"),
        ({"ca_file": "empty.pem"}, "ca_file", "empty.pem' holds no PEM certificate"),
        ({"cert_file": "ed448.crt", "key_file": "ed448.key"}, "cert_file", "(BoringSSL) cannot"),
    ],
)
@pytest.mark.parametrize("section", ["tls", "upstream_tls"])
def test_a_bad_file_is_a_config_error_naming_it(
    tmp_path: Path, pki: Path, section: str, files: dict[str, str], field: str, expected: str
) -> None:
    error = _error(tmp_path, pki, section, **(SERVER | files))
    assert f"guard.yaml: {section}: field '{field}': " in error, error
    assert expected in error, error


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_path_is_named_as_empty(tmp_path: Path, value: str) -> None:
    """Found (a red-team pass): ca_file: '' read as the config's directory,
    "'.' is a directory, not a regular file"."""
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(f"upstream: 127.0.0.1:1\nupstream_tls: {{ca_file: '{value}'}}\nmodels: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    error = str(info.value)
    assert "upstream_tls: field 'ca_file': the path is empty; give a file path" in error, error
    assert "directory" not in error, error


def test_swapped_cert_and_key_are_both_named(tmp_path: Path, pki: Path) -> None:
    error = _error(tmp_path, pki, cert_file="server.key", key_file="server.crt")
    assert "field 'cert_file': " in error and "it holds a private key" in error, error
    assert "field 'key_file': " in error and "it holds a certificate" in error, error
    assert error.count("key_file swapped?") == 2, error


def test_an_upstream_ca_alone_is_checked(tmp_path: Path, pki: Path) -> None:
    error = _error(tmp_path, pki, "upstream_tls", ca_file="junk.pem")
    assert "upstream_tls: field 'ca_file': " in error and "holds no PEM certificate" in error


@pytest.mark.parametrize("command", ["check", "serve"])
def test_the_commands_exit_2_naming_the_file(tmp_path: Path, pki: Path, command: str) -> None:
    cfg = _write(tmp_path, pki, "tls", cert_file="server.crt", key_file="junk.pem")
    args = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
    started = time.monotonic()
    out = subprocess.run(
        [*GUARD, command, "--config", str(cfg), *(args if command == "serve" else [])],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert time.monotonic() - started < 20
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "Failed to bind" not in out.stderr, out.stderr
    assert f"tls: field 'key_file': '{pki / 'junk.pem'}'" in out.stderr, out.stderr
