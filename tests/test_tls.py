"""TLS termination: loading and validation, SNI, versions, mTLS, reload, upstream client contexts.

Real handshakes over loopback with certificates made at test time; `openssl s_client` where a
client behaviour Python's ssl will not produce is needed (TLS 1.1 only).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import trustme
import uvloop
from conftest import run
from prometheus_client import CollectorRegistry, generate_latest
from tlsutil import client_cert_with_uri, server_port, trusting, write_ca, write_pair

from sluice.proxy.tls.certs import CertificateError, CertificateSource, load_pair
from sluice.proxy.tls.client import ClientTlsSettings, build_client_context
from sluice.proxy.tls.connection import TlsConnectionInfo, tls_connection_info
from sluice.proxy.tls.export import EXPIRY_METRIC, CertificateExpiryCollector, certs_json
from sluice.proxy.tls.server import ClientAuth, ReloadOutcome, ServerTls, ServerTlsSettings, TlsVersion


class InfoProtocol(asyncio.Protocol):
    """Answers every connection with its TLS properties as one JSON line, then closes."""

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_obj = transport.get_extra_info("ssl_object")
        info = tls_connection_info(ssl_obj, self.tls.requested_server_name(ssl_obj))
        peer = ssl_obj.getpeercert(binary_form=True)
        body = {**info.properties(), "alpn": info.alpn, "cipher": info.cipher, "has_peer": peer is not None}
        cast(asyncio.Transport, transport).write(json.dumps(body).encode() + b"\n")
        cast(asyncio.Transport, transport).close()


@asynccontextmanager
async def tls_server(tls: ServerTls) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: InfoProtocol(tls), "127.0.0.1", 0, ssl=tls.context)
    try:
        yield await server_port(server)
    finally:
        server.close()
        await server.wait_closed()


async def fetch(port: int, ctx: ssl.SSLContext, server_hostname: str | None) -> tuple[dict[str, Any], bytes]:
    """Connect, read the JSON line; also the DER of the server certificate that was presented."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname, ssl_handshake_timeout=5
    )
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        if not line:
            raise ConnectionResetError("closed without an answer")
        return json.loads(line), der
    finally:
        writer.close()


def fp(der: bytes) -> str:
    import hashlib

    return hashlib.sha256(der).hexdigest().upper()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(tmp_path: Path, ca: trustme.CA) -> dict[str, CertificateSource]:
    return {
        "default": write_pair(tmp_path, ca.issue_cert("default.test"), "default"),
        "exact": write_pair(tmp_path, ca.issue_cert("api.example.test"), "exact"),
        "wild": write_pair(tmp_path, ca.issue_cert("*.example.test"), "wild"),
    }


# -- loading and validation ------------------------------------------------------------------


def test_load_pair_describes_the_certificate(certs: dict[str, CertificateSource], ca: trustme.CA) -> None:
    pair = load_pair(certs["wild"])
    info = pair.info
    assert info.names == ("*.example.test",)
    assert info.dns_names == ("*.example.test",)
    assert info.chain_length == 1
    assert "O=trustme" in info.issuer
    assert info.expires_in() > 86400
    assert len(info.fingerprint_sha256) == 64
    doc = info.to_json()
    assert doc["names"] == ["*.example.test"] and doc["not_after"] == info.not_after.isoformat()


def test_configured_names_override_the_certificate_names(tmp_path: Path, ca: trustme.CA) -> None:
    source = write_pair(tmp_path, ca.issue_cert("a.test"), "a", names=("Other.Test",))
    assert load_pair(source).info.names == ("other.test",)


def test_unreadable_files_name_the_file(tmp_path: Path, certs: dict[str, CertificateSource]) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(CertificateError) as err:
        load_pair(CertificateSource(missing, certs["default"].key_file))
    assert err.value.path == missing and "cannot read the certificate file" in str(err.value)
    assert str(missing) in str(err.value)


