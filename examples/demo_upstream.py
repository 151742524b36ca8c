"""A small upstream to put behind sluice while trying it out.

    python examples/demo_upstream.py --port 9001 --name stable

Endpoints (any method):
    /anything        JSON echo: the upstream's name, method, path, query, headers and body size
    /stream?n=5&size=1024&ms=100
                     n chunks of `size` bytes, `ms` milliseconds apart (chunked encoding)
    /slow?ms=500     answers after `ms` milliseconds
    /bytes?size=N    N bytes of body with a Content-Length
    /status/NNN      an empty response with that status
    /ws              a WebSocket echo
`create_app(name)` builds the same app for tests.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import WSMsgType, web


def _int(request: web.Request, key: str, default: int) -> int:
    try:
        return int(request.query.get(key, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be a number\n") from None


def create_app(name: str = "demo") -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response(
            {
                "upstream": name,
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_size": size,
                "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
            }
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        count, size, pause = _int(request, "n", 5), _int(request, "size", 1024), _int(request, "ms", 100)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "X-Upstream": name})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(count):
            await resp.write(bytes([65 + i % 26]) * size)
            if pause and i + 1 < count:
                await asyncio.sleep(pause / 1000)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(_int(request, "ms", 500) / 1000)
        return web.Response(text=f"{name}: slept {request.query.get('ms', '500')} ms\n")

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * _int(request, "size", 1024), content_type="application/octet-stream")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(f"{name}: {msg.data}")
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {name}\n")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/stream", stream)
    app.router.add_route("*", "/slow", slow)
    app.router.add_route("*", "/bytes", sized)
    app.router.add_route("*", r"/status/{code:\d{3}}", status)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/hello", hello)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--name", default="demo", help="reported in every answer (tell upstreams apart)")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(create_app(args.name), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
