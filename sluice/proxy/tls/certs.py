"""Certificate + key pairs: read, validate, describe.

A pair is validated before anything uses it: both files readable, the chain PEM, the key PEM and
unencrypted, the key belonging to the leaf certificate, the leaf inside its validity period.
Every failure is a `CertificateError` naming the file and the reason, so a reload can log it and
keep the pair that runs.

Parsing is done with `cryptography`: the stdlib ssl module can load a pair into a context but
cannot tell what is in it (names, expiry, issuer) without private helpers.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes


class CertificateError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CertificateSource:
    """Where one certificate comes from (a listener's `tls.certificates[]` entry)."""

    cert_file: Path
    """PEM: the leaf certificate first, then the intermediates."""
    key_file: Path
    """PEM, unencrypted."""
    names: tuple[str, ...] = ()
    """SNI names this certificate answers (exact or `*.suffix`); empty: the certificate's DNS names."""


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What the admin API and the expiry gauge show about one loaded certificate."""

    cert_file: Path
    key_file: Path
    names: tuple[str, ...]
    """The SNI names it is selected by (configured, else its DNS subject alternative names)."""
    dns_names: tuple[str, ...]
    subject: str
    """RFC 4514 form, like Envoy's `subject_peer_certificate` (`CN=a,O=b`)."""
    issuer: str
    serial: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    """UTC, timezone-aware."""
    fingerprint_sha256: str
    """Hex of the SHA-256 of the leaf's DER, as `openssl x509 -fingerprint -sha256` prints it."""
    chain_length: int

    def expires_in(self, now: datetime.datetime | None = None) -> float:
        """Seconds until `not_after` (negative once expired)."""
        return (self.not_after - (now or _utcnow())).total_seconds()

    def to_json(self, now: datetime.datetime | None = None) -> dict[str, object]:
        return {
            "cert_file": str(self.cert_file),
            "key_file": str(self.key_file),
            "names": list(self.names),
            "dns_names": list(self.dns_names),
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "expires_in_seconds": round(self.expires_in(now), 3),
            "fingerprint_sha256": self.fingerprint_sha256,
            "chain_length": self.chain_length,
        }


@dataclass(frozen=True, slots=True)
class CertificatePair:
    """A validated pair: the exact bytes that were checked, and what they say."""

    source: CertificateSource
    cert_pem: bytes
    key_pem: bytes
    info: CertificateInfo


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(path, f"cannot read the {what}: {exc.strerror or exc}") from None


def parse_certificates(path: Path, data: bytes, what: str = "certificate file") -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(path, f"the {what} is not PEM certificates ({exc})") from None
    if not certs:
        raise CertificateError(path, f"the {what} holds no certificate")
    return certs


def _parse_key(path: Path, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(path, "the private key is encrypted (a passphrase is not supported)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(path, f"not a PEM private key ({exc})") from None


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def dns_names_of(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(name.lower() for name in san.get_values_for_type(x509.DNSName))


def uri_names_of(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.get_values_for_type(x509.UniformResourceIdentifier))


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest().upper()


def describe(source: CertificateSource, chain: list[x509.Certificate]) -> CertificateInfo:
    leaf = chain[0]
    dns_names = dns_names_of(leaf)
    return CertificateInfo(
        cert_file=source.cert_file,
        key_file=source.key_file,
        names=tuple(n.lower() for n in source.names) or dns_names,
        dns_names=dns_names,
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        serial=format(leaf.serial_number, "X"),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        fingerprint_sha256=fingerprint(leaf.public_bytes(serialization.Encoding.DER)),
        chain_length=len(chain),
    )


def load_pair(source: CertificateSource, *, now: datetime.datetime | None = None) -> CertificatePair:
    """Read and validate one pair; raises CertificateError naming the file at fault."""
    cert_pem = read_file(source.cert_file, "certificate file")
    key_pem = read_file(source.key_file, "private key file")
    chain = parse_certificates(source.cert_file, cert_pem)
    key = _parse_key(source.key_file, key_pem)
    leaf = chain[0]
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise CertificateError(
            source.key_file, f"the private key does not belong to the certificate in {source.cert_file}"
        )
    moment = now or _utcnow()
    if leaf.not_valid_after_utc <= moment:
        raise CertificateError(source.cert_file, f"the certificate expired on {leaf.not_valid_after_utc.isoformat()}")
    if leaf.not_valid_before_utc > moment:
        raise CertificateError(
            source.cert_file, f"the certificate is not valid before {leaf.not_valid_before_utc.isoformat()}"
        )
    return CertificatePair(source, cert_pem, key_pem, describe(source, chain))


def load_ca_bundle(path: Path) -> bytes:
    """A CA bundle's PEM bytes, checked to hold at least one certificate."""
    data = read_file(path, "CA file")
    parse_certificates(path, data, "CA file")
    return data
