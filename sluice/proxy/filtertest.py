"""Run one filter on a synthetic request, offline: the engine of `sluice filter test` and of the
filter tests.

`FilterRig` owns a `Runtime` and a real `Host` on its own asyncio loop (the proxy's `Services`:
callouts go out over real sockets through the same upstream pools), and drives one stream through
the whole lifecycle the way the proxy's chain does for a single filter: request headers, body,
trailers, waiting while the filter is paused, the response phase (or the filter's local reply
through its own response callbacks, as Envoy does), then log/done/delete.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sluice import abi
from sluice.abi import FilterStatus, HeaderMap, LocalReply, LogLevel

from .clusters import ClusterPool
from .config import HostPort
from .services import Services


class RigHost(Services):
    """The proxy's own `abi.Host` (callouts through the same upstream pools), with fixed named
    clusters and the filter logs kept in a list instead of rate-limited to the log."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clusters: dict[str, str]) -> None:
        super().__init__(lambda: None, loop)
        self.logs: list[tuple[str, LogLevel, str]] = []
        for name, address in clusters.items():
            self.add_cluster(name, address)

    def add_cluster(self, name: str, address: str) -> None:
        """Make `name` reach `address` ("host:port"); raises ValueError for a bad address."""
        parsed = HostPort.parse(address)
        self.add_pool(ClusterPool(name, [(parsed.host, parsed.port)], timeout=15.0,
                                  connect_timeout=2.0, max_connections=64))

    def log(self, plugin: str, level: LogLevel, message: str) -> None:
        self.logs.append((plugin, level, message))


