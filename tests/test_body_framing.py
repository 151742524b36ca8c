"""A filter that changes a body's length gets the message framed for the new length (issue 14,
item 6): a body all in hand goes with its new Content-Length, a body that streams through a
filter that may change it goes chunked, and without such a filter the client's Content-Length is
kept. The filter (fixtures/wat/body_length.wat) grows or shrinks the last piece of each body, as
`x-body-edit` asks (g/s: request, G/S: response), and never touches Content-Length.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import wasmtime
from aiohttp import web
from conftest import proxy, run, upstream

WAT = Path(__file__).resolve().parent / "fixtures" / "wat" / "body_length.wat"
SMALL = b"a small body"
LARGE = bytes(range(256)) * 1024  # 256 KiB: past request_body_prebuffer (64 KiB), so it streams
GROWN = b"+grown"


async def echo(request: web.Request) -> web.Response:
    """The body and framing the upstream got."""
    body = await request.read()
    return web.json_response(
        {
            "size": len(body),
            "tail": body[-16:].decode("latin-1"),
            "content_length": request.headers.get("content-length"),
            "chunked": request.headers.get("transfer-encoding") == "chunked",
        }
    )


async def blob(request: web.Request) -> web.Response:
    """A response with Content-Length: `size` bytes of pattern."""
    size = int(request.query["size"])
    return web.Response(body=(bytes(range(256)) * (size // 256 + 1))[:size])


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Any, str]]:
    (tmp_path / "body_length.wasm").write_bytes(wasmtime.wat2wasm(WAT.read_text()))
    app = web.Application()
    app.router.add_route("*", "/{p:(edit|plain)}/echo", echo)
    app.router.add_route("*", "/{p:(edit|plain)}/blob", blob)
    async with upstream(app) as up:
        cfg = f"""
        listen: 127.0.0.1:0
        access_log: null
        filters_dir: {tmp_path}
        clusters:
          web: {{endpoints: ["{up}"]}}
        chain:
          - name: body_length
            module: body_length.wasm
            match: /edit
        routes:
          - match: {{prefix: /}}
            cluster: web
        """
        async with proxy(cfg) as gw:
            yield gw, f"http://127.0.0.1:{gw.port}"


def test_a_request_body_read_whole_is_sent_with_its_new_length(tmp_path: Path) -> None:
    async def main() -> None:
        async with gateway(tmp_path) as (_gw, base), aiohttp.ClientSession() as s:
            async with s.post(f"{base}/edit/echo", data=SMALL, headers={"x-body-edit": "grow"}) as r:
                assert r.status == 200
                got = await r.json()
            assert got["size"] == len(SMALL) + len(GROWN)
            assert got["tail"].endswith("body+grown")
            assert got["content_length"] == str(len(SMALL) + len(GROWN))
            async with s.post(f"{base}/edit/echo", data=SMALL, headers={"x-body-edit": "shrink"}) as r:
                got = await r.json()
            assert (got["size"], got["content_length"]) == (0, "0")
            async with s.post(f"{base}/edit/echo", data=SMALL) as r:
                got = await r.json()
            assert (got["size"], got["content_length"]) == (len(SMALL), str(len(SMALL)))

    run(main())


async def post_slowly(port: int, path: str, edit: str) -> dict[str, Any]:
    """POST LARGE with its Content-Length in two writes 0.2 s apart (so the body streams: the
    upstream request has started before the end arrives); the upstream's echo."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nhost: t\r\nx-body-edit: {edit}\r\nconnection: close\r\n"
        f"content-length: {len(LARGE)}\r\n\r\n"
    ).encode()
    writer.write(head + LARGE[: len(LARGE) // 2])
    await asyncio.sleep(0.2)
    writer.write(LARGE[len(LARGE) // 2 :])
    response = await reader.read()
    writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK", response[:200]
    _fields, _, body = rest.partition(b"\r\n\r\n")
    result: dict[str, Any] = json.loads(body)
    return result


def test_a_streamed_request_body_through_a_body_filter_goes_chunked(tmp_path: Path) -> None:
    async def main() -> None:
        async with gateway(tmp_path) as (gw, _base):
            got = await post_slowly(gw.port, "/edit/echo", "grow")
            assert got["size"] == len(LARGE) + len(GROWN)
            assert got["tail"].endswith("+grown")
            assert got["chunked"] and got["content_length"] is None
            got = await post_slowly(gw.port, "/edit/echo", "shrink")
            # The last piece (however the reads were cut) is gone, the rest arrived.
            assert len(LARGE) // 2 <= got["size"] < len(LARGE) and got["chunked"]
            # Without a filter that reads bodies, the client's framing stays.
            got = await post_slowly(gw.port, "/plain/echo", "grow")
            assert got["size"] == len(LARGE) and got["content_length"] == str(len(LARGE)) and not got["chunked"]
            assert gw.stats.responses["5xx"] == 0

    run(main())


def test_response_bodies_are_framed_for_what_the_filter_sends(tmp_path: Path) -> None:
    async def main() -> None:
        async with gateway(tmp_path) as (_gw, base), aiohttp.ClientSession() as s:
            for size in (10, 1 << 20):
                async with s.get(f"{base}/edit/blob?size={size}", headers={"x-body-edit": "G"}) as r:
                    body = await r.read()
                    assert len(body) == size + len(GROWN) and body.endswith(GROWN), size
                    if size == 10:  # arrived whole: one write with the new length
                        assert r.headers["content-length"] == str(size + len(GROWN))
                    else:  # streamed through a filter that may change it
                        assert r.headers.get("transfer-encoding") == "chunked"
                        assert "content-length" not in r.headers
                async with s.get(f"{base}/edit/blob?size={size}", headers={"x-body-edit": "S"}) as r:
                    body = await r.read()
                    assert len(body) < size or size == 10 and body == b"", size
            # Keep-alive still works after the re-framed responses (the connection is reused).
            async with s.get(f"{base}/plain/blob?size={1 << 20}") as r:
                assert r.headers["content-length"] == str(1 << 20)
                assert len(await r.read()) == 1 << 20
            # HEAD keeps the upstream's length: it describes the body a GET would get.
            async with s.head(f"{base}/edit/blob?size=1000") as r:
                assert r.headers["content-length"] == "1000"

    run(main())
