"""Row 9: a labels_file or a TLS file that is endless (/dev/zero) or huge
(1 GiB) is a config error: exit code 2, a message naming the field, no
traceback, quickly.
The commands run under a 2 GiB address-space limit, so a guard that reads the
whole file fails fast here instead of exhausting the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.attacks import _harness as H


def _config(tmp: Path, labels_file: str) -> Path:
    cfg = tmp / "guard.yaml"
    cfg.write_text(
        "upstream: 127.0.0.1:1\nmodels:\n"
        f"  - name: m\n    outputs: [{{name: p, argmax: true, labels_file: '{labels_file}'}}]\n",
        encoding="utf-8",
    )
    return cfg


@pytest.fixture(params=["dev-zero", "sparse-1GiB"])
def labels_file(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "dev-zero":
        return "/dev/zero"
    path = tmp_path / "labels.txt"
    with path.open("wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used
    return str(path)


@pytest.mark.parametrize("command", ["check", "serve"])
def test_huge_labels_file_is_a_config_error(tmp_path: Path, labels_file: str, command: str) -> None:
    cfg = _config(tmp_path, labels_file)
    args = ["check", "--config", str(cfg)]
    if command == "serve":
        args = ["serve", "--config", str(cfg), "--listen", "127.0.0.1:0"]
        args += ["--metrics-listen", "127.0.0.1:0"]
    result = H.guard_cli(*args, timeout_s=30)
    output = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}: {output[-800:]}"
    assert "Traceback" not in output and "MemoryError" not in output, output[-800:]
    assert "labels_file" in output, output[-800:]
    assert result.seconds < 10, f"took {result.seconds:.1f} s"


@pytest.mark.parametrize("field", ["cert_file", "key_file", "ca_file"])
def test_huge_tls_file_is_a_config_error(tmp_path: Path, labels_file: str, field: str) -> None:
    """Found: TLS files were only checked to exist, then read whole."""
    pem = tmp_path / "ok.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    files = {"cert_file": str(pem), "key_file": str(pem), field: labels_file}
    tls = ", ".join(f"{k}: '{v}'" for k, v in files.items())
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(f"upstream: 127.0.0.1:1\ntls: {{{tls}}}\nmodels: []\n", encoding="utf-8")
    result = H.guard_cli("check", "--config", str(cfg), timeout_s=30)
    output = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}: {output[-800:]}"
    assert "Traceback" not in output and f"field '{field}'" in output, output[-800:]
    assert "byte limit" in output or "not a regular file" in output, output[-800:]
