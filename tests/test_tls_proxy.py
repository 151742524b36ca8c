"""TLS wired into the proxy: listeners in the config, HTTPS termination for HTTP/1.1, the
`connection.*` properties a filter reads, handshake failures counted, certificate reload.

Everything over loopback with certificates made at test time (trustme); a WAT filter
(fixtures/wat/tls_props.wat) copies the properties into headers the echo upstream sends back.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import shutil
import ssl
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import wasmtime
from conftest import ROOT, make_config, run, upstream, wait_for
from tlsutil import client_cert_with_uri, trusting, write_ca, write_pair

from sluice.proxy.app import Gateway
from sluice.proxy.config import ConfigError, parse_config

WAT = ROOT / "tests" / "fixtures" / "wat" / "tls_props.wat"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(tmp_path: Path, ca: trustme.CA) -> Path:
    """Server pairs, a client CA, client certificates (one from another CA), the props filter."""
    write_pair(tmp_path, ca.issue_cert("localhost", "api.example.test"), "server")
    write_pair(tmp_path, ca.issue_cert("*.other.test"), "other")
    client_ca = trustme.CA()
    write_ca(tmp_path, client_ca, "client-ca")
    client_cert_with_uri(client_ca, tmp_path, "client", "alice", "spiffe://example.test/alice")
    client_cert_with_uri(trustme.CA(), tmp_path, "stranger", "mallory", "spiffe://evil.test/mallory")
    (tmp_path / "props.wasm").write_bytes(wasmtime.wat2wasm(WAT.read_text()))
    return tmp_path


def tls_config(up: str, tls: str = "", second: str = "") -> str:
    return f"""
    listen:
      - address: 127.0.0.1:0
        tls:
          certificates:
            - {{cert: server.crt, key: server.key}}
            - {{cert: other.crt, key: other.key}}
          {tls}
      {second}
    access_log: null
    filters_dir: .
    clusters:
      web: {{endpoints: ["{up}"]}}
    chain:
      - {{name: props, module: props.wasm}}
    routes:
      - match: {{prefix: /}}
        cluster: web
    """


@asynccontextmanager
async def gateway(text: str, base: Path) -> AsyncIterator[Gateway]:
    gw = Gateway(make_config(text, base))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(drain_timeout=5.0)


def client_ctx(ca: trustme.CA, cert: Path | None = None) -> ssl.SSLContext:
    ctx = trusting(ca)
    if cert is not None:
        ctx.load_cert_chain(cert.with_suffix(".crt"), cert.with_suffix(".key"))
    return ctx


async def echo(port: int, ctx: ssl.SSLContext, host: str = "localhost") -> tuple[dict[str, str], dict[str, str]]:
    """GET /anything over TLS with `host` as SNI: (request headers upstream saw, response headers)."""
    connector = aiohttp.TCPConnector(ssl=ctx, resolver=_Loopback())
    async with aiohttp.ClientSession(connector=connector) as s, s.get(f"https://{host}:{port}/anything") as r:
        assert r.status == 200, await r.text()
        body = json.loads(await r.text())
        return {k.lower(): v for k, v in body["headers"]}, {k.lower(): v for k, v in r.headers.items()}


async def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """One connection (one handshake), one request: True if no response came."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    except (ssl.SSLError, ConnectionError):
        return True
    return not data


class _Loopback(aiohttp.abc.AbstractResolver):
    """Every name is 127.0.0.1, so a test can send any SNI name to the loopback listener."""

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[Any]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": 2, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


# -- config ----------------------------------------------------------------------------------------


def config_error(text: str, base: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="t.yaml", base_dir=base)
    return info.value.errors


def test_listen_as_a_list_of_listeners(files: Path) -> None:
    config = parse_config(
        "listen:\n  - address: 127.0.0.1:8443\n    tls: {certificates: [{cert: server.crt, key: server.key,"
        " names: ['API.example.test']}], min_version: '1.3', client_auth: optional, client_ca: client-ca.pem}\n"
        "  - {address: 127.0.0.1:8080}\n",
        base_dir=files,
    )
    tls_listener, plain = config.listeners
    assert str(tls_listener) == "https://127.0.0.1:8443" and str(plain) == "http://127.0.0.1:8080"
    assert tls_listener.tls is not None and plain.tls is None
    settings = tls_listener.tls.settings()
    assert settings.certificates[0].cert_file == files / "server.crt"
    assert settings.certificates[0].names == ("api.example.test",)
    assert settings.client_ca_file == files / "client-ca.pem" and settings.min_version.value == "1.3"
    # One address stays what it was.
    single = parse_config("listen: 127.0.0.1:8080\n", base_dir=files)
    assert [str(x) for x in single.listeners] == ["http://127.0.0.1:8080"]


