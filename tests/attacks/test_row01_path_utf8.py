"""Row 1: an HTTP/2 ``:path`` that is not UTF-8 must not leave a live process
that no longer serves. The fixed guard either keeps answering (a legitimate
Predict succeeds within a second) or exits non-zero so its supervisor restarts
it; never a silent zombie that still reports ``guard_upstream_up 1``."""

from __future__ import annotations

from pathlib import Path

from tests.attacks import _harness as H
from tests.attacks import attacks


def _recovered_or_exited(guard: H.Proc) -> str:
    result = H.answering_within(guard, 1.0)
    if result is None:  # the process gave up: it must say so with its exit code
        guard.popen.wait(5)
        assert guard.popen.returncode != 0, "guard exited 0 after losing its server"
        return "exited"
    assert result.code == "OK", (
        f"no legitimate Predict within 1 s after a non-UTF-8 :path: {result.code} "
        f"{result.details!r}; process alive, log tail: {guard.log()[-600:]}"
    )
    return "answering"


def test_non_utf8_path_does_not_silently_stop_serving(tmp_path: Path) -> None:
    with H.guarded(tmp_path) as (_up, guard):
        assert H.legit_ok(guard.address).code == "OK"
        state = attacks.non_utf8_path(guard.port)
        assert state.grpc_status != 0, "a path that names no method cannot succeed"
        _recovered_or_exited(guard)


def test_repeated_non_utf8_paths(tmp_path: Path) -> None:
    """A fix that restarts its server must survive the attack repeated."""
    with H.guarded(tmp_path) as (_up, guard):
        for path in (b"/\xff\xfe/Predict", b"/\xc3(/x", b"/tensorflow.serving\x80/Predict") * 4:
            attacks.non_utf8_path(guard.port, path)
            if _recovered_or_exited(guard) == "exited":
                return
