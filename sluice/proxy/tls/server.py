"""TLS for a listener: SSL contexts per certificate, SNI selection, client certificates, reload.

`ServerTls` owns the contexts of one listener. The listening socket uses `ServerTls.context`;
its SNI callback moves every handshake onto the context of the certificate the client asked
for (exact name, then `*.suffix`, then the default: the first certificate). Because every
handshake is moved, even the default certificate can be replaced by `reload()` without
re-creating the listening socket: the callback reads the current map each time.

All contexts of a listener are configured alike (versions, ciphers, ALPN, client verification)
since OpenSSL takes some of these from the context the handshake started on and some from the
one it was moved to.
"""

from __future__ import annotations

import enum
import ssl
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .certs import CertificateError, CertificateInfo, CertificatePair, CertificateSource, load_ca_bundle, load_pair


class TlsVersion(enum.Enum):
    TLS1_2 = "1.2"
    TLS1_3 = "1.3"

    @property
    def ssl_version(self) -> ssl.TLSVersion:
        return ssl.TLSVersion.TLSv1_2 if self is TlsVersion.TLS1_2 else ssl.TLSVersion.TLSv1_3


class ClientAuth(enum.Enum):
    """Downstream mTLS: whether a client certificate is asked for, and whether it must come."""

    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


ALPN_H2 = "h2"
ALPN_HTTP1 = "http/1.1"


@dataclass(frozen=True, slots=True)
class ServerTlsSettings:
    """A listener's `tls:` block, resolved (paths absolute)."""

    certificates: tuple[CertificateSource, ...]
    """The first one is the default: chosen when the client sends no SNI or an unknown name."""
    min_version: TlsVersion = TlsVersion.TLS1_2
    alpn: tuple[str, ...] = (ALPN_H2, ALPN_HTTP1)
    client_auth: ClientAuth = ClientAuth.NONE
    client_ca_file: Path | None = None
    ciphers: str | None = None
    """OpenSSL cipher list for TLS 1.2; None keeps OpenSSL's secure default. TLS 1.3 suites are
    not configurable here (all of OpenSSL's are AEAD)."""

    def __post_init__(self) -> None:
        if not self.certificates:
            raise ValueError("tls: at least one certificate is required")
        if self.client_auth is not ClientAuth.NONE and self.client_ca_file is None:
            raise ValueError(f"tls: client_auth {self.client_auth.value} needs client_ca_file")
        for proto in self.alpn:
            if proto not in (ALPN_H2, ALPN_HTTP1):
                raise ValueError(f"tls: unknown ALPN protocol {proto!r} (known: h2, http/1.1)")


class ReloadOutcome(enum.Enum):
    UNCHANGED = "unchanged"
    RELOADED = "reloaded"
    FAILED = "failed"
    """The new files do not validate: the previous certificate keeps running."""


@dataclass(frozen=True, slots=True)
class CertificateReload:
    cert_file: Path
    outcome: ReloadOutcome
    error: str | None = None
    info: CertificateInfo | None = None
    """The certificate that runs after this reload."""


@dataclass(frozen=True, slots=True)
class _Loaded:
    pair: CertificatePair
    context: ssl.SSLContext


@dataclass(slots=True)
class _NameIndex:
    exact: dict[str, int] = field(default_factory=dict)
    wildcard: dict[str, int] = field(default_factory=dict)
    """`*.example.com` is stored as `example.com`; it matches exactly one more label."""


def _build_index(infos: list[CertificateInfo]) -> _NameIndex:
    index = _NameIndex()
    for position, info in enumerate(infos):
        for name in info.names:
            if name.startswith("*."):
                index.wildcard.setdefault(name[2:], position)
            else:
                index.exact.setdefault(name, position)
    return index


def match_certificate(index: _NameIndex, server_name: str | None) -> int:
    """Position of the certificate for `server_name`: exact, then one-label wildcard, else 0."""
    if not server_name:
        return 0
    name = server_name.lower().rstrip(".")
    found = index.exact.get(name)
    if found is not None:
        return found
    _, dot, parent = name.partition(".")
    if dot:
        found = index.wildcard.get(parent)
        if found is not None:
            return found
    return 0


def _same_bytes(path: Path, expected: bytes) -> bool:
    try:
        return path.read_bytes() == expected
    except OSError:
        return False