def test_bad_certificates_are_config_errors_with_file_and_line(files: Path, ca: trustme.CA) -> None:
    now = datetime.datetime.now(datetime.UTC)
    expired = ca.issue_cert("old.test", not_after=now - datetime.timedelta(days=1),
                            not_before=now - datetime.timedelta(days=30))
    write_pair(files, expired, "expired")
    errors = config_error(
        "access_log: null\nlisten:\n  - address: 127.0.0.1:0\n    tls:\n      certificates:\n"
        "        - {cert: server.crt, key: server.key}\n"
        "        - {cert: expired.crt, key: expired.key}\n"
        "        - {cert: server.crt, key: other.key}\n"
        "        - {cert: missing.crt, key: server.key}\n",
        files,
    )
    assert len(errors) == 3, errors
    assert errors[0].startswith("t.yaml:7: listen[0].tls.certificates[1]: ")
    assert f"{files / 'expired.crt'}: the certificate expired on" in errors[0]
    assert errors[1].startswith("t.yaml:8: listen[0].tls.certificates[2]: ")
    assert f"{files / 'other.key'}: the private key does not belong to the certificate" in errors[1]
    assert errors[2].startswith("t.yaml:9: listen[0].tls.certificates[3]: ")
    assert f"{files / 'missing.crt'}: cannot read the certificate file" in errors[2]


def test_tls_config_mistakes_are_named(files: Path) -> None:
    errors = config_error(
        "listen:\n  - address: 127.0.0.1:0\n    tls: {certificates: [{cert: server.crt, key: server.key}],"
        " client_auth: required}\n  - {address: nope}\n"
        "clusters:\n  web: {endpoints: ['127.0.0.1:1'], tls: {ca_file: server.key}, protocol: http2}\n",
        files,
    )
    assert errors[0] == (
        "t.yaml:3: listen[0].tls: client_auth required needs client_ca (the CA bundle client certificates "
        "are checked against)"
    )
    assert errors[1].startswith("t.yaml:4: listen[1].address: expected host:port")
    assert any(e.startswith("t.yaml:6: clusters.web.tls.ca_file: ") and "the CA file is not PEM" in e
               or "holds no certificate" in e for e in errors), errors
    assert not any("protocol" in e for e in errors), errors  # http2 upstreams are wired


# -- termination -----------------------------------------------------------------------------------


def test_https_request_properties_and_forwarded_proto(files: Path, ca: trustme.CA) -> None:
    async def main() -> None:
        async with upstream() as up, gateway(
            tls_config(up, second="- {address: 127.0.0.1:0}"), files
        ) as gw:
            tls_port, plain_port = (port for _, port in gw.addresses)
            seen, _ = await echo(tls_port, client_ctx(ca), "api.example.test")
            assert seen["x-forwarded-proto"] == "https"
            assert seen["x-prop-0"] in ("TLSv1.3", "TLSv1.2")
            assert seen["x-prop-1"] == "api.example.test"
            assert seen["x-prop-2"] == "0"  # no client certificate
            assert seen["x-prop-3"] == "" and seen["x-prop-4"] == ""
            assert seen["x-prop-5"] == "HTTP/1.1" and seen["x-prop-6"] == "https"
            # The same proxy's plain listener: http, no TLS properties.
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{plain_port}/anything") as r:
                headers = {k.lower(): v for k, v in json.loads(await r.text())["headers"]}
            assert headers["x-forwarded-proto"] == "http"
            assert headers["x-prop-0"] == "<missing>" and headers["x-prop-1"] == "<missing>"
            assert headers["x-prop-2"] == "0" and headers["x-prop-6"] == "http"
            (listener,) = gw.server.tls_listeners
            assert listener.handshakes.completed >= 1 and not listener.handshakes.failed

    run(main())