def test_garbage_certificate_and_key(tmp_path: Path, certs: dict[str, CertificateSource]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(CertificateError, match="holds no certificate|not PEM certificates"):
        load_pair(CertificateSource(junk, certs["default"].key_file))
    with pytest.raises(CertificateError, match="not a PEM private key") as err:
        load_pair(CertificateSource(certs["default"].cert_file, junk))
    assert err.value.path == junk


def test_mismatched_key_is_refused(certs: dict[str, CertificateSource]) -> None:
    with pytest.raises(CertificateError, match="does not belong to the certificate") as err:
        load_pair(CertificateSource(certs["default"].cert_file, certs["exact"].key_file))
    assert err.value.path == certs["exact"].key_file


def test_expired_and_not_yet_valid_are_refused(tmp_path: Path, ca: trustme.CA) -> None:
    now = datetime.datetime.now(datetime.UTC)
    old = write_pair(
        tmp_path,
        ca.issue_cert("old.test", not_before=now - datetime.timedelta(days=10), not_after=now - datetime.timedelta(1)),
        "old",
    )
    with pytest.raises(CertificateError, match="expired on") as err:
        load_pair(old)
    assert err.value.path == old.cert_file
    future = write_pair(tmp_path, ca.issue_cert("f.test", not_before=now + datetime.timedelta(days=1)), "future")
    with pytest.raises(CertificateError, match="not valid before"):
        load_pair(future)
    with pytest.raises(CertificateError, match="expired on"):
        ServerTls(ServerTlsSettings((old,)))


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one certificate"):
        ServerTlsSettings(())
    src = CertificateSource(Path("a"), Path("b"))
    with pytest.raises(ValueError, match="needs client_ca_file"):
        ServerTlsSettings((src,), client_auth=ClientAuth.REQUIRED)
    with pytest.raises(ValueError, match="unknown ALPN"):
        ServerTlsSettings((src,), alpn=("spdy/3",))


def test_bad_cipher_list_is_a_clear_error(certs: dict[str, CertificateSource]) -> None:
    with pytest.raises(ValueError, match="no usable cipher"):
        ServerTls(ServerTlsSettings((certs["default"],), ciphers="NOT-A-CIPHER"))


# -- SNI ---------------------------------------------------------------------------------------


def sni_server_settings(certs: dict[str, CertificateSource]) -> ServerTlsSettings:
    return ServerTlsSettings((certs["default"], certs["exact"], certs["wild"]))


def test_select_prefers_exact_then_wildcard_then_default(certs: dict[str, CertificateSource]) -> None:
    tls = ServerTls(sni_server_settings(certs))
    default, exact, wild = (load_pair(certs[k]).info.fingerprint_sha256 for k in ("default", "exact", "wild"))
    assert tls.select("api.example.test").fingerprint_sha256 == exact
    assert tls.select("API.Example.Test.").fingerprint_sha256 == exact
    assert tls.select("www.example.test").fingerprint_sha256 == wild
    assert tls.select("a.b.example.test").fingerprint_sha256 == default  # a wildcard covers one label
    assert tls.select("example.test").fingerprint_sha256 == default
    assert tls.select(None).fingerprint_sha256 == default


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sni_chooses_the_certificate_in_real_handshakes(
    loop: str, certs: dict[str, CertificateSource], ca: trustme.CA
) -> None:
    tls = ServerTls(sni_server_settings(certs))
    expected = {k: load_pair(v).info.fingerprint_sha256 for k, v in certs.items()}

    async def body() -> None:
        async with tls_server(tls) as port:
            ctx = trusting(ca, ["h2", "http/1.1"])
            info, der = await fetch(port, ctx, "api.example.test")
            assert fp(der) == expected["exact"]
            assert info["requested_server_name"] == "api.example.test"
            assert info["tls_version"] == "TLSv1.3" and info["alpn"] == "h2" and info["mtls"] is False
            info, der = await fetch(port, ctx, "www.example.test")
            assert fp(der) == expected["wild"] and info["requested_server_name"] == "www.example.test"
            info, der = await fetch(port, ctx, "default.test")
            assert fp(der) == expected["default"]
            # No SNI at all (an IP as server_hostname sends none): the default certificate.
            plain = trusting(ca)
            plain.check_hostname = False
            info, der = await fetch(port, plain, None)
            assert fp(der) == expected["default"] and info["requested_server_name"] == ""
            assert info["alpn"] == ""

    if loop == "uvloop":
        uvloop.run(asyncio.wait_for(body(), 30))
    else:
        run(body())


async def s_client(port: int, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-ign_eof",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    return proc.returncode or 0, out.decode(errors="replace")


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")


@needs_openssl
def test_openssl_s_client_sni_and_old_versions(certs: dict[str, CertificateSource]) -> None:
    tls = ServerTls(sni_server_settings(certs))

    async def body() -> None:
        async with tls_server(tls) as port:
            code, out = await s_client(port, "-servername", "www.example.test")
            assert code == 0 and '"requested_server_name": "www.example.test"' in out, out
            assert '"tls_version": "TLSv1.3"' in out
            # A client offering only TLS 1.1 (or 1.0) is refused at the handshake.
            for version in ("-tls1_1", "-tls1"):
                code, out = await s_client(port, version, "-cipher", "DEFAULT@SECLEVEL=0")
                assert code != 0, out
                assert "tls_version" not in out, out
                # The server answers a TLS 1.1 hello with a protocol_version alert and drops a
                # TLS 1.0 one (OpenSSL 3 no longer parses it far enough to alert).
                assert "alert protocol version" in out or "unexpected eof" in out, out
            # TLS 1.2 is still accepted by default.
            code, out = await s_client(port, "-tls1_2", "-servername", "api.example.test")
            assert code == 0 and '"tls_version": "TLSv1.2"' in out, out

    run(body())


@needs_openssl
def test_minimum_version_1_3_refuses_1_2(certs: dict[str, CertificateSource]) -> None:
    tls = ServerTls(ServerTlsSettings((certs["default"],), min_version=TlsVersion.TLS1_3))

    async def body() -> None:
        async with tls_server(tls) as port:
            code, out = await s_client(port, "-tls1_2")
            assert code != 0 and "tls_version" not in out
            code, out = await s_client(port, "-tls1_3")
            assert code == 0 and "TLSv1.3" in out

    run(body())


# -- downstream mTLS ---------------------------------------------------------------------------


def client_context(ca: trustme.CA, cert: CertificateSource | None) -> ssl.SSLContext:
    ctx = trusting(ca)
    if cert is not None:
        ctx.load_cert_chain(cert.cert_file, cert.key_file)
    return ctx


async def refused(port: int, ctx: ssl.SSLContext, name: str) -> str:
    """The handshake or the first read fails (TLS 1.3 clients learn of a rejected certificate only
    when they read); returns the error text."""
    try:
        info, _ = await fetch(port, ctx, name)
    except (ssl.SSLError, ConnectionResetError, OSError) as exc:
        return str(exc)
    raise AssertionError(f"served: {info}")


def test_mtls_required(tmp_path: Path, certs: dict[str, CertificateSource], ca: trustme.CA) -> None:
    tls = ServerTls(
        ServerTlsSettings(
            (certs["default"], certs["exact"]), client_auth=ClientAuth.REQUIRED, client_ca_file=write_ca(tmp_path, ca)
        )
    )
    good = client_cert_with_uri(ca, tmp_path, "client", "svc-a", "spiffe://example.test/ns/a/sa/svc-a")
    other_ca = trustme.CA()
    stranger = write_pair(tmp_path, other_ca.issue_cert("svc-b", common_name="svc-b"), "stranger")

    async def body() -> None:
        async with tls_server(tls) as port:
            info, _ = await fetch(port, client_context(ca, good), "api.example.test")
            assert info["mtls"] is True
            assert info["subject_peer_certificate"] == "CN=svc-a,O=Sluice Tests"
            assert info["uri_san_peer_certificate"] == "spiffe://example.test/ns/a/sa/svc-a"
            assert len(info["sha256_peer_certificate_digest"]) == 64
            # Verification holds after SNI moved the handshake to another certificate's context.
            await refused(port, client_context(ca, None), "api.example.test")
            await refused(port, client_context(ca, stranger), "api.example.test")
            await refused(port, client_context(ca, stranger), "default.test")
            # And the listener keeps serving after the refusals.
            info, _ = await fetch(port, client_context(ca, good), "default.test")
            assert info["mtls"] is True

    run(body())


def test_mtls_optional(tmp_path: Path, certs: dict[str, CertificateSource], ca: trustme.CA) -> None:
    tls = ServerTls(
        ServerTlsSettings((certs["default"],), client_auth=ClientAuth.OPTIONAL, client_ca_file=write_ca(tmp_path, ca))
    )
    good = write_pair(tmp_path, ca.issue_cert("client.test", common_name="client"), "client")
    stranger = write_pair(tmp_path, trustme.CA().issue_cert("svc-b"), "stranger")

    async def body() -> None:
        async with tls_server(tls) as port:
            info, _ = await fetch(port, client_context(ca, None), "default.test")
            assert info["mtls"] is False and info["subject_peer_certificate"] == ""
            info, _ = await fetch(port, client_context(ca, good), "default.test")
            assert info["mtls"] is True and "CN=client" in info["subject_peer_certificate"]
            # Optional still verifies what is sent: a certificate from another CA is refused.
            await refused(port, client_context(ca, stranger), "default.test")

    run(body())


# -- reload ------------------------------------------------------------------------------------


def test_reload_swaps_valid_pairs_and_keeps_running_ones_on_error(
    tmp_path: Path, certs: dict[str, CertificateSource], ca: trustme.CA
) -> None:
    tls = ServerTls(sni_server_settings(certs))
    before = {k: load_pair(v).info.fingerprint_sha256 for k, v in certs.items()}

    async def body() -> None:
        async with tls_server(tls) as port:
            ctx = trusting(ca)
            assert all(r.outcome is ReloadOutcome.UNCHANGED for r in tls.reload())
            # A new wildcard certificate and a new default one (which the listening context holds).
            write_pair(tmp_path, ca.issue_cert("*.example.test"), "wild")
            write_pair(tmp_path, ca.issue_cert("default.test"), "default")
            outcomes = {r.cert_file.stem: r.outcome for r in tls.reload()}
            assert outcomes == {
                "default": ReloadOutcome.RELOADED,
                "exact": ReloadOutcome.UNCHANGED,
                "wild": ReloadOutcome.RELOADED,
            }
            _, der = await fetch(port, ctx, "www.example.test")
            new_wild = fp(der)
            assert new_wild != before["wild"] and new_wild == load_pair(certs["wild"]).info.fingerprint_sha256
            _, der = await fetch(port, ctx, "default.test")
            assert fp(der) != before["default"]
            # A broken pair: a key that belongs to another certificate. The running one stays.
            certs["exact"].key_file.write_bytes(certs["wild"].key_file.read_bytes())
            (result,) = (r for r in tls.reload() if r.cert_file == certs["exact"].cert_file)
            assert result.outcome is ReloadOutcome.FAILED
            assert result.error is not None and "does not belong" in result.error
            assert str(certs["exact"].key_file) in result.error
            assert result.info is not None and result.info.fingerprint_sha256 == before["exact"]
            assert tls.errors == {certs["exact"].cert_file: result.error}
            _, der = await fetch(port, ctx, "api.example.test")
            assert fp(der) == before["exact"]
            doc = certs_json({"https": tls})
            listener = cast(list[dict[str, Any]], doc["listeners"])[0]
            assert listener["errors"] == {str(certs["exact"].cert_file): result.error}
            assert [c["default"] for c in listener["certificates"]] == [True, False, False]
            # Fixing the files clears the error on the next reload.
            write_pair(tmp_path, ca.issue_cert("api.example.test"), "exact")
            assert ReloadOutcome.RELOADED in {r.outcome for r in tls.reload()}
            assert tls.errors == {}
            _, der = await fetch(port, ctx, "api.example.test")
            assert fp(der) != before["exact"]

    run(body())


def test_watched_paths(tmp_path: Path, certs: dict[str, CertificateSource], ca: trustme.CA) -> None:
    ca_file = write_ca(tmp_path, ca)
    tls = ServerTls(
        ServerTlsSettings((certs["default"],), client_auth=ClientAuth.OPTIONAL, client_ca_file=ca_file)
    )
    assert tls.watched_paths() == {certs["default"].cert_file, certs["default"].key_file, ca_file}


def test_expiry_gauge_counts_down(certs: dict[str, CertificateSource]) -> None:
    tls = ServerTls(sni_server_settings(certs))
    info = tls.certificates[1]
    moment = info.not_after - datetime.timedelta(seconds=1234)
    registry = CollectorRegistry()
    registry.register(CertificateExpiryCollector(lambda: [("https", tls)], clock=lambda: moment))
    text = generate_latest(registry).decode()
    line = next(ln for ln in text.splitlines() if ln.startswith(EXPIRY_METRIC) and "exact.crt" in ln)
    assert line.endswith(" 1234.0"), line
    assert 'listener="https"' in line
    assert sum(1 for ln in text.splitlines() if ln.startswith(EXPIRY_METRIC + "{")) == 3


# -- upstream client contexts ------------------------------------------------------------------


def upstream_check(
    tmp_path: Path, ca: trustme.CA, certs: dict[str, CertificateSource], settings: Callable[[Path], ClientTlsSettings]
) -> dict[str, Any]:
    client_ca = write_ca(tmp_path, ca, "clients")
    tls = ServerTls(
        ServerTlsSettings((certs["exact"],), client_auth=ClientAuth.OPTIONAL, client_ca_file=client_ca)
    )
    client = settings(write_ca(tmp_path, ca))
    ctx = build_client_context(client)

    async def body() -> dict[str, Any]:
        async with tls_server(tls) as port:
            info, _ = await fetch(port, ctx, client.server_hostname("127.0.0.1"))
            return info

    return run(body())


def test_upstream_verifies_against_a_ca_file(
    tmp_path: Path, ca: trustme.CA, certs: dict[str, CertificateSource]
) -> None:
    info = upstream_check(
        tmp_path, ca, certs, lambda ca_file: ClientTlsSettings(server_name="api.example.test", ca_file=ca_file)
    )
    assert info["requested_server_name"] == "api.example.test" and info["mtls"] is False


def test_upstream_refuses_an_untrusted_or_misnamed_certificate(
    tmp_path: Path, ca: trustme.CA, certs: dict[str, CertificateSource]
) -> None:
    # The system store does not know the test CA.
    with pytest.raises(ssl.SSLCertVerificationError):
        upstream_check(tmp_path, ca, certs, lambda _: ClientTlsSettings(server_name="api.example.test"))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch|match"):
        upstream_check(
            tmp_path, ca, certs, lambda ca_file: ClientTlsSettings(server_name="other.test", ca_file=ca_file)
        )
    info = upstream_check(tmp_path, ca, certs, lambda _: ClientTlsSettings(server_name="other.test", verify=False))
    assert info["requested_server_name"] == "other.test"


def test_upstream_mtls_presents_the_client_certificate(
    tmp_path: Path, ca: trustme.CA, certs: dict[str, CertificateSource]
) -> None:
    mine = write_pair(tmp_path, ca.issue_cert("sluice.test", common_name="sluice"), "mine")
    info = upstream_check(
        tmp_path,
        ca,
        certs,
        lambda ca_file: ClientTlsSettings(server_name="api.example.test", ca_file=ca_file, client_certificate=mine),
    )
    assert info["mtls"] is True and info["subject_peer_certificate"].startswith("CN=sluice")
    # A broken client pair is a clear error before any connection.
    broken = CertificateSource(mine.cert_file, certs["exact"].key_file)
    with pytest.raises(CertificateError, match="does not belong"):
        build_client_context(ClientTlsSettings(client_certificate=broken))


def test_client_side_connection_info(tmp_path: Path, ca: trustme.CA, certs: dict[str, CertificateSource]) -> None:
    tls = ServerTls(ServerTlsSettings((certs["exact"],)))
    ctx = build_client_context(
        ClientTlsSettings(server_name="api.example.test", ca_file=write_ca(tmp_path, ca), alpn=("h2",))
    )

    async def body() -> TlsConnectionInfo:
        async with tls_server(tls) as port:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="api.example.test"
            )
            info = tls_connection_info(writer.get_extra_info("ssl_object"))
            await reader.read()
            writer.close()
            return info

    info = run(body())
    # `upstream.tls_version` for filters; the client side is not mTLS from its own point of view.
    assert info.tls_version == "TLSv1.3" and info.alpn == "h2" and info.mtls is False
    assert info.requested_server_name == "api.example.test"
    assert "O=trustme" in info.subject_peer_certificate  # the upstream's certificate, seen from the client


# -- handshake failures are counted ------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_acceptor_counts_failed_handshakes_and_keeps_serving(
    loop: str, tmp_path: Path, certs: dict[str, CertificateSource], ca: trustme.CA
) -> None:
    from sluice.proxy.tls.acceptor import HandshakeStats, TlsAcceptor

    tls = ServerTls(
        ServerTlsSettings((certs["default"],), client_auth=ClientAuth.REQUIRED, client_ca_file=write_ca(tmp_path, ca))
    )
    good = write_pair(tmp_path, ca.issue_cert("client.test", common_name="client"), "client")
    stranger = write_pair(tmp_path, trustme.CA().issue_cert("svc-b"), "stranger")
    stats = HandshakeStats()

    async def body() -> None:
        running = asyncio.get_running_loop()
        server = await running.create_server(
            lambda: TlsAcceptor(tls, lambda: InfoProtocol(tls), stats, handshake_timeout=0.5), "127.0.0.1", 0
        )
        port = await server_port(server)
        try:
            info, _ = await fetch(port, client_context(ca, good), "default.test")
            assert info["mtls"] is True
            await refused(port, client_context(ca, None), "default.test")
            await refused(port, client_context(ca, stranger), "default.test")
            # Plain HTTP to the TLS port.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            # A client that connects and says nothing.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            if shutil.which("openssl"):
                code, out = await s_client(port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
                assert code != 0
            info, _ = await fetch(port, client_context(ca, good), "default.test")
            assert info["mtls"] is True
            for _ in range(50):
                if sum(stats.failed.values()) >= (6 if shutil.which("openssl") else 5):
                    break
                await asyncio.sleep(0.02)
        finally:
            server.close()
            await server.wait_closed()

    if loop == "uvloop":
        uvloop.run(asyncio.wait_for(body(), 30))
    else:
        run(body())
    assert stats.completed == 2
    failed = dict(stats.failed)
    assert failed.get("timeout") == 1, failed
    assert failed.get("HTTP_REQUEST") == 1, failed
    assert failed.get("PEER_DID_NOT_RETURN_A_CERTIFICATE") == 1, failed
    assert failed.get("CERTIFICATE_VERIFY_FAILED") == 1, failed
    if shutil.which("openssl"):
        assert failed.get("UNSUPPORTED_PROTOCOL") == 1, failed
    from sluice.proxy.tls.export import HandshakeCollector

    registry = CollectorRegistry()
    registry.register(HandshakeCollector(lambda: [("https", stats)]))
    text = generate_latest(registry).decode()
    assert 'sluice_tls_handshakes_total{listener="https"} 2.0' in text
    assert 'sluice_tls_handshake_failures_total{listener="https",reason="CERTIFICATE_VERIFY_FAILED"} 1.0' in text
