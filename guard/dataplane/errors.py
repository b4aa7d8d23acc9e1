"""One error hierarchy for the guard.

Every error a client can see carries its gRPC status code here, and only here;
the proxy maps a :class:`GuardError` to ``context.abort(code, details)`` in one
place. Configuration errors never reach a client: the CLI prints them and exits 2.
"""

from __future__ import annotations

import grpc

__all__ = [
    "ConfigError",
    "DecodeError",
    "GuardError",
    "LabelMismatchError",
    "OutputShapeError",
    "RejectedOutputError",
]


class GuardError(Exception):
    """An error that ends an RPC with ``code`` and ``details``.

    ``details`` always starts with ``guard:`` so a client can tell the guard's
    errors from the upstream's.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.details = message if message.startswith("guard:") else f"guard: {message}"


class DecodeError(GuardError):
    """The upstream's response bytes are not a well-formed PredictResponse."""

    code = grpc.StatusCode.INTERNAL


class RejectedOutputError(GuardError):
    """An output violated its rule and the rule's policy is ``reject``
    (or ``clamp`` met a value that cannot be repaired, such as NaN)."""

    code = grpc.StatusCode.INTERNAL


class LabelMismatchError(GuardError):
    """The configured labels do not fit the tensor the model returned."""

    code = grpc.StatusCode.INTERNAL


class OutputShapeError(GuardError):
    """A rule cannot apply to the tensor the model returned (for example
    ``top_k`` larger than the number of classes)."""

    code = grpc.StatusCode.INTERNAL


class ConfigError(Exception):
    """The configuration file is invalid. ``str()`` names the file, the rule
    and the field, and says what is allowed."""