def test_sni_picks_the_wildcard_certificate(files: Path, ca: trustme.CA) -> None:
    async def main() -> None:
        async with upstream() as up, gateway(tls_config(up), files) as gw:
            seen, _ = await echo(gw.port, client_ctx(ca), "www.other.test")
            assert seen["x-prop-1"] == "www.other.test"

    run(main())


def test_mtls_required_properties_and_refusals_counted(files: Path, ca: trustme.CA) -> None:
    tls = "client_auth: required\n          client_ca: client-ca.pem"

    async def main() -> None:
        async with upstream() as up, gateway(tls_config(up, tls), files) as gw:
            seen, _ = await echo(gw.port, client_ctx(ca, files / "client"))
            assert seen["x-prop-2"] == "1"
            assert seen["x-prop-3"] == "CN=alice,O=Sluice Tests"
            assert seen["x-prop-4"] == "spiffe://example.test/alice"
            for cert in (None, files / "stranger"):
                assert await refused(gw.port, client_ctx(ca, cert))
            failed = gw.server.tls_listeners[0].handshakes.failed
            await wait_for(lambda: sum(failed.values()) == 2)
            assert failed["PEER_DID_NOT_RETURN_A_CERTIFICATE"] == 1, failed
            assert failed["CERTIFICATE_VERIFY_FAILED"] == 1 or failed["TLSV1_ALERT_UNKNOWN_CA"] == 1, failed
            # A TLS 1.0-only client is refused and counted; others keep being served.
            old = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-connect", f"127.0.0.1:{gw.port}", "-tls1", "-cipher", "DEFAULT@SECLEVEL=0",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            await asyncio.wait_for(old.communicate(), 10)
            assert old.returncode != 0
            await wait_for(lambda: failed["UNSUPPORTED_PROTOCOL"] == 1)
            seen, _ = await echo(gw.port, client_ctx(ca, files / "client"))
            assert seen["x-prop-2"] == "1"

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    run(main())


# -- certificate reload, /certs, /stats ------------------------------------------------------------


async def served_fingerprint(port: int, ca: trustme.CA) -> str:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(ca), server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return hashlib.sha256(der).hexdigest().upper()


def test_certificates_hot_reload_with_admin_certs_and_stats(files: Path, ca: trustme.CA) -> None:
    from sluice.proxy.admin import AdminServer
    from sluice.proxy.config import load_config

    async def main() -> None:
        async with upstream() as up:
            path = files / "sluice.yaml"
            path.write_text(textwrap.dedent(tls_config(up)))
            gw = Gateway(load_config(path))
            await gw.start()
            admin = AdminServer(gw)
            await admin.start("127.0.0.1", 0)
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"http://127.0.0.1:{admin.port}/certs") as r:
                        body = await r.json()
                    (listener,) = body["listeners"]
                    assert listener["listener"] == f"127.0.0.1:{gw.port}" and listener["errors"] == {}
                    first, second = listener["certificates"]
                    assert first["names"] == ["localhost", "api.example.test"] and first["default"] is True
                    assert second["names"] == ["*.other.test"]
                    assert first["expires_in_seconds"] > 0
                    before = await served_fingerprint(gw.port, ca)
                    assert before == first["fingerprint_sha256"]

                    # A new pair written in place is picked up by the watcher.
                    fresh = write_pair(files, ca.issue_cert("localhost", "new.example.test"), "server")
                    await wait_until_served(gw.port, ca, lambda fp: fp != before)
                    assert gw.tls_listeners()[0].tls.certificates[0].names == ("localhost", "new.example.test")
                    running = await served_fingerprint(gw.port, ca)

                    # A broken pair keeps the running one; the error shows in /certs.
                    fresh.key_file.write_bytes(b"not a key\n")
                    await wait_for(lambda: bool(gw.tls_listeners()[0].tls.errors))
                    assert await served_fingerprint(gw.port, ca) == running
                    async with s.get(f"http://127.0.0.1:{admin.port}/certs") as r:
                        errors = (await r.json())["listeners"][0]["errors"]
                    assert "not a PEM private key" in errors[str(files / "server.crt")]
                    seen, _ = await echo(gw.port, client_ctx(ca))
                    assert seen["x-forwarded-proto"] == "https"

                    async with s.get(f"http://127.0.0.1:{admin.port}/stats") as r:
                        stats = await r.text()
                    label = f'listener="127.0.0.1:{gw.port}"'
                    expiry = [line for line in stats.splitlines()
                              if line.startswith("sluice_tls_certificate_expiry_seconds{") and "server.crt" in line]
                    assert len(expiry) == 1 and label in expiry[0] and float(expiry[0].split()[-1]) > 0, stats
                    handshakes = [ln for ln in stats.splitlines() if ln.startswith("sluice_tls_handshakes_total{")]
                    assert handshakes and label in handshakes[0] and float(handshakes[0].split()[-1]) >= 4
            finally:
                await admin.stop()
                await gw.stop(drain_timeout=5.0)

    run(main())


