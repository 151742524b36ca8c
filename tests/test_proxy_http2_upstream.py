"""`protocol: http2` clusters through a live sluice: HTTP/1.1 clients, HTTP/2 upstreams.

The upstreams are real HTTP/2 servers on loopback: the downstream codec's server (tests/h2util.py,
h2c and TLS with ALPN), nginx with `http2 on` when it is installed, and grpcio's. A WAT filter
(fixtures/wat/trailers.wat) shows what a filter sees in the response trailers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import h2.errors
import httptools
import pytest
import trustme
import wasmtime
from conftest import ROOT, make_config, proxy, run
from h2util import EchoRecorder, h2_server, pattern_body, start_grpc_server
from tlsutil import write_ca, write_pair

from sluice.proxy.app import Gateway
from sluice.proxy.http2.events import H2Limits
from sluice.proxy.http2.protocol import H2Stream
from sluice.proxy.tls.server import ALPN_HTTP1, ServerTls, ServerTlsSettings

WAT = ROOT / "tests" / "fixtures" / "wat"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "trailers.wasm").write_bytes(wasmtime.wat2wasm((WAT / "trailers.wat").read_text()))
    (tmp_path / "props.wasm").write_bytes(wasmtime.wat2wasm((WAT / "tls_props.wat").read_text()))
    return tmp_path


def config(port: int, *, tls: str = "null", filters: str = "trailers", cluster: str = "") -> str:
    chain = "".join(f"\n      - {{name: {f}, module: {f}.wasm}}" for f in filters.split(",") if f)
    return f"""
    listen: 127.0.0.1:0
    access_log: null
    filters_dir: .
    clusters:
      h2: {{endpoints: ["127.0.0.1:{port}"], protocol: http2, tls: {tls}, timeout: 2, {cluster}}}
    chain:{chain or " []"}
    routes:
      - match: {{prefix: /}}
        cluster: h2
    """


class Upstream(EchoRecorder):
    """EchoRecorder, plus `/grpcish` (a body and `grpc-status` trailers), `/slow` (answers after
    0.4 s), `/reset` (RST_STREAM), `/die` (the connection drops), `/hang` (never answers)."""

    async def __call__(self, stream: H2Stream) -> None:
        path = dict(stream.headers)[":path"]
        if path == "/grpcish":
            while await stream.read_body() is not None:
                pass
            stream.send_response([(":status", "200"), ("content-type", "application/grpc")])
            await stream.send_data(b"payload")
            stream.send_trailers([("grpc-status", "0"), ("grpc-message", "fine")])
        elif path == "/slow":
            await asyncio.sleep(0.4)
            stream.send_response([(":status", "200"), ("x-stream", str(stream.stream_id))], end_stream=True)
        elif path == "/reset":
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif path == "/die":
            transport = stream.connection.transport
            assert transport is not None
            transport.abort()
        elif path == "/hang":
            await asyncio.sleep(30)
        else:
            await super().__call__(stream)


# -- a raw HTTP/1.1 client (request trailers out, response trailers in) ---------------------------


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False
        self._in_trailers = False

    def on_header(self, name: bytes, value: bytes) -> None:
        target = self.trailers if self._in_trailers else self.headers
        target[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._in_trailers = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def http1(port: int, request: bytes) -> Response:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    response = Response()
    parser = httptools.HttpResponseParser(response)
    writer.write(request)
    try:
        while not response.done:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            parser.feed_data(data)
    finally:
        writer.close()
    response.status = parser.get_status_code()
    return response


def chunked_post(path: str, body: bytes, trailers: list[tuple[str, str]]) -> bytes:
    out = f"POST {path} HTTP/1.1\r\nHost: up.test\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n".encode()
    out += f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n"
    out += b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers)
    return out + b"\r\n"


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, dict[str, str]]:
    async with session.get(url) as r:
        return r.status, await r.text(), {k.lower(): v for k, v in r.headers.items()}


# -- h2c (prior knowledge) --------------------------------------------------------------------------


def test_h2c_get_post_trailers_and_one_shared_connection(base: Path) -> None:
    handler = Upstream()

    async def main() -> None:
        async with h2_server(handler, limits=H2Limits(max_concurrent_streams=8)) as (port, protos):
            async with proxy(config(port), base) as gw, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{gw.port}"
                status, text, headers = await get(s, url + "/one?q=1")
                assert status == 200, text
                seen = dict(tuple(pair) for pair in json.loads(text)["headers"])
                assert seen[":scheme"] == "http" and seen[":authority"] == f"127.0.0.1:{gw.port}"
                assert seen[":path"] == "/one?q=1" and seen[":method"] == "GET"
                assert "connection" not in seen and "via" in headers
                # A body bigger than every window, both ways.
                upload = pattern_body(3 * 1024 * 1024 + 7)
                async with s.post(url + "/up", data=upload) as r:
                    doc = await r.json(content_type=None)
                    assert r.status == 200 and doc["body_len"] == len(upload)
                    assert doc["body_sha256"] == hashlib.sha256(upload).hexdigest()
                async with s.get(url + f"/download/{4 * 1024 * 1024}") as r:
                    assert await r.read() == pattern_body(4 * 1024 * 1024)
                # Fifty at once over one connection, eight streams at a time (the server's limit).
                results = await asyncio.gather(*(get(s, url + f"/c{i}") for i in range(50)))
                assert [r[0] for r in results] == [200] * 50
                assert len(protos) == 1 and handler.streams == 53
                pool = gw.generation.clusters["h2"]
                assert pool.connects == 1
            # Request trailers from an HTTP/1.1 chunked body go on as HTTP/2 trailers; the
            # upstream's response trailers reach the filter and the client (chunked trailers).
            async with proxy(config(port), base) as gw:
                r = await http1(gw.port, chunked_post("/t", b"abc", [("x-req-trailer", "v1")]))
                assert r.status == 200 and r.done
                doc = json.loads(bytes(r.body))
                assert doc["trailers"] == [["x-req-trailer", "v1"]] and doc["body_len"] == 3
                assert r.headers.get("transfer-encoding") == "chunked"
                assert r.trailers["x-echo-x-req-trailer"] == "v1"
                assert r.trailers["x-filter-saw-grpc-status"] == "<missing>"
                r = await http1(gw.port, b"GET /grpcish HTTP/1.1\r\nHost: up.test\r\nTE: trailers\r\n\r\n")
                assert r.status == 200 and bytes(r.body) == b"payload"
                assert r.trailers == {
                    "grpc-status": "0", "grpc-message": "fine",
                    "x-filter-saw-grpc-status": "0", "x-filter-trailer": "added",
                }

    run(main())


def test_upstream_failures_are_502_and_504_with_reasons(base: Path) -> None:
    async def main() -> None:
        async with (
            h2_server(Upstream()) as (port, protos),
            proxy(config(port), base) as gw,
            aiohttp.ClientSession() as s,
        ):
            url = f"http://127.0.0.1:{gw.port}"
            status, text, _ = await get(s, url + "/reset")
            assert status == 502 and text == "upstream connection closed before responding\n"
            status, text, _ = await get(s, url + "/hang")
            assert status == 504 and text == "upstream request timeout\n"
            # Stream errors cost the stream, not the connection.
            status, _, _ = await get(s, url + "/fine")
            assert status == 200 and len(protos) == 1
            # An upstream that dies mid-request: 502 (the retry on a new connection, made
            # for a request nothing was received for, dies the same way).
            status, text, _ = await get(s, url + "/die")
            assert status == 502 and "upstream connection closed" in text
            status, _, _ = await get(s, url + "/after")
            assert status == 200
            assert gw.stats.local_replies["upstream_reset"] == 2
            assert gw.stats.local_replies["upstream_timeout"] == 1
        # Nothing listens any more.
        async with proxy(config(port), base) as gw, aiohttp.ClientSession() as s:
            status, text, _ = await get(s, f"http://127.0.0.1:{gw.port}/")
            assert status == 502 and text == "upstream connect error\n"

    run(main())


def test_goaway_mid_load_finishes_in_flight_and_moves_to_a_new_connection(base: Path) -> None:
    async def main() -> None:
        async with (
            h2_server(Upstream()) as (port, protos),
            proxy(config(port), base) as gw,
            aiohttp.ClientSession() as s,
        ):
            url = f"http://127.0.0.1:{gw.port}"
            assert (await get(s, url + "/warm"))[0] == 200
            in_flight = [asyncio.ensure_future(get(s, url + "/slow")) for _ in range(10)]
            await asyncio.sleep(0.15)  # all ten streams are open upstream
            assert len(protos) == 1
            protos[0].shutdown()  # GOAWAY(NO_ERROR, last stream): those finish
            await asyncio.sleep(0.05)
            after = await asyncio.gather(*(get(s, url + f"/new{i}") for i in range(5)))
            assert [r[0] for r in after] == [200] * 5
            done = await asyncio.gather(*in_flight)
            assert [r[0] for r in done] == [200] * 10
            assert len(protos) == 2 and gw.generation.clusters["h2"].connects == 2
            await asyncio.sleep(0.1)
            assert protos[0].transport is not None and protos[0].transport.is_closing()

    run(main())


# -- TLS with ALPN h2 ---------------------------------------------------------------------------------


def test_tls_upstream_with_alpn_h2(base: Path) -> None:
    ca = trustme.CA()
    pair = write_pair(base, ca.issue_cert("backend.internal"), "up")
    write_ca(base, ca, "up-ca")
    h2_only = ServerTls(ServerTlsSettings((pair,)))
    http1_only = ServerTls(ServerTlsSettings((pair,), alpn=(ALPN_HTTP1,)))
    tls = "{sni: backend.internal, ca_file: up-ca.pem}"

    async def main() -> None:
        async with h2_server(Upstream(), ssl_context=h2_only.context) as (port, protos):
            async with proxy(config(port, tls=tls, filters="props"), base) as gw, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{gw.port}"
                results = await asyncio.gather(*(get(s, url + f"/s{i}") for i in range(20)))
                assert [r[0] for r in results] == [200] * 20
                status, text, headers = results[0]
                doc = json.loads(text)
                assert doc["tls_version"] == "TLSv1.3" and [":scheme", "https"] in doc["headers"]
                assert headers["x-prop-7"] == "TLSv1.3"  # upstream.tls_version, as a filter reads it
                assert len(protos) == 1
            # Verification is on: the wrong name is refused.
            async with (
                proxy(config(port, tls="{sni: other.internal, ca_file: up-ca.pem}"), base) as gw,
                aiohttp.ClientSession() as s,
            ):
                status, text, _ = await get(s, f"http://127.0.0.1:{gw.port}/")
                assert status == 502 and text == "upstream connect error\n"
        # An upstream that does not agree to h2 in ALPN is not spoken to in HTTP/1.1 either.
        async with (
            h2_server(Upstream(), ssl_context=http1_only.context) as (port, _),
            proxy(config(port, tls=tls), base) as gw,
            aiohttp.ClientSession() as s,
        ):
            status, text, _ = await get(s, f"http://127.0.0.1:{gw.port}/")
            assert status == 502 and text == "upstream connect error\n"
            assert gw.generation.clusters["h2"].connect_failures == 1

    run(main())


# -- nginx with http2 ------------------------------------------------------------------------------

NGINX = shutil.which("nginx")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def nginx_h2(tmp: Path, cert: Path, key: Path, keepalive_requests: int = 1000) -> AsyncIterator[tuple[int, int]]:
    """nginx answering over h2c (prior knowledge) and TLS with ALPN h2; yields (h2c, tls) ports.
    Every answer says which connection carried it (`x-conn`) and how the request came."""
    assert NGINX is not None
    prefix = tmp / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    plain, secure = free_port(), free_port()
    location = """
            location / {
                add_header x-conn $connection always;
                return 200 "$request_method $uri $http2 $content_length\\n";
            }"""
    (prefix / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests {keepalive_requests};
    client_max_body_size 64m;
    server {{
        listen 127.0.0.1:{plain} http2;
        {location}
    }}
    server {{
        listen 127.0.0.1:{secure} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        {location}
    }}
}}
""")
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(prefix / "nginx.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited: {(prefix / 'error.log').read_text()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", secure)
                writer.close()
                break
            except OSError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        yield plain, secure
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(NGINX is None, reason="nginx not installed")
def test_nginx_http2_upstream_h2c_and_tls(base: Path) -> None:
    ca = trustme.CA()
    pair = write_pair(base, ca.issue_cert("backend.internal"), "nginx")
    write_ca(base, ca, "nginx-ca")
    tls = "{sni: backend.internal, ca_file: nginx-ca.pem}"

    async def main() -> None:
        async with nginx_h2(base, pair.cert_file, pair.key_file) as (plain, secure):
            for port, how, cluster_tls in ((plain, "h2c", "null"), (secure, "h2", tls)):
                async with proxy(config(port, tls=cluster_tls, filters=""), base) as gw:
                    async with aiohttp.ClientSession() as s:
                        url = f"http://127.0.0.1:{gw.port}"
                        results = await asyncio.gather(*(get(s, url + f"/n{i}") for i in range(30)))
                        assert {r[0] for r in results} == {200}
                        assert results[3][1] == f"GET /n3 {how} \n"
                        assert len({r[2]["x-conn"] for r in results}) == 1  # one connection for all
                        body = pattern_body(2 * 1024 * 1024)
                        async with s.post(url + "/up", data=body) as r:
                            assert r.status == 200 and await r.text() == f"POST /up {how} {len(body)}\n"
                    assert gw.generation.clusters["h2"].connects == 1

    run(main())


