"""Import aiohttp without reading the system's CA certificates.

aiohttp builds two client SSL contexts when it is first imported, and both
read every certificate of the system's CA bundle into OpenSSL's store: 2 MB
of an idle guard's memory, a fifth of what REST adds to it (measured: the
import's RSS delta, 10.6 MB with them and 8.7 MB without). The guard's REST
client only speaks plain HTTP to ``rest_upstream``, so it never uses them.
They are made without the certificates: an https request through them would
fail verification, never pass unchecked.

Imported by :mod:`guard.server.rest` before anything else in the package.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["import_aiohttp"]

_LOADERS = ("load_default_certs", "set_default_verify_paths")


def _skipped(*_args: Any) -> None:
    return None


@contextmanager
def _no_default_certificates() -> Iterator[None]:
    """SSL contexts made meanwhile load no default CA certificates."""
    saved = {name: ssl.SSLContext.__dict__.get(name) for name in _LOADERS}
    for name in _LOADERS:
        setattr(ssl.SSLContext, name, _skipped)
    try:
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(ssl.SSLContext, name)  # it was _ssl._SSLContext's own
            else:
                setattr(ssl.SSLContext, name, method)


def import_aiohttp() -> None:
    """Import aiohttp, unless something imported it already (then as it is)."""
    if "aiohttp" in sys.modules:
        return
    with _no_default_certificates():
        import aiohttp  # noqa: F401
        import aiohttp.web  # noqa: F401


import_aiohttp()
