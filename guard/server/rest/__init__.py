"""The REST front-end: TF Serving's REST API, guarded (see :mod:`guard.server.rest.server`)."""

# First, so that aiohttp is imported without the CA certificates it would not use.
from guard.server.rest import _lean_aiohttp  # noqa: F401
from guard.server.rest.server import RestFrontEnd

__all__ = ["RestFrontEnd"]
