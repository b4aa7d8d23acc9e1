"""``guard baseline`` against hostile inputs: endless files and replies, a reply
a byte a second, bytes that are not text, expositions that are not
histograms. Each is one line on stderr and exit code 2, within the bounds;
and what it prints loads back as a rule's baseline with the very same edges."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from guard.cli import main
from guard.control import baseline
from guard.control.config import load_config
from guard.metrics.guard_metrics import OUTPUT_VALUE_BUCKETS

_LABELS = 'model="m",output="p",signature="s"'


def _exposition(buckets: Sequence[tuple[str, float]], labels: str = _LABELS) -> str:
    lines = ["# TYPE guard_output_value histogram"]
    lines += [f'guard_output_value_bucket{{{labels},le="{le}"}} {n}' for le, n in buckets]
    return "\n".join(lines) + "\n"


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["baseline", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(rc: int, out: str, err: str, *words: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr naming ``words``."""
    assert rc == 2, (out, err)
    assert out == ""
    assert "Traceback" not in err
    assert err.startswith("guard baseline: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


def _metrics(tmp_path: Path, text: str | bytes) -> list[str]:
    path = tmp_path / "metrics.prom"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return ["--metrics-file", str(path), "--model", "m", "--output", "p"]


# ------------------------------------------------------------------ servers


class _Handler(http.server.BaseHTTPRequestHandler):
    stop: threading.Event
    good: bytes = b""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        try:
            if self.path == "/metrics":
                self._headers(len(self.good))
                self.wfile.write(self.good)
            elif self.path == "/missing":
                self.send_error(404)
            elif self.path == "/endless":
                self._headers()
                chunk = b"# " + b"x" * (1 << 20) + b"\n"
                while not self.stop.is_set():
                    self.wfile.write(chunk)
            elif self.path == "/dribble-body":
                self._headers()
                self._dribble(b"#")
            elif self.path == "/dribble-headers":
                self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                self._dribble(b"X:")
        except OSError:  # the client went away
            pass

    def _headers(self, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _dribble(self, byte: bytes) -> None:
        while not self.stop.wait(1.0):
            self.wfile.write(byte)
            self.wfile.flush()


@pytest.fixture
def server() -> Iterator[str]:
    """``http://127.0.0.1:PORT``: /metrics, /missing, /endless, /dribble-*."""

    class Handler(_Handler):
        stop = threading.Event()
        good = _exposition([("0.5", 1), ("0.9", 3), ("+Inf", 4)]).encode()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    Handler.stop.set()
    httpd.shutdown()
    httpd.server_close()


def _url(base: str, path: str) -> list[str]:
    return ["--metrics-url", base + path, "--model", "m", "--output", "p"]


# ------------------------------------------------------------------- bounds


def test_values_from_dev_zero_stop_at_the_limit(capsys: pytest.CaptureFixture[str]) -> None:
    _refused(*_cli(capsys, "--values", "/dev/zero"), "--values /dev/zero", "64 MiB")


def test_values_from_an_endless_fifo_stop_at_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(baseline, "VALUES_MAX_BYTES", 1 << 20)
    fifo = tmp_path / "values"
    os.mkfifo(fifo)

    def write_forever() -> None:
        try:
            with open(fifo, "wb") as f:
                while True:
                    f.write(b"0.5\n" * 4096)
        except OSError:  # the reader closed it
            pass

    writer = threading.Thread(target=write_forever, daemon=True)
    writer.start()
    _refused(*_cli(capsys, "--values", str(fifo)), str(fifo), "1 MiB")
    writer.join(5)
    assert not writer.is_alive()


def test_an_endless_reply_stops_at_the_limit(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _refused(*_cli(capsys, *_url(server, "/endless")), "--metrics-url", "16 MiB")


@pytest.mark.parametrize("path", ["/dribble-body", "/dribble-headers"])
def test_a_reply_a_byte_a_second_fails_at_the_deadline(
    server: str, path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(baseline, "DOWNLOAD_DEADLINE_S", 2.0)
    start = time.monotonic()
    result = _cli(capsys, *_url(server, path))
    elapsed = time.monotonic() - start
    _refused(*result, "--metrics-url", "within 2 s", "--metrics-file")
    assert 1.9 < elapsed < 3.5


def test_a_download_that_fails_says_why(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(*_cli(capsys, *_url(server, "/missing")), "/missing", "HTTP 404")
    port = server.rsplit(":", 1)[1]
    closed = server.replace(port, "1")  # nothing listens on port 1
    _refused(*_cli(capsys, *_url(closed, "/metrics")), "--metrics-url", "refused")


# -------------------------------------------------------------------- input


@pytest.mark.parametrize("source", ["values", "metrics"])
def test_bytes_that_are_not_utf8(
    tmp_path: Path, source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if source == "values":
        path = tmp_path / "values.txt"
        path.write_bytes(b"0.5\n0.7\n\xff\xfe0.5\n")
        argv = ["--values", str(path)]
        where = "line 3"
    else:
        argv = _metrics(
            tmp_path, f'guard_output_value_bucket{{{_LABELS},le="0.5"}} 1\xff\n'.encode("latin-1")
        )
        where = "line 1"
    _refused(*_cli(capsys, *argv), where, "0xff", "not UTF-8")


def test_a_value_that_is_not_a_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "values.txt"
    path.write_text("0.5\n\n0x10\n")
    _refused(*_cli(capsys, "--values", str(path)), "line 3", "'0x10' is not a number")


def test_a_directory_or_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(*_cli(capsys, "--values", str(tmp_path)), "Is a directory")
    missing = str(tmp_path / "nothing.prom")
    _refused(*_cli(capsys, "--metrics-file", missing, "--model", "m", "--output", "p"), missing)


def test_series_options_with_values_are_refused_not_ignored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Found (a red-team pass): --values F --model a took F and dropped --model."""
    path = tmp_path / "values.txt"
    path.write_text("0.5\n0.9\n")
    _refused(
        *_cli(capsys, "--values", str(path), "--model", "a", "--output", "p"),
        "--model, --output apply to --metrics-url/--metrics-file only",
    )
    assert _cli(capsys, "--values", str(path))[0] == 0


def test_a_malformed_exposition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _metrics(tmp_path, 'guard_output_value_bucket{model="m" output="p",le="0.5"} 10\n')
    _refused(*_cli(capsys, *argv), "--metrics-file", "not a Prometheus text exposition")


@pytest.mark.parametrize(
    ("buckets", "expected"),
    [
        ([("0.5", 10), ("NaN", 3), ("0.9", 4), ("+Inf", 12)], 'le="NaN" is not an upper bound'),
        ([("0.5", 10), ("half", 3), ("+Inf", 12)], 'le="half" is not an upper bound'),
        ([("0.5", 10), ("0.9", 4), ("+Inf", 12)], "count cumulatively"),
        ([("0.5", -1), ("+Inf", 2)], "a count is a number >= 0"),
        ([("0.5", 1), ("0.9", 2)], 'no le="+Inf"'),
    ],
)
def test_buckets_that_are_not_a_histogram(
    tmp_path: Path,
    buckets: list[tuple[str, float]],
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _refused(*_cli(capsys, *_metrics(tmp_path, _exposition(buckets))), expected)


def test_signatures_with_other_buckets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _exposition([("0.5", 1), ("+Inf", 2)]) + _exposition(
        [("0.6", 1), ("+Inf", 2)], 'model="m",output="p",signature="t"'
    ).replace("# TYPE guard_output_value histogram\n", "")
    _refused(*_cli(capsys, *_metrics(tmp_path, text)), "other buckets", "--signature")
    rc, out, _ = _cli(capsys, *_metrics(tmp_path, text), "--signature", "t")
    assert rc == 0 and "edges: [0.6]" in out


def test_counts_that_overflow_once_summed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Red team: two signatures of 1.7e308 rows each summed to Inf, and the
    CLI printed a ValueError traceback; each alone is read."""
    big = [("0.5", 1e308), ("1.0", 1.5e308), ("+Inf", 1.7e308)]
    text = _exposition(big) + _exposition(big, 'model="m",output="p",signature="t"').replace(
        "# TYPE guard_output_value histogram\n", ""
    )
    _refused(*_cli(capsys, *_metrics(tmp_path, text)), "pass what a float holds", "--signature")
    rc, out, _ = _cli(capsys, *_metrics(tmp_path, text), "--signature", "t")
    assert rc == 0 and "edges: [0.5, 1.0]" in out


def test_too_many_edges_for_a_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    buckets = [(repr(i / 2000), i) for i in range(1, 1200)] + [("+Inf", 1200)]
    _refused(*_cli(capsys, *_metrics(tmp_path, _exposition(buckets))), "1199 bucket edges", "1000")


@pytest.mark.parametrize(
    "argv",
    [["--values", "/dev/zero"], ["--metrics-file", "/dev/zero", "--model", "m", "--output", "p"]],
)
def test_as_a_process_no_traceback(argv: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "guard", "baseline", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert "Traceback" not in run.stderr
    assert "guard baseline: " in run.stderr and "MiB limit" in run.stderr


# --------------------------------------------------------------- round trip


def _loaded_baseline(tmp_path: Path, yaml_text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    block = "\n".join("        " + line for line in yaml_text.splitlines())
    config = tmp_path / "guard.yaml"
    config.write_text(f"models:\n  - name: m\n    outputs:\n      - name: p\n{block}\n")
    rule = load_config(config).models[0].outputs[0]
    assert rule.baseline is not None
    return rule.baseline.edges, rule.baseline.fractions


def test_close_and_tiny_edges_load_back_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # %g wrote 0.999999 three times (edges the config refuses), and PyYAML
    # reads 1e-05 as a string: edges are written as the shortest round trip,
    # always with a point.
    les = ["1e-05", "0.1", "0.9999991", "0.9999992", "0.9999993", "1e+16"]
    buckets = [(le, i + 1) for i, le in enumerate(les)] + [("+Inf", 10)]
    rc, out, err = _cli(capsys, *_metrics(tmp_path, _exposition(buckets)))
    assert rc == 0, err
    edges, fractions = _loaded_baseline(tmp_path, out)
    assert edges == tuple(float(le) for le in les)
    assert fractions == pytest.approx([0.1] * 6 + [0.4], abs=1e-6)


def test_values_and_a_download_load_back_exactly(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    values = np.random.default_rng(3).beta(5, 2, 5000)
    path = tmp_path / "values.txt"
    path.write_text("\n".join(repr(float(v)) for v in values) + "\nnan\n")
    rc, out, err = _cli(capsys, "--values", str(path))
    assert rc == 0, err
    edges, fractions = _loaded_baseline(tmp_path, out)
    assert edges == OUTPUT_VALUE_BUCKETS
    assert fractions == pytest.approx(baseline.from_values(values)[1], abs=1e-6)
    assert "5000 rows" in out

    rc, out, err = _cli(capsys, *_url(server, "/metrics"))
    assert rc == 0, err
    assert _loaded_baseline(tmp_path, out) == ((0.5, 0.9), (0.25, 0.5, 0.25))
