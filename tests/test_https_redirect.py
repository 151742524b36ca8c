"""A plain listener with `redirect:` sends every request to https (sluice/proxy/redirect.py),
checked through a live sluice with a TLS listener beside it, and `sluice check` on its config."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import trustme
import wasmtime
from conftest import ROOT, make_config, run, upstream
from tlsutil import trusting, write_pair

from sluice.proxy.app import Gateway
from sluice.proxy.config import ConfigError, parse_config
from sluice.proxy.redirect import HttpsRedirect, host_without_port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_location_keeps_host_path_and_query() -> None:
    default, other = HttpsRedirect(), HttpsRedirect(8443)
    assert default.location("/a/b?x=1&y", "example.test:8080") == "https://example.test/a/b?x=1&y"
    assert other.location("/a", "Example.TEST") == "https://example.test:8443/a"
    # Absolute form: the host comes from the target (RFC 9112 3.2.2).
    assert other.location("http://other.test:81/p?q", "ignored.test") == "https://other.test:8443/p?q"
    assert other.location("/", "[::1]:8080") == "https://[::1]:8443/"
    assert other.location("*", "h.test") == "https://h.test:8443/"
    for bad in ("", "a b", "x.test:port", "[::1", "[zz]", "a\"b", "h.test/evil", "[::1]x"):
        assert host_without_port(bad) is None, bad
    assert other.location("/", None) is None


def listen(redirect: str, https_port: int) -> str:
    return f"""
    listen:
      - address: 127.0.0.1:0
        redirect: {redirect}
      - address: 127.0.0.1:{https_port}
        tls:
          certificates: [{{cert: server.crt, key: server.key}}]
    """


async def raw(port: int, data: bytes) -> bytes:
    """Send `data`, read until the server closes (or 3 s pass)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    chunks = []
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 3):
            chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


def test_redirect_listener_answers_without_filters_and_the_client_follows(tmp_path: Path) -> None:
    ca = trustme.CA()
    write_pair(tmp_path, ca.issue_cert("localhost"), "server")
    (tmp_path / "props.wasm").write_bytes(wasmtime.wat2wasm((ROOT / "tests/fixtures/wat/tls_props.wat").read_text()))
    https_port = free_port()

    async def main() -> None:
        async with upstream() as up:
            text = listen(f"{{https_port: {https_port}}}", https_port) + f"""
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
            gw = Gateway(make_config(text, tmp_path))
            await gw.start()
            try:
                plain = gw.addresses[0][1]
                # Two requests on one connection (keep-alive), a POST with its body among them.
                answer = await raw(
                    plain,
                    b"GET /a/b?x=1 HTTP/1.1\r\nHost: localhost:8080\r\n\r\n"
                    b"POST /form HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
                )
                first, second = answer.split(b"HTTP/1.1 ")[1:]
                assert first.startswith(b"308 Permanent Redirect\r\n")
                assert f"location: https://localhost:{https_port}/a/b?x=1\r\n".encode() in first
                assert b"content-length: 0\r\n" in first and b"x-prop" not in first  # no filter ran
                assert second.startswith(b"308 ") and f"https://localhost:{https_port}/form".encode() in second
                assert b"connection: close" in second
                # No host to redirect to: 400, counted as a rejection.
                refused = await raw(plain, b"GET / HTTP/1.0\r\n\r\n")
                assert refused.startswith(b"HTTP/1.1 400 ")
                assert gw.stats.local_replies["https_redirect"] == 2
                assert gw.stats.rejections["bad_request"] == 1 and gw.stats.responses["3xx"] == 2
                # A client that follows ends up on the TLS listener, with the filters.
                ctx: ssl.SSLContext = trusting(ca)
                async with aiohttp.ClientSession() as s, s.get(
                    f"http://localhost:{plain}/anything?k=v", ssl=ctx
                ) as r:
                    assert r.status == 200
                    assert str(r.url) == f"https://localhost:{https_port}/anything?k=v"
                    assert r.history[0].status == 308
                    assert r.headers["x-prop-7"] == "<missing>"  # the filter ran on the https side
                assert gw.stats.upstream_requests == 1
            finally:
                await gw.stop(drain_timeout=5.0)

    run(main())


def test_redirect_config_is_checked(tmp_path: Path) -> None:
    write_pair(tmp_path, trustme.CA().issue_cert("localhost"), "server")
    config = parse_config(listen("{}", 8443), source="t.yaml", base_dir=tmp_path)
    first = config.listeners[0].redirect
    assert first is not None and (first.https_port, first.status) == (443, 308)
    text = """
    listen:
      - address: 127.0.0.1:8080
        redirect: {https_port: 0, status: 303}
      - address: 127.0.0.1:8443
        redirect: {}
        tls: {certificates: [{cert: server.crt, key: server.key}]}
    """
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="t.yaml", base_dir=tmp_path)
    errors = info.value.errors
    assert any(e.startswith("t.yaml:4: listen[0].redirect.https_port:") for e in errors), errors
    assert any(e.startswith("t.yaml:4: listen[0].redirect.status:") for e in errors), errors
    assert any("listen[1]: redirect is for a plain listener" in e for e in errors), errors
    # `sluice check` says the same.
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("\n    ", "\n"))
    result = subprocess.run(
        [sys.executable, "-m", "sluice.proxy", "check", "-c", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "redirect is for a plain listener" in result.stderr, result.stderr
