"""Run one filter on a synthetic request, offline: the engine of `sluice filter test` and of the
filter tests.

`FilterRig` owns a `Runtime` and a real `Host` on its own asyncio loop (the proxy's `Services`:
callouts go out over real sockets through the same upstream pools), and drives one request
through a one-filter `FilterChain`, the proxy's own filter manager: request headers and body go
in, the canned upstream response goes in once the chain forwards the whole request, and what
the chain sends back (or a local reply, which Envoy-style passes the filter's own response
callbacks) is what the exchange reports. Pauses, resumes, buffering, local replies and resets
therefore behave exactly as in the proxy.
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
from sluice.abi import FilterStatus, HeaderMap, LocalReply, LogLevel, StreamCallbacks

from .chain import (
    AbortUpstream,
    Action,
    FilterChain,
    FilterStream,
    ForwardRequestData,
    ForwardRequestHeaders,
    ForwardRequestTrailers,
    ResetStream,
    SendResponseData,
    SendResponseHeaders,
    SendResponseTrailers,
)
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


class Recorder:
    """`abi.StreamCallbacks` that records every event a filter raises, in order, passes each on
    to `forward` when one is set (the rig's chain), then tells `on_event`. Tests that drive a
    stream by hand use it with neither."""

    def __init__(
        self, forward: StreamCallbacks | None = None, on_event: Callable[[str], None] | None = None
    ) -> None:
        self.forward = forward
        self.on_event = on_event
        self.events: list[str] = []
        self.replies: list[LocalReply] = []

    def _raised(self, event: str) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def continue_request(self) -> None:
        self.events.append("continue_request")
        if self.forward is not None:
            self.forward.continue_request()
        self._raised("continue_request")

    def continue_response(self) -> None:
        self.events.append("continue_response")
        if self.forward is not None:
            self.forward.continue_response()
        self._raised("continue_response")

    def send_local_reply(self, reply: LocalReply) -> None:
        self.events.append("local_reply")
        self.replies.append(reply)
        if self.forward is not None:
            self.forward.send_local_reply(reply)
        self._raised("local_reply")

    def reset(self) -> None:
        self.events.append("reset")
        if self.forward is not None:
            self.forward.reset()
        self._raised("reset")


@dataclasses.dataclass
class Phase:
    name: str
    status: str
    """"continue", "stop", or "stop→resumed" when the filter continued the stream later."""


STOP, RESUMED = "stop", "stop→resumed"
_RESUME = {True: "continue_request", False: "continue_response"}
"""The event that resumes a stopped phase, by direction (True: request)."""


class _PhaseLog(FilterStream):
    """The filter's stream (an `abi.HttpStream` or `abi.ComponentStream`) as the chain drives it,
    noting each callback's answer."""

    def __init__(self, stream: FilterStream, events: list[str]) -> None:
        self.stream = stream
        self.reads_request_body = stream.reads_request_body
        self.reads_response_body = stream.reads_response_body
        self.events = events
        """The filter's events so far (`Recorder.events`)."""
        self.phases: list[Phase] = []
        self._stopped: dict[bool, Phase] = {}
        """The phase of each direction waiting for the filter to continue it."""

    def _call(self, name: str, request: bool, call: Any, *args: Any) -> FilterStatus:
        seen = len(self.events)
        status: FilterStatus = call(*args)
        phase = Phase(name, "continue" if status is FilterStatus.CONTINUE else STOP)
        raised = self.events[seen:]
        if phase.status == STOP and "local_reply" not in raised and "reset" not in raised:
            if _RESUME[request] in raised:  # resumed from inside the callback that stopped
                phase.status = RESUMED
            else:
                self._stopped[request] = phase
        self.phases.append(phase)
        return status

    def note(self, event: str) -> None:
        """A filter event arrived after its callback returned."""
        if event in ("local_reply", "reset"):
            self._stopped.clear()
            return
        phase = self._stopped.pop(event == _RESUME[True], None)
        if phase is not None:
            phase.status = RESUMED

    def request_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        return self._call("request_headers", True, self.stream.request_headers, headers, end_of_stream)

    def request_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        return self._call("request_body", True, self.stream.request_body, body, end_of_stream)

    def request_trailers(self, trailers: HeaderMap) -> FilterStatus:
        return self._call("request_trailers", True, self.stream.request_trailers, trailers)

    def response_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        return self._call("response_headers", False, self.stream.response_headers, headers, end_of_stream)

    def response_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        return self._call("response_body", False, self.stream.response_body, body, end_of_stream)

    def response_trailers(self, trailers: HeaderMap) -> FilterStatus:
        return self._call("response_trailers", False, self.stream.response_trailers, trailers)

    def complete(self) -> None:
        self.stream.complete()


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
        self.loop.run_until_complete(self.host.redis.aclose())  # before the loop that runs them closes
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
        request = HeaderMap([(":method", method), (":path", path), (":authority", authority),
                             (":scheme", "http")])
        for k, v in headers:
            request.add(k, v)
        info = abi.StreamInfo(source_address=source, destination_address="127.0.0.1:8080",
                              request_headers=request, request_size=len(body))
        upstream = HeaderMap([(":status", str(response_status))])
        for k, v in response_headers:
            upstream.add(k, v)
        woken = asyncio.Event()
        phase_logs: list[_PhaseLog] = []

        def on_event(event: str) -> None:
            for phase_log in phase_logs:
                phase_log.note(event)
            woken.set()

        events = Recorder(on_event=on_event)

        def open_stream(info: abi.StreamInfo, callbacks: StreamCallbacks) -> FilterStream:
            events.forward = callbacks
            phase_logs.append(_PhaseLog(plugin.new_stream(info, events), events.events))
            return phase_logs[0]

        chain = FilterChain([(plugin.report().name, open_stream)], info)
        chain.on_actions = woken.set
        run = _Run(chain, info, upstream, response_body)
        try:
            chain.request_headers(request, not body)
            if body:
                chain.request_data(body, True)
            while not run.done:
                actions = chain.take_actions()
                if actions:
                    for action in actions:
                        run.apply(action)
                    continue
                woken.clear()
                try:
                    await asyncio.wait_for(woken.wait(), wait)
                except TimeoutError:
                    break  # the filter stays paused: report what happened so far
        finally:
            chain.complete()
            # The stream holds the recorder, which reaches the phase log, which holds the stream:
            # cut that cycle so the finished stream (and a VM it was the last user of) is freed
            # by reference counting, as in the proxy.
            phases = phase_logs[0].phases if phase_logs else []
            events.on_event = events.forward = None
        return Exchange(
            phases=phases,
            request_headers=request,
            request_body=bytes(run.request_body) if run.forwarded else body,
            response_headers=None if run.reset else upstream if run.response_headers is None else run.response_headers,
            response_body=bytes(run.response_body) if run.response_headers is not None else response_body,
            local_reply=chain.local_reply,
            reset=run.reset,
            events=events.events,
        )


class _Run:
    """The I/O side of one rig exchange: performs the chain's actions."""

    def __init__(self, chain: FilterChain, info: abi.StreamInfo, upstream: HeaderMap, body: bytes) -> None:
        self.chain = chain
        self.info = info
        self.upstream = upstream
        self.upstream_body = body
        self.forwarded = False
        self.request_body = bytearray()
        self.response_headers: HeaderMap | None = None
        self.response_body = bytearray()
        self.reset = False
        self.done = False

    def apply(self, action: Action) -> None:
        if isinstance(action, ForwardRequestHeaders):
            self.forwarded = True
            if action.end_of_stream:
                self._respond()
        elif isinstance(action, ForwardRequestData):
            self.request_body += action.data
            if action.end_of_stream:
                self._respond()
        elif isinstance(action, ForwardRequestTrailers):
            self._respond()
        elif isinstance(action, SendResponseHeaders):
            self.response_headers = action.headers
            self.done = action.end_of_stream
        elif isinstance(action, SendResponseData):
            self.response_body += action.data
            self.done = action.end_of_stream
        elif isinstance(action, SendResponseTrailers):
            self.done = True
        elif isinstance(action, ResetStream):
            self.reset = self.done = True
        elif isinstance(action, AbortUpstream):
            pass  # the local reply's response follows as SendResponse* actions

    def _respond(self) -> None:
        """The whole request reached the upstream: its canned response comes back."""
        if self.chain.local_reply is not None:
            return
        self.info.response_headers = self.upstream
        self.info.response_code = int(self.upstream.get(":status") or 0)
        self.chain.response_headers(self.upstream, not self.upstream_body)
        if self.upstream_body:
            self.chain.response_data(self.upstream_body, True)


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
            "metrics": {m.name: m.value for m in plugin.report().metrics},
        }
        print(json.dumps(report, indent=2))
    return 0


def _logs(rig: FilterRig) -> list[dict[str, str]]:
    return [{"level": level.name.lower(), "message": message} for _, level, message in rig.logs]