@pytest.mark.skipif(NGINX is None, reason="nginx not installed")
def test_nginx_goaway_after_keepalive_requests(base: Path) -> None:
    """nginx sends GOAWAY after `keepalive_requests` streams: the streams it took finish, the
    ones above its last stream id (never processed) go again on a new connection, none fails.
    Waves of eight: a request is retried once, so each wave must fit the next connection."""
    ca = trustme.CA()
    pair = write_pair(base, ca.issue_cert("backend.internal"), "nginx")

    async def main() -> None:
        async with (
            nginx_h2(base, pair.cert_file, pair.key_file, keepalive_requests=10) as (plain, _),
            proxy(config(plain, filters=""), base) as gw,
            aiohttp.ClientSession() as s,
        ):
            url = f"http://127.0.0.1:{gw.port}"
            results = []
            for wave in range(5):
                results += await asyncio.gather(*(get(s, url + f"/g{wave}-{i}") for i in range(8)))
            assert [r[0] for r in results] == [200] * 40
            connections = {r[2]["x-conn"] for r in results}
            pool = gw.generation.clusters["h2"]
            assert len(connections) >= 4 and pool.connects == len(connections)
            assert gw.stats.upstream_retries > 0

    run(main())


# -- gRPC through sluice ---------------------------------------------------------------------------