def build_server_context(settings: ServerTlsSettings, pair: CertificatePair, ca_pem: bytes | None) -> ssl.SSLContext:
    """One server context with `pair` loaded; raises CertificateError, ValueError (bad ciphers)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = settings.min_version.ssl_version
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    if settings.ciphers is not None:
        try:
            ctx.set_ciphers(settings.ciphers)
        except ssl.SSLError:
            raise ValueError(f"tls: no usable cipher in {settings.ciphers!r}") from None
    if settings.alpn:
        ctx.set_alpn_protocols(list(settings.alpn))
    source = pair.source
    try:
        ctx.load_cert_chain(source.cert_file, source.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(source.cert_file, f"OpenSSL refused the pair: {exc}") from None
    # ssl can only load from paths: make sure what it read is what was validated.
    if not (_same_bytes(source.cert_file, pair.cert_pem) and _same_bytes(source.key_file, pair.key_pem)):
        raise CertificateError(source.cert_file, "the files changed while being loaded (the next change retries)")
    if settings.client_auth is not ClientAuth.NONE and ca_pem is not None:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        ctx.verify_mode = ssl.CERT_REQUIRED if settings.client_auth is ClientAuth.REQUIRED else ssl.CERT_OPTIONAL
    return ctx


class ServerTls:
    """The TLS state of one listener: create once (raises CertificateError), reload when files change."""

    def __init__(self, settings: ServerTlsSettings) -> None:
        self.settings = settings
        self._ca_pem = self._load_ca()
        loaded = [self._load(source) for source in settings.certificates]
        self._loaded: list[_Loaded] = loaded
        self._index = _build_index([entry.pair.info for entry in loaded])
        self._errors: dict[Path, str] = {}
        self._server_names: weakref.WeakKeyDictionary[ssl.SSLObject | ssl.SSLSocket, str] = (
            weakref.WeakKeyDictionary()
        )
        # The listening context: the default pair, plus the callback that picks the real one.
        front = build_server_context(settings, loaded[0].pair, self._ca_pem)
        front.sni_callback = self._on_server_name
        self.context = front
        """Pass to `loop.create_server(ssl=...)`."""

    def _load_ca(self) -> bytes | None:
        if self.settings.client_auth is ClientAuth.NONE or self.settings.client_ca_file is None:
            return None
        return load_ca_bundle(self.settings.client_ca_file)

    def _load(self, source: CertificateSource) -> _Loaded:
        pair = load_pair(source)
        return _Loaded(pair, build_server_context(self.settings, pair, self._ca_pem))

    # -- handshake -----------------------------------------------------------------------------
    def _on_server_name(
        self, ssl_obj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        if server_name:
            self._server_names[ssl_obj] = server_name
        ssl_obj.context = self._loaded[match_certificate(self._index, server_name)].context

    def requested_server_name(self, ssl_obj: ssl.SSLObject | ssl.SSLSocket | None) -> str:
        """The SNI name the client sent on this connection ("" when none)."""
        if ssl_obj is None:
            return ""
        return self._server_names.get(ssl_obj, "")

    def select(self, server_name: str | None) -> CertificateInfo:
        """The certificate a client asking for `server_name` gets."""
        return self._loaded[match_certificate(self._index, server_name)].pair.info

    # -- reporting -----------------------------------------------------------------------------
    @property
    def certificates(self) -> tuple[CertificateInfo, ...]:
        return tuple(entry.pair.info for entry in self._loaded)

    @property
    def errors(self) -> Mapping[Path, str]:
        """Certificate files whose latest version failed to load (the previous one runs)."""
        return dict(self._errors)

    def watched_paths(self) -> set[Path]:
        paths = {p for s in self.settings.certificates for p in (s.cert_file, s.key_file)}
        if self.settings.client_ca_file is not None:
            paths.add(self.settings.client_ca_file)
        return paths

    # -- reload --------------------------------------------------------------------------------
    def reload(self) -> list[CertificateReload]:
        """Re-read every file; swap in each pair that changed and validates, keep the rest.

        A changed CA bundle rebuilds every context (if it validates). Never raises for bad files.
        """
        ca_pem = self._ca_pem
        ca_changed = False
        if self.settings.client_ca_file is not None and ca_pem is not None:
            try:
                fresh_ca = load_ca_bundle(self.settings.client_ca_file)
            except CertificateError as exc:
                self._errors[self.settings.client_ca_file] = str(exc)
            else:
                ca_changed = fresh_ca != ca_pem
                ca_pem = fresh_ca
                self._errors.pop(self.settings.client_ca_file, None)
        results: list[CertificateReload] = []
        updated = list(self._loaded)
        for position, entry in enumerate(self._loaded):
            source = entry.pair.source
            try:
                pair = load_pair(source)
                if not ca_changed and pair.cert_pem == entry.pair.cert_pem and pair.key_pem == entry.pair.key_pem:
                    self._errors.pop(source.cert_file, None)
                    results.append(CertificateReload(source.cert_file, ReloadOutcome.UNCHANGED, info=entry.pair.info))
                    continue
                context = build_server_context(self.settings, pair, ca_pem)
            except (CertificateError, ValueError) as exc:
                self._errors[source.cert_file] = str(exc)
                results.append(
                    CertificateReload(source.cert_file, ReloadOutcome.FAILED, error=str(exc), info=entry.pair.info)
                )
                continue
            self._errors.pop(source.cert_file, None)
            updated[position] = _Loaded(pair, context)
            results.append(CertificateReload(source.cert_file, ReloadOutcome.RELOADED, info=pair.info))
        # Handshakes (and so the SNI callback) run on the loop thread: none sees a half-made update.
        self._ca_pem = ca_pem
        self._index = _build_index([entry.pair.info for entry in updated])
        self._loaded = updated
        return results
