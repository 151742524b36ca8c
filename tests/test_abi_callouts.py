"""The AssemblyScript `callout` fixture against a real authz server (aiohttp on 127.0.0.1:0).

The fixture holds every request while it asks cluster `authz` (GET /check, x-user forwarded,
1000 ms timeout): 200 -> request header x-authz = body and continue; other status -> local 403
`forbidden`; failed call -> local 503 `authz unavailable`; call not dispatched -> the same 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from hosting import FilterRig, Recorder

from sluice import abi
from sluice.abi import FilterStatus, HeaderMap, PluginState

CALLOUT = Path(__file__).resolve().parent / "fixtures" / "as" / "build" / "callout.wasm"
WAIT = 10.0  # generous: how long the rig waits for a paused stream to be resumed


class Authz:
    """The authz upstream. `mode`: ok (200, body "ok:<x-user>"), deny (403), slow (held until
    released or 5 s), or per-user answers through `deny_users`."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.deny_users: set[str] = set()
        self.seen: list[dict[str, str]] = []
        self.release = asyncio.Event()
        self.shuffle = False

    async def check(self, request: web.Request) -> web.Response:
        self.seen.append({
            "method": request.method,
            "path": request.path_qs,
            "host": request.headers.get("Host", ""),
            "x-user": request.headers.get("x-user", "<absent>"),
        })
        user = request.headers.get("x-user", "")
        if self.shuffle:
            await asyncio.sleep(random.uniform(0, 0.03))
        if self.mode == "slow":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), 5.0)
        if self.mode == "deny" or user in self.deny_users:
            return web.Response(status=403, text="no")
        return web.Response(status=200, text=f"ok:{user}")


class Server:
    def __init__(self, rig: FilterRig, authz: Authz) -> None:
        app = web.Application()
        app.router.add_get("/check", authz.check)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        self.rig = rig
        self.address = ""

    def start(self) -> str:
        async def go() -> str:
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            server = site._server  # noqa: SLF001 - the bound port is only known here
            assert server is not None and server.sockets
            return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

        self.address = self.rig.loop.run_until_complete(go())
        return self.address

    def stop(self) -> None:
        self.rig.loop.run_until_complete(self.runner.cleanup())


