"""One error hierarchy for the guard, with no transport in it.

Every error a client can see carries a :class:`Status` here, and only here;
each front-end maps it to its own wire status in one table (the gRPC server
in :mod:`guard.server.status`). Configuration errors never reach a client:
the CLI prints them and exits 2.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

__all__ = [
    "ConfigError",
    "DecodeError",
    "GuardError",
    "LabelMismatchError",
    "OutputShapeError",
    "RejectedOutputError",
    "ResponseTooLargeError",
    "Status",
    "shown",
]

#: Names longer than this (clients and upstreams choose them) are cut in messages.
SHOWN_MAX = 64


def shown(name: str, limit: int = SHOWN_MAX) -> str:
    """``name`` for a message or a log line, cut to ``limit`` characters: a
    client-chosen name must not make an error larger than its metadata allows."""
    if len(name) <= limit:
        return name
    return f"{name[:limit]}...({len(name)} characters)"


class Status(Enum):
    """What kind of failure a client sees, independent of the transport.

    The values are gRPC's status code names, which TF Serving's REST API maps
    to HTTP statuses too.
    """

    INTERNAL = "INTERNAL"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"


class GuardError(Exception):
    """An error that ends a call with ``status`` and ``details``.

    ``details`` always starts with ``guard:`` so a client can tell the guard's
    errors from the upstream's.
    """

    status = Status.INTERNAL
    violations = 0
    """The response's violating values (the ``x-guard-violations`` figure of a rejection)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.details = message if message.startswith("guard:") else f"guard: {message}"


class DecodeError(GuardError):
    """The upstream's response bytes are not a well-formed PredictResponse."""


class RejectedOutputError(GuardError):
    """An output violated its rule and the rule's policy is ``reject``
    (or ``clamp`` met a value that cannot be repaired, such as NaN)."""

    def __init__(self, message: str, violations: int = 0) -> None:
        super().__init__(message)
        self.violations = violations


class LabelMismatchError(GuardError):
    """The configured labels do not fit the tensor the model returned."""


class OutputShapeError(GuardError):
    """A rule cannot apply to the tensor the model returned (for example
    ``top_k`` larger than the number of classes)."""


class ResponseTooLargeError(GuardError):
    """A guarded response would exceed the configured message limit."""

    status = Status.RESOURCE_EXHAUSTED


class ConfigError(Exception):
    """The configuration file is invalid. ``str()`` names the file, the rule
    and the field, and says what is allowed."""

    labels_files: tuple[Path, ...] = ()
    """The labels files the invalid config names, as far as they could be
    read: a reload watches them, so that fixing one is seen."""