class _Events:
    """`abi.StreamCallbacks` recording what the filter raised, waking the rig when it does."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.log: list[str] = []
        self.local_reply: LocalReply | None = None
        self.reset_called = False
        self._waiter: asyncio.Future[str] | None = None

    def _wake(self, what: str) -> None:
        self.log.append(what)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(what)

    def continue_request(self) -> None:
        self._wake("continue_request")

    def continue_response(self) -> None:
        self._wake("continue_response")

    def send_local_reply(self, reply: LocalReply) -> None:
        if self.local_reply is None:
            self.local_reply = reply
        self._wake("local_reply")

    def reset(self) -> None:
        self.reset_called = True
        self._wake("reset")

    async def wait(self, timeout: float) -> str | None:
        self._waiter = self.loop.create_future()
        try:
            return await asyncio.wait_for(self._waiter, timeout)
        except TimeoutError:
            return None
        finally:
            self._waiter = None


@dataclasses.dataclass
class Phase:
    name: str
    status: str
    """"continue", "stop", or "stop→resumed" when the filter continued the stream later."""


@dataclasses.dataclass
class Exchange:
    """What happened to one synthetic request."""

    phases: list[Phase]
    request_headers: HeaderMap
    request_body: bytes
    response_headers: HeaderMap | None
    response_body: bytes
    local_reply: LocalReply | None
    reset: bool
    events: list[str]

    @property
    def status(self) -> int:
        if self.local_reply is not None:
            return self.local_reply.status
        status = self.response_headers.get(":status") if self.response_headers is not None else None
        return int(status or 0)


class FilterRig:
    """One Runtime and Host for a test or a `sluice filter test` run. Use as a context manager."""

    def __init__(self, clusters: dict[str, str] | None = None, cache_dir: Path | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.runtime = abi.Runtime(cache_dir=cache_dir)
        self.host = RigHost(self.loop, clusters or {})
        self.plugins: list[abi.Filter] = []

    @property
    def logs(self) -> list[tuple[str, LogLevel, str]]:
        return self.host.logs

    @property
    def shared_data(self) -> abi.SharedData:
        return self.runtime.shared_data

    def __enter__(self) -> FilterRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for plugin in self.plugins:
            plugin.retire()
        self.host.close()
        self.loop.close()
        self.runtime.close()

    def load(
        self, module_path: str | Path, config: Any = None, *, name: str = "filter", **spec: Any
    ) -> abi.Filter:
        """Load a filter; `config` may be bytes, a str, or any JSON value (encoded compactly)."""
        if config is None:
            configuration = b""
        elif isinstance(config, bytes):
            configuration = config
        elif isinstance(config, str):
            configuration = config.encode()
        else:
            configuration = json.dumps(config, separators=(",", ":")).encode()
        spec.setdefault("vm_id", name)
        plugin = self.runtime.load(
            abi.PluginSpec(name=name, module_path=Path(module_path), configuration=configuration, **spec),
            self.host,
        )
        self.plugins.append(plugin)
        return plugin

    def run_for(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def request(
        self,
        plugin: abi.Filter,
        method: str = "GET",
        path: str = "/",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        authority: str = "example.com",
        source: str = "127.0.0.1:5555",
        response_status: int = 200,
        response_headers: Iterable[tuple[str, str]] = (),
        response_body: bytes = b"",
        wait: float = 2.0,
    ) -> Exchange:
        return self.loop.run_until_complete(self.exchange(
            plugin, method, path, headers, body, authority=authority, source=source,
            response_status=response_status, response_headers=response_headers,
            response_body=response_body, wait=wait,
        ))

    async def exchange(
        self,
        plugin: abi.Filter,
        method: str = "GET",
        path: str = "/",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        authority: str = "example.com",
        source: str = "127.0.0.1:5555",
        response_status: int = 200,
        response_headers: Iterable[tuple[str, str]] = (),
        response_body: bytes = b"",
        wait: float = 2.0,
    ) -> Exchange:
        """The async form of `request`, for tests that run several streams concurrently."""
        events = _Events(asyncio.get_running_loop())
        request = HeaderMap([(":method", method), (":path", path), (":authority", authority),
                             (":scheme", "http")])
        for k, v in headers:
            request.add(k, v)
        info = abi.StreamInfo(source_address=source, destination_address="127.0.0.1:8080",
                              request_headers=request, request_size=len(body))
        stream = plugin.new_stream(info, events)
        phases: list[Phase] = []

        async def run(name: str, call: Callable[[], FilterStatus], resume: str) -> bool:
            """Run a phase; True if the stream goes on, False if it ended in a reply or reset."""
            seen = len(events.log)
            status = call()
            label = "continue" if status is FilterStatus.CONTINUE else "stop"
            if status is FilterStatus.STOP and events.local_reply is None and not events.reset_called:
                # The filter may already have resumed from inside the callback that stopped.
                got = resume if resume in events.log[seen:] else await events.wait(wait)
                if got == resume:
                    label = "stop→resumed"
            phases.append(Phase(name, label))
            return events.local_reply is None and not events.reset_called

        req_body = bytearray(body)
        try:
            going = await run("request_headers", lambda: stream.request_headers(request, not body),
                              "continue_request")
            if going and body:
                going = await run("request_body", lambda: stream.request_body(req_body, True),
                                  "continue_request")
            resp = HeaderMap([(":status", str(response_status))])
            for k, v in response_headers:
                resp.add(k, v)
            resp_body = bytearray(response_body)
            if events.local_reply is not None:
                reply = events.local_reply
                resp = HeaderMap([(":status", str(reply.status))])
                if reply.body:
                    resp.add("content-length", str(len(reply.body)))
                    resp.add("content-type", "text/plain")
                for k, v in reply.headers:
                    resp.add(k, v)
                resp_body = bytearray(reply.body)
                going = True  # the local reply passes through this filter's response callbacks
            if going and not events.reset_called:
                info.response_headers = resp
                info.response_code = int(resp.get(":status") or 0)
                await run("response_headers", lambda: stream.response_headers(resp, not resp_body),
                          "continue_response")
                if resp_body:
                    await run("response_body", lambda: stream.response_body(resp_body, True),
                              "continue_response")
        finally:
            stream.complete()
        return Exchange(
            phases=phases,
            request_headers=request,
            request_body=bytes(req_body),
            response_headers=resp if not events.reset_called else None,
            response_body=bytes(resp_body),
            local_reply=events.local_reply,
            reset=events.reset_called,
            events=events.log,
        )


def _parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise SystemExit(f"sluice filter test: bad header {text!r} (expected 'name: value')")
    return name.strip(), value.strip()


def _diff(before: list[tuple[str, str]], after: HeaderMap) -> dict[str, list[list[str]]]:
    now = after.items()
    return {
        "added": [list(kv) for kv in now if kv not in before],
        "removed": [list(kv) for kv in before if kv not in now],
    }


def main(args: argparse.Namespace) -> int:
    """`sluice filter test`: print, as JSON, what the filter did to one synthetic request."""
    config: Any = None
    if args.config is not None:
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError:
            config = args.config  # not JSON: hand the text over as it is
    clusters: dict[str, str] = {}
    for item in args.upstream or []:
        name, sep, address = item.partition("=")
        if not sep:
            print(f"sluice filter test: bad --upstream {item!r} (expected name=host:port)", file=sys.stderr)
            return 2
        clusters[name] = address
    headers = [_parse_header(h) for h in args.header or []]
    response_headers = [_parse_header(h) for h in args.response_header or []]
    with FilterRig(clusters) as rig:
        try:
            plugin = rig.load(args.module, config, name=Path(args.module).stem)
        except abi.PluginLoadError as exc:
            print(json.dumps({"error": str(exc), "logs": _logs(rig)}, indent=2))
            return 1
        request_before = [(":method", args.method), (":path", args.path), (":authority", "example.com"),
                          (":scheme", "http")] + [(k.lower(), v) for k, v in headers]
        ex = rig.request(
            plugin, args.method, args.path, headers, (args.body or "").encode(),
            response_status=args.response_status, response_headers=response_headers,
            response_body=(args.response_body or "").encode(),
        )
        response_before = [(":status", str(args.response_status))] + [
            (k.lower(), v) for k, v in response_headers]
        report = {
            "phases": [{"phase": p.name, "action": p.status} for p in ex.phases],
            "request_headers": _diff(request_before, ex.request_headers),
            "request_body": ex.request_body.decode("utf-8", "replace"),
            "local_reply": None if ex.local_reply is None else {
                "status": ex.local_reply.status,
                "body": ex.local_reply.body.decode("utf-8", "replace"),
                "headers": [list(kv) for kv in ex.local_reply.headers],
                "details": ex.local_reply.details,
            },
            "response_headers": None if ex.response_headers is None else _diff(
                response_before, ex.response_headers),
            "response_body": ex.response_body.decode("utf-8", "replace"),
            "reset": ex.reset,
            "logs": _logs(rig),
            "metrics": plugin.metrics(),
        }
        print(json.dumps(report, indent=2))
    return 0


def _logs(rig: FilterRig) -> list[dict[str, str]]:
    return [{"level": level.name.lower(), "message": message} for _, level, message in rig.logs]
