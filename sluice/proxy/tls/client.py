"""TLS towards an upstream cluster: the client context and the name sent as SNI.

Verification is on unless switched off: against the system trust store, or a CA file when
given. A client certificate makes it mTLS towards the upstream.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from .certs import CertificateError, CertificateSource, load_ca_bundle, load_pair
from .server import ALPN_H2, ALPN_HTTP1, TlsVersion


@dataclass(frozen=True, slots=True)
class ClientTlsSettings:
    """A cluster's `tls:` block, resolved (paths absolute)."""

    server_name: str | None = None
    """SNI and the name the certificate must carry; None: the endpoint's host."""
    verify: bool = True
    ca_file: Path | None = None
    """PEM bundle to trust instead of the system store."""
    client_certificate: CertificateSource | None = None
    """Presented when the upstream asks (mTLS to the upstream)."""
    min_version: TlsVersion = TlsVersion.TLS1_2
    alpn: tuple[str, ...] = (ALPN_HTTP1,)
    """What the connection offers: (`h2`,) for `protocol: http2`, (`http/1.1`,) for http1."""

    def __post_init__(self) -> None:
        for proto in self.alpn:
            if proto not in (ALPN_H2, ALPN_HTTP1):
                raise ValueError(f"tls: unknown ALPN protocol {proto!r} (known: h2, http/1.1)")

    def server_hostname(self, host: str) -> str:
        """`server_hostname` for the connection to endpoint `host`: sent as SNI and checked
        against the certificate (the ssl module sends no SNI for an IP address and checks its
        IP subject alternative names instead)."""
        return self.server_name or host


def build_client_context(settings: ClientTlsSettings) -> ssl.SSLContext:
    """Raises CertificateError for an unusable CA file or client pair."""
    if settings.verify:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if settings.ca_file is not None:
            ca = load_ca_bundle(settings.ca_file)
            # Only the given CA: the system store would widen what is trusted.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = settings.min_version.ssl_version
    ctx.options |= ssl.OP_NO_COMPRESSION
    if settings.alpn:
        ctx.set_alpn_protocols(list(settings.alpn))
    cert = settings.client_certificate
    if cert is not None:
        load_pair(cert)  # a clear error (expired, mismatched key) before OpenSSL's terse one
        try:
            ctx.load_cert_chain(cert.cert_file, cert.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(cert.cert_file, f"OpenSSL refused the pair: {exc}") from None
    return ctx