async def wait_until_served(port: int, ca: trustme.CA, ok: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ok(await served_fingerprint(port, ca)):
        if loop.time() > deadline:
            raise AssertionError("the new certificate was not served in time")
        await asyncio.sleep(0.05)


# -- upstream TLS ----------------------------------------------------------------------------------


@asynccontextmanager
async def tls_upstream(ctx: ssl.SSLContext) -> AsyncIterator[str]:
    """The demo echo upstream behind TLS; yields "127.0.0.1:port"."""
    from aiohttp import web
    from demo_upstream import create_app

    runner = web.AppRunner(create_app("secure"), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    server = site._server  # noqa: SLF001 - the bound port is only known here
    assert server is not None and server.sockets
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


def upstream_config(up: str, tls: str) -> str:
    return f"""
    listen: 127.0.0.1:0
    access_log: null
    filters_dir: .
    clusters:
      web: {{endpoints: ["{up}"], tls: {tls}}}
    chain:
      - {{name: props, module: props.wasm}}
    routes:
      - match: {{prefix: /}}
        cluster: web
    """


def test_upstream_tls_with_sni_verification_and_client_certificate(files: Path, ca: trustme.CA) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("backend.internal").configure_cert(server_ctx)
    # The upstream asks for a client certificate from the client CA (mTLS towards the upstream).
    server_ctx.load_verify_locations(files / "client-ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    write_ca(files, ca, "server-ca")

    async def get(gw: Gateway) -> tuple[int, dict[str, str], str]:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.port}/anything") as r:
            text = await r.text()
            return r.status, {k.lower(): v for k, v in r.headers.items()}, text

    async def main() -> None:
        async with tls_upstream(server_ctx) as up:
            good = "{sni: backend.internal, ca_file: server-ca.pem, client_cert: client.crt, client_key: client.key}"
            async with gateway(upstream_config(up, good), files) as gw:
                status, headers, text = await get(gw)
                assert status == 200, text
                assert json.loads(text)["upstream"] == "secure"
                assert headers["x-prop-7"] in ("TLSv1.3", "TLSv1.2")
            # Verification is on by default: the system store does not know the test CA.
            async with gateway(upstream_config(up, "{sni: backend.internal}"), files) as gw:
                status, _, text = await get(gw)
                assert status == 502 and "upstream connect error" in text
                assert gw.generation.clusters["web"].connect_failures == 1
            # The wrong name is refused too.
            async with gateway(upstream_config(up, "{sni: other.internal, ca_file: server-ca.pem}"), files) as gw:
                status, _, _ = await get(gw)
                assert status == 502
        # A plain upstream: no upstream.tls_version.
        async with upstream() as plain, gateway(upstream_config(plain, "null"), files) as gw:
            status, headers, _ = await get(gw)
            assert status == 200 and headers["x-prop-7"] == "<missing>"

    run(main())


# -- the auth filter by client certificate ---------------------------------------------------------


def test_auth_filter_by_client_certificate_subject_and_uri_san(files: Path, ca: trustme.CA) -> None:
    auth = {
        "client_certs": [
            {"uri_san": "spiffe://example.test/alice", "as": "alice"},
            {"subject": "CN=bob,O=Sluice Tests"},
        ],
        "api_keys": [{"key": "k-1", "subject": "keyholder"}],
    }
    client_ca = trustme.CA()
    write_ca(files, client_ca, "client-ca")  # one CA signs alice, bob and carol
    client_cert_with_uri(client_ca, files, "alice", "alice", "spiffe://example.test/alice")
    client_cert_with_uri(client_ca, files, "bob", "bob", "spiffe://example.test/bob")
    client_cert_with_uri(client_ca, files, "carol", "carol", "spiffe://example.test/carol")

    async def main() -> None:
        async with upstream() as up:
            text = tls_config(up, "client_auth: optional\n          client_ca: client-ca.pem").replace(
                "{name: props, module: props.wasm}",
                f"{{name: auth, module: {ROOT / 'sluice' / 'filters' / 'auth.wasm'}, config: {json.dumps(auth)}}}",
            )
            async with gateway(text, files) as gw:
                seen, _ = await echo(gw.port, client_ctx(ca, files / "alice"))
                assert seen["x-auth-subject"] == "alice"  # by URI SAN, named by "as"
                seen, _ = await echo(gw.port, client_ctx(ca, files / "bob"))
                assert seen["x-auth-subject"] == "CN=bob,O=Sluice Tests"  # by subject
                connector = aiohttp.TCPConnector(ssl=client_ctx(ca, files / "carol"), resolver=_Loopback())
                async with aiohttp.ClientSession(connector=connector) as s:
                    async with s.get(f"https://localhost:{gw.port}/anything") as r:
                        assert r.status == 401 and await r.text() == "unknown client certificate"
                    # An unknown certificate does not stop another credential.
                    async with s.get(f"https://localhost:{gw.port}/anything", headers={"x-api-key": "k-1"}) as r:
                        assert r.status == 200
                        headers = {k.lower(): v for k, v in json.loads(await r.text())["headers"]}
                        assert headers["x-auth-subject"] == "keyholder"
                # No certificate at all (optional): missing credentials.
                connector = aiohttp.TCPConnector(ssl=client_ctx(ca), resolver=_Loopback())
                async with aiohttp.ClientSession(connector=connector) as s, s.get(
                    f"https://localhost:{gw.port}/anything"
                ) as r:
                    assert r.status == 401 and await r.text() == "missing credentials"

    run(main())


def test_a_changed_tls_block_needs_a_restart_and_says_so(files: Path, ca: trustme.CA) -> None:
    from sluice.proxy.config import load_config

    async def main() -> None:
        async with upstream() as up:
            path = files / "sluice.yaml"
            path.write_text(textwrap.dedent(tls_config(up)))
            gw = Gateway(load_config(path))
            await gw.start()
            try:
                assert gw.reloader is not None
                path.write_text(textwrap.dedent(tls_config(up, "min_version: '1.3'")))
                event = await gw.reloader.reload()
                assert event.ok, event
                (note,) = event.notes
                assert note.startswith("listen: the tls settings of https://127.0.0.1:0 changed: needs a restart")
                assert gw.config.listeners[0].tls is not None and gw.config.listeners[0].tls.min_version == "1.2"
                seen, _ = await echo(gw.port, client_ctx(ca))
                assert seen["x-prop-0"] in ("TLSv1.3", "TLSv1.2")
            finally:
                await gw.stop(drain_timeout=5.0)

    run(main())


def test_curl_over_tls_with_sni_and_a_client_certificate(files: Path, ca: trustme.CA) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    ca_file = write_ca(files, ca, "server-ca")
    tls = "client_auth: optional\n          client_ca: client-ca.pem"

    async def main() -> None:
        async with upstream() as up, gateway(tls_config(up, tls), files) as gw:
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--http1.1", "--cacert", str(ca_file),
                "--resolve", f"api.example.test:{gw.port}:127.0.0.1",
                "--cert", str(files / "client.crt"), "--key", str(files / "client.key"),
                f"https://api.example.test:{gw.port}/anything",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, err
            headers = {k.lower(): v for k, v in json.loads(out)["headers"]}
            assert headers["x-prop-1"] == "api.example.test" and headers["x-prop-2"] == "1"
            assert headers["x-prop-4"] == "spiffe://example.test/alice"
            assert headers["x-forwarded-proto"] == "https"

    run(main())
