"""Test-time PKI: a CA, and server/client certificates it signs (``cryptography``)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Issued:
    """A certificate and its key, as PEM, with the serial to recognise it by."""

    cert_pem: bytes
    key_pem: bytes
    serial: int

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``name.crt`` and ``name.key`` (each replaced atomically)."""
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for suffix, data in (("crt", self.cert_pem), ("key", self.key_pem)):
            path = directory / f"{name}.{suffix}"
            tmp = directory / f".{name}.{suffix}.{os.urandom(4).hex()}"
            tmp.write_bytes(data)
            os.replace(tmp, path)
            out.append(path)
        return out[0], out[1]


class CA:
    """A self-signed certificate authority."""

    def __init__(self, name: str = "guard test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )  # fmt: skip
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, name: str = "ca") -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.crt"
        path.write_bytes(self.pem)
        return path

    def issue(self, common_name: str, *, server: bool, key: PrivateKey | None = None) -> Issued:
        """A leaf certificate (for an EC P-256 key unless ``key`` is given);
        server ones name ``localhost`` and ``127.0.0.1``."""
        key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), serial)


def presented_serial(port: int, ca: CA, *, h2: bool = False) -> int:
    """The serial of the certificate a TLS server on ``127.0.0.1:port``
    presents to a client trusting ``ca``; ``h2`` offers ALPN ``h2``, as a gRPC
    client does (gRPC's TLS refuses a handshake without it)."""
    context = ssl.create_default_context(cadata=ca.pem.decode())
    if h2:
        context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as conn:
            der = conn.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(der)


def serial_of(der: bytes) -> int:
    """The serial number of a DER certificate (as ``ssl`` hands it over)."""
    return int(x509.load_der_x509_certificate(der).serial_number)


async def await_serial(port: int, ca: CA, serial: int, *, h2: bool = False) -> int:
    """Poll until the server on ``port`` presents ``serial`` (a rotation is
    picked up within about two seconds), for at most 10 s; returns the serial
    last presented (0 while no handshake with ``ca``'s trust succeeds)."""
    seen = 0
    for _ in range(100):
        try:
            seen = await asyncio.to_thread(presented_serial, port, ca, h2=h2)
        except ssl.SSLError:
            seen = 0  # the old certificate, from a CA the client does not trust
        if seen == serial:
            break
        await asyncio.sleep(0.1)
    return seen
