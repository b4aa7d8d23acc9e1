"""The REST front-end: TF Serving's REST API, guarded (see :mod:`guard.server.rest.server`)."""

from guard.server.rest.server import RestFrontEnd

__all__ = ["RestFrontEnd"]