def closed_port() -> str:
    """An address nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def authz() -> Authz:
    return Authz()


@pytest.fixture
def setup(authz: Authz) -> Iterator[tuple[FilterRig, abi.Plugin]]:
    """A rig whose cluster `authz` is a live server, with the callout fixture loaded."""
    rig = FilterRig()
    authz.release = asyncio.Event()
    server = Server(rig, authz)
    try:
        rig.host.add_cluster("authz", server.start())
        plugin = rig.load(CALLOUT, name="callout")
        yield rig, plugin
    finally:
        authz.release.set()
        server.stop()
        rig.close()




def test_allowed_request_resumes_with_authz_body(setup: tuple[FilterRig, abi.Plugin], authz: Authz) -> None:
    rig, plugin = setup
    ex = rig.request(plugin, "GET", "/app", headers=[("x-user", "alice")], wait=WAIT)
    assert ex.local_reply is None
    assert [(p.name, p.status) for p in ex.phases] == [
        ("request_headers", "stop→resumed"), ("response_headers", "continue")]
    assert ex.events == ["continue_request"]
    assert ex.request_headers.get("x-authz") == "ok:alice"
    assert ex.status == 200
    assert authz.seen == [{"method": "GET", "path": "/check", "host": "authz", "x-user": "alice"}]
    assert plugin.report().counters.traps == 0


def test_request_without_user_sends_no_user_header(setup: tuple[FilterRig, abi.Plugin], authz: Authz) -> None:
    rig, plugin = setup
    ex = rig.request(plugin, wait=WAIT)
    assert ex.request_headers.get("x-authz") == "ok:"
    assert authz.seen[0]["x-user"] == "<absent>"


def test_empty_user_forwarded_as_empty(setup: tuple[FilterRig, abi.Plugin], authz: Authz) -> None:
    rig, plugin = setup
    ex = rig.request(plugin, headers=[("x-user", "")], wait=WAIT)
    assert ex.request_headers.get("x-authz") == "ok:"
    assert authz.seen[0]["x-user"] == ""


def test_denied_by_authz_gives_local_403(setup: tuple[FilterRig, abi.Plugin], authz: Authz) -> None:
    rig, plugin = setup
    authz.mode = "deny"
    ex = rig.request(plugin, headers=[("x-user", "mallory")], wait=WAIT)
    assert ex.local_reply is not None
    assert ex.local_reply.status == 403
    assert ex.local_reply.body == b"forbidden"
    assert ex.status == 403
    assert ex.response_body == b"forbidden"
    assert "x-authz" not in ex.request_headers
    assert ex.phases[0].status == "stop"
    assert authz.seen[0]["x-user"] == "mallory"


def test_authz_down_gives_503() -> None:
    with FilterRig(clusters={"authz": closed_port()}) as rig:
        plugin = rig.load(CALLOUT)
        ex = rig.request(plugin, headers=[("x-user", "bob")], wait=WAIT)
        assert ex.local_reply is not None
        assert ex.local_reply.status == 503
        assert ex.local_reply.body == b"authz unavailable"
        assert ex.local_reply.headers == ()
        assert "x-authz" not in ex.request_headers
        # The VM keeps serving.
        ex = rig.request(plugin, wait=WAIT)
        assert ex.status == 503
        assert plugin.report().counters.traps == 0
        assert plugin.report().state is PluginState.OK


def test_slow_authz_times_out_to_503(setup: tuple[FilterRig, abi.Plugin], authz: Authz) -> None:
    rig, plugin = setup
    authz.mode = "slow"
    ex = rig.request(plugin, headers=[("x-user", "carol")], wait=WAIT)
    assert ex.local_reply is not None
    assert ex.local_reply.status == 503
    assert ex.local_reply.body == b"authz unavailable"
    assert authz.seen and authz.seen[0]["x-user"] == "carol"  # the call did reach the server
    authz.release.set()
    authz.mode = "ok"
    ex = rig.request(plugin, headers=[("x-user", "dave")], wait=WAIT)
    assert ex.request_headers.get("x-authz") == "ok:dave"


def test_unknown_cluster_replies_immediately() -> None:
    with FilterRig() as rig:  # no cluster named "authz"
        plugin = rig.load(CALLOUT)
        ex = rig.request(plugin, headers=[("x-user", "erin")], wait=WAIT)
        assert ex.local_reply is not None
        assert ex.local_reply.status == 503
        assert ex.local_reply.body == b"authz unavailable"
        assert [(p.name, p.status) for p in ex.phases][0] == ("request_headers", "stop")
        # By hand: the reply is raised during the request-headers call itself.
        rec = Recorder()
        request = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "h")])
        stream = plugin.new_stream(abi.StreamInfo(request_headers=request), rec)
        assert stream.request_headers(request, True) is FilterStatus.STOP
        assert rec.events == ["local_reply"]
        assert rec.replies[0].status == 503
        stream.complete()
        rig.run_for(0.05)
        assert rec.events == ["local_reply"]


def test_many_concurrent_paused_streams_each_get_their_answer(
    setup: tuple[FilterRig, abi.Plugin], authz: Authz
) -> None:
    rig, plugin = setup
    authz.shuffle = True
    n = 50
    authz.deny_users = {f"user-{i}" for i in range(0, n, 7)}

    async def all_requests() -> list:
        return list(await asyncio.gather(*(
            rig.exchange(plugin, "GET", f"/r/{i}", headers=[("x-user", f"user-{i}")], wait=WAIT)
            for i in range(n)
        )))

    results = rig.loop.run_until_complete(all_requests())
    for i, ex in enumerate(results):
        user = f"user-{i}"
        if user in authz.deny_users:
            assert ex.local_reply is not None and ex.local_reply.status == 403, (i, ex)
            assert "x-authz" not in ex.request_headers
        else:
            assert ex.local_reply is None, (i, ex.local_reply)
            assert ex.phases[0].status == "stop→resumed", (i, ex.phases)
            assert ex.request_headers.get_all("x-authz") == [f"ok:{user}"], (i, ex.request_headers)
            assert ex.request_headers.get(":path") == f"/r/{i}"
    assert sorted(s["x-user"] for s in authz.seen) == sorted(f"user-{i}" for i in range(n))
    assert plugin.report().active_streams == 0
    assert plugin.report().counters.traps == 0
    vm = plugin._vm
    assert vm is not None and len(vm.contexts) == 1  # only the root


def test_stream_completed_while_callout_pending(setup: tuple[FilterRig, abi.Plugin], authz: Authz) -> None:
    rig, plugin = setup
    authz.mode = "slow"
    rec = Recorder()
    request = HeaderMap([(":method", "GET"), (":path", "/gone"), (":authority", "h"), ("x-user", "gone")])
    stream = plugin.new_stream(abi.StreamInfo(request_headers=request), rec)
    assert stream.request_headers(request, True) is FilterStatus.STOP

    async def until_seen() -> None:
        for _ in range(500):
            if authz.seen:
                return
            await asyncio.sleep(0.01)

    rig.loop.run_until_complete(until_seen())
    assert authz.seen
    stream.complete()  # the client went away while the call is in flight
    assert plugin.report().active_streams == 0
    authz.release.set()  # now the answer arrives for a stream that no longer exists
    rig.run_for(0.3)
    assert rec.events == []  # nothing is raised on the finished stream
    authz.mode = "ok"
    for user in ("next-1", "next-2"):
        ex = rig.request(plugin, headers=[("x-user", user)], wait=WAIT)
        assert ex.local_reply is None
        assert ex.request_headers.get("x-authz") == f"ok:{user}"
    assert plugin.report().state is PluginState.OK


def test_stream_completed_before_callout_times_out(setup: tuple[FilterRig, abi.Plugin], authz: Authz) -> None:
    rig, plugin = setup
    authz.mode = "slow"
    rec = Recorder()
    request = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "h")])
    stream = plugin.new_stream(abi.StreamInfo(request_headers=request), rec)
    assert stream.request_headers(request, True) is FilterStatus.STOP
    stream.complete()
    rig.run_for(1.5)  # the 1000 ms callout timeout fires for the deleted stream
    assert rec.events == []
    authz.release.set()
    authz.mode = "ok"
    ex = rig.request(plugin, headers=[("x-user", "after")], wait=WAIT)
    assert ex.request_headers.get("x-authz") == "ok:after"


def test_retire_with_pending_callout(setup: tuple[FilterRig, abi.Plugin], authz: Authz) -> None:
    rig, plugin = setup
    authz.mode = "slow"
    rec = Recorder()
    request = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "h")])
    stream = plugin.new_stream(abi.StreamInfo(request_headers=request), rec)
    assert stream.request_headers(request, True) is FilterStatus.STOP
    plugin.retire()
    stream.complete()  # last stream: the root is torn down with the call still pending
    assert plugin.report().vm_count == 0
    authz.release.set()
    rig.run_for(0.2)
    assert rec.events == []
