"""The TLS parts of the config: listeners (`listen` as a list) and a cluster's `tls:` block.

Certificates are validated while the config loads (readable, PEM, the key matching, within their
validity period), so a bad pair is a config error naming the file and the reason, at the line of
its entry, like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..tls.certs import CertificateError, CertificateSource, load_ca_bundle, load_pair
from ..tls.client import ClientTlsSettings
from ..tls.server import ALPN_H2, ALPN_HTTP1, ClientAuth, ServerTlsSettings, TlsVersion
from .values import HostPort, not_bool

__all__ = ["CertificateConfig", "ClusterTlsConfig", "ListenerConfig", "ListenerHttp2Config", "ListenerTlsConfig",
           "RedirectConfig"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


def _resolve(value: Path, info: ValidationInfo) -> Path:
    # Relative to the config file, like filters_dir.
    context = info.context if isinstance(info.context, dict) else {}
    base = context.get("base_dir")
    return ((Path(base) if base is not None else Path(".")) / value).resolve()


def _check_ca(path: Path) -> Path:
    try:
        load_ca_bundle(path)
    except CertificateError as exc:
        raise ValueError(str(exc)) from None
    return path


class CertificateConfig(_Model):
    cert: Path
    key: Path
    names: list[str] = Field(default_factory=list)
    """SNI names (exact or `*.suffix`); empty: the certificate's DNS names."""

    @field_validator("cert", "key")
    @classmethod
    def _relative_to_config(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)

    @field_validator("names")
    @classmethod
    def _server_names(cls, names: list[str]) -> list[str]:
        for name in names:
            bare = name.removeprefix("*.")
            if not bare or "*" in bare or any(c.isspace() for c in name):
                raise ValueError(f"invalid server name {name!r} (exact, or '*.' and a suffix)")
        return [name.lower() for name in names]

    @property
    def source(self) -> CertificateSource:
        return CertificateSource(self.cert, self.key, tuple(self.names))

    @model_validator(mode="after")
    def _pair_loads(self) -> CertificateConfig:
        try:
            load_pair(self.source)
        except CertificateError as exc:
            raise ValueError(str(exc)) from None
        return self


class ListenerTlsConfig(_Model):
    certificates: list[CertificateConfig] = Field(min_length=1)
    """The first is the default (no SNI, or a name no certificate carries)."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    alpn: list[str] = Field(default_factory=lambda: [ALPN_HTTP1])
    client_auth: Literal["none", "optional", "required"] = "none"
    client_ca: Path | None = None
    ciphers: str | None = Field(default=None, min_length=1)

    @field_validator("client_ca")
    @classmethod
    def _ca(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _check_ca(_resolve(value, info))

    @field_validator("alpn")
    @classmethod
    def _alpn(cls, protocols: list[str]) -> list[str]:
        for proto in protocols:
            if proto not in (ALPN_H2, ALPN_HTTP1):
                raise ValueError(f"unknown ALPN protocol {proto!r} (known: h2, http/1.1)")
        if len(set(protocols)) != len(protocols):
            raise ValueError("a protocol is listed twice")
        return protocols

    @model_validator(mode="after")
    def _ca_when_verifying(self) -> ListenerTlsConfig:
        if self.client_auth != "none" and self.client_ca is None:
            raise ValueError(
                f"client_auth {self.client_auth} needs client_ca"
                " (the CA bundle client certificates are checked against)"
            )
        return self

    def settings(self) -> ServerTlsSettings:
        return ServerTlsSettings(
            certificates=tuple(c.source for c in self.certificates),
            min_version=TlsVersion(self.min_version),
            alpn=tuple(self.alpn),
            client_auth=ClientAuth(self.client_auth),
            client_ca_file=self.client_ca,
            ciphers=self.ciphers,
        )


class RedirectConfig(_Model):
    """`redirect:` on a plain listener: every request gets a redirect to https (redirect.py)."""

    https_port: Annotated[int, BeforeValidator(not_bool), Field(ge=1, le=65535)] = 443
    """The port in the https URL (left out when it is 443)."""
    status: Literal[301, 302, 307, 308] = 308
    """308 keeps the method and body; 301 is what nginx configs usually send (see docs/tls.md)."""


class ListenerHttp2Config(_Model):
    """A listener's HTTP/2 limits; a key left out keeps the codec's default (docs/http2.md)."""

    max_concurrent_streams: int | None = Field(default=None, ge=1, le=2**31 - 1)
    max_header_list_size: int | None = Field(default=None, ge=1024, le=2**31 - 1)
    initial_stream_window: int | None = Field(default=None, ge=65535, le=2**31 - 1)
    connection_window: int | None = Field(default=None, ge=65535, le=2**31 - 1)
    max_frame_size: int | None = Field(default=None, ge=16384, le=2**24 - 1)

    def overrides(self) -> dict[str, int]:
        """The limits set here, by `http2.events.H2Limits` field name."""
        return {name: value for name, value in self.model_dump().items() if value is not None}


class ListenerConfig(_Model):
    address: HostPort
    tls: ListenerTlsConfig | None = None
    redirect: RedirectConfig | None = None
    """A plain listener that answers every request with a redirect to https, no filters."""
    h2c: bool = False
    """A plain listener also takes prior-knowledge HTTP/2 (the client opens with the preface)."""
    http2: ListenerHttp2Config | None = None

    @model_validator(mode="after")
    def _checked(self) -> ListenerConfig:
        if self.redirect is not None and self.tls is not None:
            raise ValueError("redirect is for a plain listener (it sends clients to https): drop tls or redirect")
        if self.redirect is not None and self.h2c:
            raise ValueError("a redirect listener answers HTTP/1.1 only: drop h2c or redirect")
        if self.h2c and self.tls is not None:
            raise ValueError("h2c is for plain listeners; a TLS listener serves HTTP/2 with h2 in tls.alpn")
        if self.http2 is not None and not self.serves_http2:
            raise ValueError("http2: this listener serves no HTTP/2 (add h2 to tls.alpn, or h2c: true)")
        return self

    @property
    def serves_http2(self) -> bool:
        return self.h2c if self.tls is None else ALPN_H2 in self.tls.alpn

    @property
    def http2_overrides(self) -> dict[str, int]:
        """The `http2:` limits this listener sets (the rest keep the codec's defaults)."""
        return self.http2.overrides() if self.http2 is not None else {}

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}"


class ClusterTlsConfig(_Model):
    sni: str | None = Field(default=None, min_length=1)
    """Sent as SNI and checked against the certificate; default: the endpoint's host."""
    verify: bool = True
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @field_validator("ca_file")
    @classmethod
    def _ca(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _check_ca(_resolve(value, info))

    @field_validator("client_cert", "client_key")
    @classmethod
    def _paths(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    @model_validator(mode="after")
    def _client_pair(self) -> ClusterTlsConfig:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        source = self.client_source
        if source is not None:
            try:
                load_pair(source)
            except CertificateError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def client_source(self) -> CertificateSource | None:
        if self.client_cert is None or self.client_key is None:
            return None
        return CertificateSource(self.client_cert, self.client_key)

    def settings(self) -> ClientTlsSettings:
        return ClientTlsSettings(
            server_name=self.sni, verify=self.verify, ca_file=self.ca_file, client_certificate=self.client_source
        )
