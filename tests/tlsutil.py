"""Certificates made at test time (trustme), written to a temporary directory; never committed."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sluice.proxy.tls.certs import CertificateSource


def write_pair(directory: Path, leaf: trustme.LeafCert, stem: str, names: tuple[str, ...] = ()) -> CertificateSource:
    cert_file = directory / f"{stem}.crt"
    key_file = directory / f"{stem}.key"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_file.write_bytes(leaf.private_key_pem.bytes())
    return CertificateSource(cert_file, key_file, names)


def write_ca(directory: Path, ca: trustme.CA, stem: str = "ca") -> Path:
    path = directory / f"{stem}.pem"
    path.write_bytes(ca.cert_pem.bytes())
    return path


def client_cert_with_uri(ca: trustme.CA, directory: Path, stem: str, common_name: str, uri: str) -> CertificateSource:
    """A client certificate with a URI subject alternative name (a SPIFFE-style id), which trustme
    cannot make, signed by `ca`."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sluice Tests"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file = directory / f"{stem}.crt"
    key_file = directory / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return CertificateSource(cert_file, key_file)


def trusting(ca: trustme.CA, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def server_port(server: asyncio.AbstractServer) -> int:
    sockets = server.sockets
    assert sockets
    port: int = sockets[0].getsockname()[1]
    return port
