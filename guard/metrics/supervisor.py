"""The metrics ``guard serve --workers N``'s supervisor adds to its workers'
sums, declared once against its registry. Apart from the guard's metric set:
the supervisor imports neither numpy nor the proxy (tests/test_layout.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

__all__ = ["SupervisorMetrics"]


class SupervisorMetrics:
    """``guard_worker_restarts_total``, by why the worker went."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.worker_restarts = Counter(
            "guard_worker_restarts_total",
            "Workers the supervisor replaced: exited (crashed, killed) or stalled (its event "
            "loop stopped running, and the supervisor killed it).",
            ["reason"], registry=registry,
        )  # fmt: skip
        for reason in ("exited", "stalled"):
            self.worker_restarts.labels(reason)
