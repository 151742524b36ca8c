"""A TLS listener: its certificates (`ServerTls`), its handshake counters, and its connections.

A plain listener needs none of this: its connections are plain `DownstreamConnection`s. A TLS
listener accepts through `TlsAcceptor` (the handshake, counted by failure reason) and then hands
the secure transport to a `TlsDownstreamConnection`, which reads the connection's TLS facts once
(version, SNI, client certificate) for every request on it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field

from .downstream import ConnectionOwner, DownstreamConnection
from .tls.acceptor import HandshakeStats
from .tls.connection import tls_connection_info
from .tls.server import ReloadOutcome, ServerTls

log = logging.getLogger("sluice.tls")


@dataclass(slots=True)
class TlsListener:
    """One TLS listener of the proxy. Mutable: its certificates reload, its counters count."""

    name: str
    """Where it listens (`host:port` as bound), the label in /certs and the metrics."""
    tls: ServerTls
    handshakes: HandshakeStats = field(default_factory=HandshakeStats)

    def reload_certificates(self) -> list[str]:
        """Re-read the certificate files: changed pairs that validate replace the running ones;
        a broken pair keeps the running one. Returns the errors (also logged)."""
        errors: list[str] = []
        for result in self.tls.reload():
            if result.outcome is ReloadOutcome.RELOADED:
                log.info("listener %s: certificate %s reloaded", self.name, result.cert_file)
            elif result.outcome is ReloadOutcome.FAILED:
                log.error("listener %s: certificate not reloaded, the running one stays: %s", self.name, result.error)
                errors.append(result.error or str(result.cert_file))
        for path, error in self.tls.errors.items():
            if path == self.tls.settings.client_ca_file:
                log.error("listener %s: client CA not reloaded, the running one stays: %s", self.name, error)
                errors.append(error)
        return errors


class TlsDownstreamConnection(DownstreamConnection):
    """A `DownstreamConnection` on a TLS transport: scheme https and the `connection.*` properties."""

    scheme = "https"

    def __init__(self, server: ConnectionOwner, listener: TlsListener) -> None:
        super().__init__(server)
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_obj = transport.get_extra_info("ssl_object")
        if isinstance(ssl_obj, ssl.SSLObject | ssl.SSLSocket):
            info = tls_connection_info(ssl_obj, self._listener.tls.requested_server_name(ssl_obj))
            self.tls_properties = info.properties()
        super().connection_made(transport)
