"""Hostile background traffic for the soak: the attacks of tests/attacks, one
after another, against a running guard, until stopped.

Each round is bounded: a method name that is not UTF-8, streams that never
send their request, a gzip bomb, a rapid-reset burst, oversized metadata.
None of it names a model the soak counts (the requests that carry one are
refused before the guard reads them), so the legitimate traffic's counters
must stay exactly the client's count.

One attack has a known cost: a method name that is not UTF-8 stops one of
the guard's gRPC servers (a grpcio 1.85 bug, docs/reliability.md). Calls
that server had received but not handed over end CANCELLED and never reach
the guard; :attr:`Hostile.path_times` lets the soak tell them apart.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Collection

from tests.attacks import attacks

__all__ = ["Hostile"]

_PAUSE_S = 1.0


def _stuck(port: int) -> None:
    client = attacks.stuck_streams(port, 200)
    try:
        time.sleep(1.0)
    finally:
        client.close()


def _bomb(port: int) -> None:
    attacks.send_compressed(port, attacks.gzip_bomb(64), timeout=30)


def _reset(port: int) -> None:
    attacks.rapid_reset(port, 20_000, 1.0)


def _metadata(port: int) -> None:
    attacks.big_metadata_call(port, attacks.many_headers(2_000))


def _path(port: int) -> None:
    attacks.non_utf8_path(port)


ATTACKS: dict[str, Callable[[int], object]] = {
    "path": _path,
    "stuck": _stuck,
    "bomb": _bomb,
    "reset": _reset,
    "metadata": _metadata,
}


class Hostile:
    """Runs the attacks in a loop, in a thread, until :meth:`stop`."""

    def __init__(self, port: int, only: Collection[str] = ()) -> None:
        self._port = port
        self._attacks = {k: v for k, v in ATTACKS.items() if not only or k in only}
        self._stop = threading.Event()
        self.rounds: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.path_times: list[float] = []
        """``time.monotonic()`` at the start of each non-UTF-8 method name."""
        self._thread = threading.Thread(target=self._run, name="hostile", daemon=True)

    def __enter__(self) -> Hostile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, attack in self._attacks.items():
                if self._stop.wait(_PAUSE_S):
                    return
                if name == "path":
                    self.path_times.append(time.monotonic())
                try:
                    attack(self._port)
                    self.rounds[name] += 1
                except Exception as exc:  # the guard closing on an attacker is fine
                    self.errors[f"{name}: {type(exc).__name__}"] += 1
