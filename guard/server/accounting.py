"""One call's bookkeeping, the same for both front-ends: its labels, the code
it ended with (counted once in ``guard_requests_total``), and its timing."""

from __future__ import annotations

import time

from guard.metrics.guard_metrics import OTHER, GuardMetrics

__all__ = ["CallRecord"]


class CallRecord:
    """Counts a call once, with its protocol's label; each front-end adds how
    it answers (:class:`guard.server.handler.Call`, :class:`guard.server.rest.call.RestCall`)."""

    __slots__ = ("model_label", "method_label", "code", "upstream_s", "start", "_metrics")
    protocol = ""
    """The ``protocol`` label: ``grpc`` or ``rest``."""

    def __init__(self, metrics: GuardMetrics, method_label: str) -> None:
        self._metrics = metrics
        self.model_label = OTHER
        self.method_label = method_label
        self.code: str | None = None
        self.upstream_s = 0.0
        self.start = time.perf_counter()

    def count(self, code: str) -> None:
        """Count the call with ``code``, once: the first code wins."""
        if self.code is None:
            self.code = code
            self._metrics.record_request(self.protocol, self.model_label, self.method_label, code)

    def finish(self) -> None:
        """Count the call if nothing did (an exception of ours: UNKNOWN), and time it."""
        self.count("UNKNOWN")
        self._time()

    def _time(self) -> None:
        total = time.perf_counter() - self.start
        self._metrics.record_timing(
            self.protocol, self.method_label, self.upstream_s, max(total - self.upstream_s, 0.0)
        )