def test_grpc_round_trip_through_sluice_with_a_filter_adding_a_trailer(base: Path) -> None:
    """grpcio client -(h2, TLS)-> sluice (trailers filter) -(h2c)-> grpcio server, and back:
    grpc-status passes through unchanged, the filter sees it and adds a trailer."""
    ca = trustme.CA()
    write_pair(base, ca.issue_cert("localhost"), "server")
    server, grpc_port = start_grpc_server()
    text = f"""
    listen:
      - address: 127.0.0.1:0
        tls:
          certificates: [{{cert: server.crt, key: server.key}}]
          alpn: [h2, http/1.1]
    access_log: null
    filters_dir: .
    clusters:
      grpc: {{endpoints: ["127.0.0.1:{grpc_port}"], protocol: http2}}
    chain:
      - {{name: trailers, module: trailers.wasm}}
    routes:
      - match: {{prefix: /}}
        cluster: grpc
    """

    def call(port: int, message: bytes) -> tuple[Any, Any]:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        options = (("grpc.ssl_target_name_override", "localhost"),)
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
            method = channel.unary_unary("/test.Echo/Say")
            try:
                response, rpc = method.with_call(message, timeout=10)
            except grpc.RpcError as err:
                return err.code(), err.details()
            return response, dict(rpc.trailing_metadata())

    async def main() -> None:
        gw = Gateway(make_config(text, base))
        await gw.start()
        try:
            response, trailers = await asyncio.to_thread(call, gw.port, b"via sluice")
            assert response == b"echo:via sluice", trailers
            assert trailers["x-upstream-trailer"] == "t1"
            assert trailers["x-filter-saw-grpc-status"] == "0" and trailers["x-filter-trailer"] == "added"
            # A failing call is a trailers-only response: its status comes through as it was.
            code, details = await asyncio.to_thread(call, gw.port, b"missing")
            assert code == grpc.StatusCode.NOT_FOUND and details == "no such thing"
        finally:
            await gw.stop(drain_timeout=5.0)

    try:
        run(main())
    finally:
        server.stop(None)


def test_all_streams_busy_for_the_connect_timeout_is_an_overflow(base: Path) -> None:
    async def main() -> None:
        async with (
            h2_server(Upstream(), limits=H2Limits(max_concurrent_streams=1)) as (port, protos),
            proxy(config(port, cluster="connect_timeout: 0.2"), base) as gw,
            aiohttp.ClientSession() as s,
        ):
            url = f"http://127.0.0.1:{gw.port}"
            slow = asyncio.ensure_future(get(s, url + "/slow"))
            await asyncio.sleep(0.1)
            status, text, _ = await get(s, url + "/waits")
            assert status == 503 and text == "upstream overflow\n"
            assert (await slow)[0] == 200
            assert len(protos) == 1 and gw.generation.clusters["h2"].overflows == 1
            assert (await get(s, url + "/then"))[0] == 200

    run(main())
