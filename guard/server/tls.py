"""TLS and mTLS credentials from the config's PEM file paths.

The listening side uses gRPC's dynamic server credentials: on each new
handshake gRPC asks whether the certificate changed, and the files are read
again only when their identity (inode, mtime, size, through symlinks) did. A
renewed certificate, such as one rotated by cert-manager into a mounted
Secret, takes effect without a restart. Files that do not load (damaged, cut
short, a key that does not match) are refused, once per change and with a
message naming the field and the file, and the old certificate is kept until
the files change again.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

from guard.control.config import TLSConfig
from guard.control.files import complete, file_identity
from guard.control.pem import PemFiles, context_from, read_pem_files

__all__ = ["ServerCertificates", "channel_credentials", "server_ssl_context"]

logger = logging.getLogger("guard.server.tls")

T = TypeVar("T")


def _read(tls: TLSConfig) -> PemFiles:
    return read_pem_files(tls.cert_file, tls.key_file, tls.ca_file)


def _grpc_config(pem: PemFiles) -> grpc.ServerCertificateConfiguration:
    assert pem.key is not None and pem.cert is not None  # the config requires both
    return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], pem.ca)


class _Rotation(Generic[T]):
    """What was last made of the files (a gRPC certificate configuration, an
    ``ssl`` context), made again when their identity changes. Shared by every
    listener of one kind, so the files are read and checked, and a refusal
    logged, once per change, however many servers and handshakes ask."""

    def __init__(self, tls: TLSConfig, make: Callable[[PemFiles], T], side: str) -> None:
        self._tls, self._make, self._side = tls, make, side
        self._paths = (tls.cert_file, tls.key_file, tls.ca_file)
        self._identity = file_identity(self._paths)
        self.made = make(_read(tls))
        self._lock = threading.Lock()  # gRPC asks from its own threads

    def current(self) -> T:
        """The latest files' product; the old one while they are missing or refused."""
        identity = file_identity(self._paths)
        with self._lock:
            if complete(identity) and identity != self._identity:
                self._identity = identity  # a refusal is not tried again until they change
                self._remake()
            return self.made

    def _remake(self) -> None:
        try:
            self.made = self._make(_read(self._tls))
        except Exception as exc:  # a handshake must never fail on the files' account
            logger.error(
                "TLS certificate reload failed (%s), keeping the old certificate: %s",
                self._side, exc,
            )  # fmt: skip
            return
        logger.info("TLS certificate reloaded from %s (%s)", self._tls.cert_file, self._side)


class ServerCertificates:
    """The listening side's certificate for gRPC, shared by the servers on
    the port; each server's credentials ask it on every new handshake."""

    def __init__(self, tls: TLSConfig) -> None:
        self._tls = tls
        self._rotation = _Rotation(tls, _grpc_config, "gRPC")

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for one server; with ``ca_file``, clients must present
        a certificate signed by that CA (mTLS)."""
        rotation = self._rotation
        given = {"config": rotation.made}

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            config = rotation.current()
            if config is given["config"]:
                return None  # unchanged for this server
            given["config"] = config
            return config

        return grpc.dynamic_ssl_server_credentials(
            given["config"], fetch, require_client_authentication=self._tls.ca_file is not None
        )


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    """TLS towards the upstream; with ``cert_file``/``key_file``, the guard
    presents a client certificate (mTLS). Raises ``OSError`` or ``ValueError``
    while a file cannot be read or does not load."""
    pem = _read(tls)
    return grpc.ssl_channel_credentials(
        root_certificates=pem.ca, private_key=pem.key, certificate_chain=pem.cert
    )


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS for the REST listener, from the same files as the gRPC side's: with
    ``ca_file``, clients must present a certificate (mTLS). As on the gRPC side,
    a handshake after the files changed uses the new certificate."""
    rotation = _Rotation(tls, lambda pem: context_from(pem, ssl.Purpose.CLIENT_AUTH), "REST")

    def current(sock: ssl.SSLObject, _name: str | None, _first: ssl.SSLContext) -> None:
        sock.context = rotation.current()

    first = rotation.made
    first.sni_callback = current
    return first
