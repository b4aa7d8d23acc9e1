"""TLS and mTLS credentials from the config's PEM file paths.

The listening side's certificate is read and checked once per change, for
both listeners: a watcher polls the files' identity (inode, mtime, size,
through symlinks) every second and, once a change has stayed for a poll,
reads and checks them on a worker thread. A renewed certificate, such as one
rotated by cert-manager into a mounted Secret, takes effect within about two
seconds, without a restart. A handshake only takes the latest certificate:
it never reads or checks files, so a large CA bundle never stalls the event
loop or a handshake. Files that do not load (damaged, cut short, a key that
does not match) are refused once per change, with a message naming the field
and the file, and the old certificate is kept until the files change again.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

import grpc

from guard.control.config import TLSConfig
from guard.control.files import FileWatcher
from guard.control.pem import PemFiles, context_from, read_pem_files

__all__ = ["ListenerCertificates", "channel_credentials"]

logger = logging.getLogger("guard.server.tls")


def _read(tls: TLSConfig) -> PemFiles:
    return read_pem_files(tls.cert_file, tls.key_file, tls.ca_file)


def _grpc_config(pem: PemFiles) -> grpc.ServerCertificateConfiguration:
    assert pem.key is not None and pem.cert is not None  # the config requires both
    return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], pem.ca)


def _ssl_context(pem: PemFiles) -> ssl.SSLContext:
    return context_from(pem, ssl.Purpose.CLIENT_AUTH)


class ListenerCertificates:
    """The listening side's certificate, for the gRPC servers on the port and,
    with ``rest``, the REST listener. Reading the files raises ``OSError`` or
    ``ValueError`` (at start, so the guard does not serve without them); later
    changes are picked up by :attr:`watcher`, which the owner runs."""

    def __init__(self, tls: TLSConfig, rest: bool) -> None:
        self._tls = tls
        pem = _read(tls)
        self._grpc = _grpc_config(pem)
        self._context = _ssl_context(pem) if rest else None
        self.watcher = FileWatcher((tls.cert_file, tls.key_file, tls.ca_file), self._changed)

    async def _changed(self) -> bool:
        await asyncio.to_thread(self._remake)
        return True  # a refusal too: not tried again until the files change

    def _remake(self) -> None:
        try:
            pem = _read(self._tls)
            made = _grpc_config(pem), (_ssl_context(pem) if self._context is not None else None)
        except Exception as exc:  # a rotation must never take the old certificate away
            logger.error("TLS certificate reload failed, keeping the old certificate: %s", exc)
            return
        self._grpc, self._context = made
        logger.info("TLS certificate reloaded from %s", self._tls.cert_file)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for one gRPC server; with ``ca_file``, clients must
        present a certificate signed by that CA (mTLS)."""
        given = {"config": self._grpc}

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            config = self._grpc  # asked on every handshake, from gRPC's threads
            if config is given["config"]:
                return None  # unchanged for this server
            given["config"] = config
            return config

        return grpc.dynamic_ssl_server_credentials(
            given["config"], fetch, require_client_authentication=self._tls.ca_file is not None
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The REST listener's context; each handshake switches to the latest
        certificate. With ``ca_file``, clients must present a certificate."""
        first = self._context
        assert first is not None, "made with rest=False"

        def latest(sock: ssl.SSLObject, _name: str | None, _first: ssl.SSLContext) -> None:
            latest_context = self._context
            if latest_context is not None and latest_context is not first:
                sock.context = latest_context

        first.sni_callback = latest
        return first


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    """TLS towards the upstream; with ``cert_file``/``key_file``, the guard
    presents a client certificate (mTLS). Raises ``OSError`` or ``ValueError``
    while a file cannot be read or does not load."""
    pem = _read(tls)
    return grpc.ssl_channel_credentials(
        root_certificates=pem.ca, private_key=pem.key, certificate_chain=pem.cert
    )
