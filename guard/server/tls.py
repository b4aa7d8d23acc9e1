"""TLS and mTLS credentials from the config's PEM file paths.

The listening side uses gRPC's dynamic server credentials: on each new
handshake gRPC asks whether the certificate changed, and the files are read
again only when their identity (inode, mtime, size, through symlinks) did. A
renewed certificate, such as one rotated by cert-manager into a mounted
Secret, takes effect without a restart.
"""

from __future__ import annotations

import logging
import ssl

import grpc

from guard.control.config import TLS_FILE_MAX_BYTES, TLSConfig
from guard.control.files import check_bounded, file_identity, read_bounded

__all__ = ["channel_credentials", "server_credentials", "server_ssl_context"]

logger = logging.getLogger("guard.server.tls")


def _read(path: str | None) -> bytes | None:
    return read_bounded(path, TLS_FILE_MAX_BYTES) if path else None


def _server_config(tls: TLSConfig) -> grpc.ServerCertificateConfiguration:
    key, cert = _read(tls.key_file), _read(tls.cert_file)
    assert key is not None and cert is not None  # the config requires both
    return grpc.ssl_server_certificate_configuration([(key, cert)], _read(tls.ca_file))


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """TLS on the listening side; with ``ca_file``, clients must present a
    certificate signed by that CA (mTLS)."""
    paths = (tls.cert_file, tls.key_file, tls.ca_file)
    state = {"identity": file_identity(paths)}

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        identity = file_identity(paths)
        if identity == state["identity"]:
            return None
        try:
            config = _server_config(tls)
        except OSError as exc:
            logger.error("TLS certificate reload failed, keeping the old one: %s", exc)
            return None
        state["identity"] = identity
        logger.info("TLS certificate reloaded from %s", tls.cert_file)
        return config

    return grpc.dynamic_ssl_server_credentials(
        _server_config(tls), fetch, require_client_authentication=tls.ca_file is not None
    )


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    """TLS towards the upstream; with ``cert_file``/``key_file``, the guard
    presents a client certificate (mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )


def _ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert tls.cert_file is not None and tls.key_file is not None  # the config requires both
    for path in (tls.cert_file, tls.key_file, tls.ca_file):
        if path is not None:
            check_bounded(path, TLS_FILE_MAX_BYTES)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS for the REST listener, from the same files as the gRPC side's: with
    ``ca_file``, clients must present a certificate (mTLS). As on the gRPC side,
    a handshake after the files changed uses the new certificate."""
    paths = (tls.cert_file, tls.key_file, tls.ca_file)
    state = {"identity": file_identity(paths), "context": _ssl_context(tls)}

    def current(sock: ssl.SSLObject, _name: str | None, _first: ssl.SSLContext) -> None:
        identity = file_identity(paths)
        if identity is not None and identity != state["identity"]:
            try:
                state["context"] = _ssl_context(tls)
                logger.info("TLS certificate reloaded from %s (REST)", tls.cert_file)
            except (OSError, ssl.SSLError) as exc:
                logger.error("TLS certificate reload failed, keeping the old one: %s", exc)
            state["identity"] = identity
        sock.context = state["context"]  # type: ignore[assignment]

    first = state["context"]
    assert isinstance(first, ssl.SSLContext)
    first.sni_callback = current
    return first
