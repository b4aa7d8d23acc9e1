"""One call's bookkeeping, the same for both front-ends: its labels, the code
it ended with (counted once in ``guard_requests_total``), and its timing."""

from __future__ import annotations

import time
from collections.abc import Callable

from guard.metrics.guard_metrics import OTHER, GuardMetrics

__all__ = ["CallRecord"]


class CallRecord:
    """Counts a call once, with its protocol's label; each front-end adds how
    it answers (:class:`guard.server.handler.Call`, :class:`guard.server.rest.call.RestCall`)."""

    __slots__ = (
        "model_label", "method_label", "code", "upstream_s", "start", "_metrics", "_timed", "_held",
    )  # fmt: skip
    protocol = ""
    """The ``protocol`` label: ``grpc`` or ``rest``."""

    def __init__(self, metrics: GuardMetrics, method_label: str) -> None:
        self._metrics = metrics
        self.model_label = OTHER
        self.method_label = method_label
        self.code: str | None = None
        self.upstream_s = 0.0
        self.start = time.perf_counter()
        self._timed = False
        self._held: list[Callable[[], None]] = []

    def count(self, code: str) -> None:
        """Count the call with ``code``, once: the first code wins."""
        if self.code is None:
            self.code = code
            self._metrics.record_request(self.protocol, self.model_label, self.method_label, code)

    def hold(self, release: Callable[[], None]) -> None:
        """Have ``release`` (what gives back a slot the call holds) run once,
        by the time its client can have its answer (:meth:`answered`)."""
        self._held.append(release)

    def answered(self) -> None:
        """The client may have its whole answer from now on, and a scrape
        then must see the call's end: give back what it holds (:meth:`hold`)
        and time it. Both happen once; the code is counted before."""
        while self._held:
            self._held.pop()()
        self._time()

    def finish(self) -> None:
        """Count the call if nothing did (an exception of ours: UNKNOWN); end it."""
        self.count("UNKNOWN")
        self.answered()

    def _time(self) -> None:
        """Record the call's timing, once: where the client has its answer
        before the call's code ends, it is timed as the answer goes."""
        if self._timed:
            return
        self._timed = True
        total = time.perf_counter() - self.start
        self._metrics.record_timing(
            self.protocol, self.method_label, self.upstream_s, max(total - self.upstream_s, 0.0)
        )
