"""The gRPC edge of the error hierarchy: domain errors to status codes."""

from __future__ import annotations

import grpc

from guard.dataplane.errors import GuardError, Status

__all__ = ["grpc_code"]

_GRPC_CODE = {
    Status.INTERNAL: grpc.StatusCode.INTERNAL,
    Status.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def grpc_code(error: GuardError) -> grpc.StatusCode:
    """The gRPC status code a client gets for ``error``."""
    return _GRPC_CODE[error.status]
