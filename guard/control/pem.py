"""The PEM files that the TLS settings name: read once each, within a bound,
and checked from the bytes that were read, with OpenSSL (what ``ssl`` and so
the REST listener use) and with gRPC's BoringSSL, which refuses some keys
OpenSSL takes.

Reading the bytes once and loading OpenSSL from them (not from the path again)
means that what was checked is what is used: a file replaced between the check
and the load (a rotation, or a FIFO swapped in) cannot slip past the check or
block a load. The same check serves ``guard check``, the start, and every
certificate rotation, so a damaged file is refused with the same words each
time, naming the field and the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from guard.control.files import read_bounded

__all__ = [
    "TLS_FILE_MAX_BYTES",
    "PemError",
    "PemFiles",
    "context_from",
    "pem_problems",
    "read_pem_files",
]

# A PEM certificate is a few KB; Debian's whole CA bundle is about 220 KB.
TLS_FILE_MAX_BYTES = 4 * 1024 * 1024

# What a PEM file holds: the labels of its blocks ("CERTIFICATE", "PRIVATE KEY").
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


class PemError(ValueError):
    """A TLS file that cannot be used; the message names the field and the file."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field '{field}': {message}")
        self.field = field


@dataclass(frozen=True)
class PemFiles:
    """The bytes of the TLS files, checked: they load as OpenSSL will use them."""

    cert: bytes | None
    key: bytes | None
    ca: bytes | None


def read_pem_files(cert_file: str | None, key_file: str | None, ca_file: str | None) -> PemFiles:
    """Read each named file once (bounded) and check it: raises the first of
    :func:`pem_problems`, or ``OSError`` for a file that cannot be read."""
    pem = PemFiles(_read(cert_file), _read(key_file), _read(ca_file))
    for problem in pem_problems(pem, cert_file, key_file, ca_file):
        raise problem
    return pem


def pem_problems(
    pem: PemFiles, cert_file: str | None, key_file: str | None, ca_file: str | None
) -> list[PemError]:
    """What OpenSSL refuses in ``pem``: the CA certificates or the certificate
    do not load, the key is not a PEM private key, is encrypted, or does not
    match the certificate. The paths are for the messages."""
    found = []
    if pem.ca is not None:
        found.append(_certificates_problem("ca_file", str(ca_file), pem.ca))
    cert_ok = key_ok = False
    if pem.cert is not None:
        found.append(cert := _certificates_problem("cert_file", str(cert_file), pem.cert))
        cert_ok = cert is None
    if pem.key is not None:
        found.append(key := _key_problem(str(key_file), pem.key))
        key_ok = key is None
    if cert_ok and key_ok:
        found.append(pair := _pair_problem(str(cert_file), str(key_file), pem))
        if pair is None:
            found.append(_grpc_problem(str(cert_file), pem))
    return [problem for problem in found if problem is not None]


def context_from(pem: PemFiles, purpose: ssl.Purpose) -> ssl.SSLContext:
    """An ``ssl`` context holding ``pem``'s certificate and key, trusting its
    CA; for the listening side (``CLIENT_AUTH``) a CA means clients must
    present a certificate (mTLS)."""
    context = ssl.create_default_context(purpose)
    if pem.cert is not None and pem.key is not None:
        with _as_path(pem.cert) as cert, _as_path(pem.key) as key:
            context.load_cert_chain(cert, key, password=_no_passphrase)
    if pem.ca is not None:
        with _as_path(pem.ca) as ca:
            context.load_verify_locations(cafile=ca)
        if purpose is ssl.Purpose.CLIENT_AUTH:
            context.verify_mode = ssl.CERT_REQUIRED
    return context


def _read(path: str | None) -> bytes | None:
    return read_bounded(path, TLS_FILE_MAX_BYTES) if path else None


@contextlib.contextmanager
def _as_path(data: bytes) -> Iterator[str]:
    """A path that reads as ``data``, for OpenSSL's loaders, which take paths
    only: an anonymous in-memory file on Linux (a private key never touches a
    disk), else a private temporary file removed at once."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("guard-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="guard-pem-")  # mode 0600
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


class _EncryptedKeyError(Exception):
    """The key needs a passphrase (gRPC takes none)."""


def _no_passphrase() -> bytes:
    raise _EncryptedKeyError  # asked instead of OpenSSL prompting on the terminal


def _certificates_problem(field: str, path: str, data: bytes) -> PemError | None:
    try:
        with _as_path(data) as loaded:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=loaded)
    except ssl.SSLError as exc:
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            what = "holds no PEM certificate"
            if field == "cert_file" and any(
                label.endswith(b"PRIVATE KEY") for label in _PEM_LABEL.findall(data)
            ):
                what += " (it holds a private key: are cert_file and key_file swapped?)"
        else:
            what = "holds a PEM certificate that cannot be read (damaged or cut short)"
        give = "the CA's certificate" if field == "ca_file" else "the certificate"
        return PemError(field, f"'{path}' {what}; give {give} in PEM")
    return None


def _key_problem(path: str, data: bytes) -> PemError | None:
    labels = set(_PEM_LABEL.findall(data))
    if any(label.endswith(b"PRIVATE KEY") for label in labels):
        return None
    what = "holds no PEM private key"
    if b"CERTIFICATE" in labels:
        what += " (it holds a certificate: are cert_file and key_file swapped?)"
    return PemError("key_file", f"'{path}' {what}; give the private key in PEM")


def _pair_problem(cert_file: str, key_file: str, pem: PemFiles) -> PemError | None:
    try:
        context_from(PemFiles(pem.cert, pem.key, None), ssl.Purpose.CLIENT_AUTH)
    except _EncryptedKeyError:
        return PemError(
            "key_file", f"'{key_file}' is encrypted; give the key unencrypted "
            "(the guard takes no passphrase)",
        )  # fmt: skip
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return PemError(
                "key_file", f"the key in '{key_file}' does not match the certificate in "
                f"'{cert_file}'; give the key the certificate was issued for",
            )  # fmt: skip
        return PemError("key_file", f"'{key_file}' is not a valid PEM private key")
    return None


def _grpc_problem(cert_file: str, pem: PemFiles) -> PemError | None:
    """gRPC's TLS is BoringSSL, not the OpenSSL that ``ssl`` loads with: it
    refuses some keys OpenSSL takes (Ed448, RSA-PSS, curves other than P-256,
    P-384 and P-521). A server that is never started is given the pair: gRPC
    builds its TLS from them there, or refuses the port."""
    import grpc  # here: most commands that read a config never need it

    assert pem.key is not None and pem.cert is not None
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    try:
        credentials = grpc.ssl_server_credentials([(pem.key, pem.cert)])
        usable = server.add_secure_port("127.0.0.1:0", credentials) != 0
    except RuntimeError:
        usable = False
    finally:
        server.stop(None)
    if usable:
        return None
    return PemError(
        "cert_file", f"gRPC's TLS (BoringSSL) cannot use the certificate in '{cert_file}' "
        "and its key (Ed448, RSA-PSS and curves other than P-256, P-384 and P-521 are "
        "refused); give an RSA, ECDSA (P-256, P-384 or P-521) or Ed25519 certificate",
    )  # fmt: skip
