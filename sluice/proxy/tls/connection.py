"""What filters can read about a TLS connection (Envoy's `connection.*` attributes)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from cryptography import x509

from .certs import dns_names_of, fingerprint, uri_names_of


@dataclass(frozen=True, slots=True)
class TlsConnectionInfo:
    tls_version: str
    """As Envoy reports it: `TLSv1.2`, `TLSv1.3`."""
    requested_server_name: str
    """The SNI name the client sent; "" when none."""
    alpn: str
    """The negotiated protocol (`h2`, `http/1.1`); "" when none was negotiated."""
    cipher: str
    mtls: bool
    """A client certificate was presented and verified."""
    subject_peer_certificate: str
    """RFC 4514 subject of the client certificate (`CN=client,O=Example`); "" without one."""
    uri_san_peer_certificate: str
    """The first URI subject alternative name (a SPIFFE id, say); "" without one."""
    dns_san_peer_certificate: str
    sha256_peer_certificate_digest: str

    def properties(self) -> dict[str, str | bool]:
        """The `connection.<name>` properties, keyed by `<name>`."""
        return {
            "tls_version": self.tls_version,
            "requested_server_name": self.requested_server_name,
            "mtls": self.mtls,
            "subject_peer_certificate": self.subject_peer_certificate,
            "uri_san_peer_certificate": self.uri_san_peer_certificate,
            "dns_san_peer_certificate": self.dns_san_peer_certificate,
            "sha256_peer_certificate_digest": self.sha256_peer_certificate_digest,
        }


def tls_connection_info(ssl_obj: ssl.SSLObject | ssl.SSLSocket, requested_server_name: str = "") -> TlsConnectionInfo:
    """Read after the handshake. `requested_server_name` comes from `ServerTls.requested_server_name`
    (a server-side SSL object does not keep it); a client-side one knows its own."""
    cipher = ssl_obj.cipher()
    der = ssl_obj.getpeercert(binary_form=True)
    subject = uri = dns = digest = ""
    if der:
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
        uris = uri_names_of(cert)
        names = dns_names_of(cert)
        uri = uris[0] if uris else ""
        dns = names[0] if names else ""
        digest = fingerprint(der).lower()
    return TlsConnectionInfo(
        tls_version=ssl_obj.version() or "",
        requested_server_name=requested_server_name or (ssl_obj.server_hostname or ""),
        alpn=ssl_obj.selected_alpn_protocol() or "",
        cipher=cipher[0] if cipher else "",
        # A server only gets a certificate that passed verification (CERT_OPTIONAL still
        # verifies what is sent), so presence means mTLS.
        mtls=bool(der) and ssl_obj.server_side,
        subject_peer_certificate=subject,
        uri_san_peer_certificate=uri,
        dns_san_peer_certificate=dns,
        sha256_peer_certificate_digest=digest,
    )
