"""`FilterChain` as a state machine: events in, actions out, no sockets.

The first half drives it with scripted look-alike streams (to pin down the Envoy semantics
exactly); the second half with real filters on the real host (AssemblyScript fixtures).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sluice.abi import FilterStatus, HeaderMap, LocalReply, StreamCallbacks, StreamInfo
from sluice.proxy.chain import (
    AbortUpstream,
    Action,
    ContinueRequest,
    FilterChain,
    FilterReset,
    ForwardRequestData,
    ForwardRequestHeaders,
    ForwardRequestTrailers,
    PassThrough,
    RequestData,
    RequestHeaders,
    RequestTrailers,
    ResetStream,
    ResponseData,
    ResponseHeaders,
    ResponseTrailers,
    SendLocalReply,
    SendResponseData,
    SendResponseHeaders,
    SendResponseTrailers,
)

C, S = FilterStatus.CONTINUE, FilterStatus.STOP
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "as" / "build"


def req(path: str = "/", method: str = "GET") -> HeaderMap:
    return HeaderMap([(":method", method), (":path", path), (":authority", "example"), (":scheme", "http")])


def resp(status: int = 200) -> HeaderMap:
    return HeaderMap([(":status", str(status))])


class Scripted:
    """A stream whose answers come from a script; records every call as (name, args...)."""

    def __init__(self, name: str, log: list[tuple[Any, ...]], **script: Any) -> None:
        self.name = name
        self.log = log
        self.script = script
        self.callbacks: StreamCallbacks | None = None
        self.completed = 0
        bodies = script.pop("bodies", True)  # False: like a module exporting no body callback
        self.reads_request_body = self.reads_response_body = bodies

    def _answer(self, event: str, *args: Any) -> FilterStatus:
        self.log.append((self.name, event, *args))
        answer = self.script.get(event, C)
        if callable(answer):
            answer = answer(self, *args)
        if isinstance(answer, list):
            answer = answer.pop(0) if answer else C
        return FilterStatus(answer)

    def request_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        return self._answer("req_headers", end_of_stream)

    def request_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        return self._answer("req_body", bytes(body), end_of_stream)

    def request_trailers(self, trailers: HeaderMap) -> FilterStatus:
        return self._answer("req_trailers")

    def response_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        return self._answer("resp_headers", headers.get(":status"), end_of_stream)

    def response_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        return self._answer("resp_body", bytes(body), end_of_stream)

    def response_trailers(self, trailers: HeaderMap) -> FilterStatus:
        return self._answer("resp_trailers")

    def complete(self) -> None:
        self.completed += 1


def build(*scripts: dict[str, Any], max_body_buffer: int = 1 << 20) -> tuple[FilterChain, list[Scripted], list]:
    log: list[tuple[Any, ...]] = []
    streams: list[Scripted] = []

    def factory(name: str, script: dict[str, Any]) -> Callable[[StreamInfo, StreamCallbacks], Scripted]:
        def make(info: StreamInfo, callbacks: StreamCallbacks) -> Scripted:
            stream = Scripted(name, log, **script)
            stream.callbacks = callbacks
            streams.append(stream)
            return stream

        return make

    chain = FilterChain(
        [(f"f{i}", factory(f"f{i}", s)) for i, s in enumerate(scripts)], StreamInfo(), max_body_buffer=max_body_buffer
    )
    return chain, streams, log


def kinds(actions: list[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


# -- decoding and encoding order -------------------------------------------------------------------


def test_no_filters_passes_everything_through() -> None:
    chain, _, _ = build()
    # The one entry point, with typed events (the methods below are shorthands for it).
    chain.handle(RequestHeaders(req(), False))
    chain.handle(RequestData(b"abc", False))
    chain.handle(RequestData(b"def", True))
    assert kinds(chain.take_actions()) == [
        "ForwardRequestHeaders",
        "ForwardRequestData",
        "ForwardRequestData",
    ]
    chain.handle(ResponseHeaders(resp(), False))
    chain.handle(ResponseData(b"x", True))
    actions = chain.take_actions()
    assert isinstance(actions[0], SendResponseHeaders) and isinstance(actions[1], SendResponseData)
    assert chain.response_complete


PASS_THROUGH_SCRIPTS: list[list[tuple[str, tuple[Any, ...]]]] = [
    # a request and its response, streaming both ways
    [("request_headers", (False,)), ("request_data", (b"ab", False)), ("request_data", (bytearray(b"c"), True)),
     ("response_headers", (False,)), ("response_data", (b"x", False)), ("response_data", (b"y", True))],
    # trailers both ways
    [("request_headers", (False,)), ("request_data", (b"ab", False)), ("request_trailers", ()),
     ("response_headers", (False,)), ("response_trailers", ())],
    # the proxy answers (404 with a body): the rest of the request and the upstream's answer are moot
    [("request_headers", (False,)), ("local_reply", (404, b"no route\n", None)), ("request_data", (b"late", True)),
     ("response_headers", (False,)), ("response_data", (b"x", True))],
    # a reply once the response has started can only reset; after that nothing happens
    [("request_headers", (True,)), ("response_headers", (False,)), ("local_reply", (502, b"gone\n", None)),
     ("response_data", (b"x", True)), ("local_reply", (503, b"", None))],
    # a reply to a reply resets too; a gRPC status goes in the headers; an empty body ends with them
    [("request_headers", (True,)), ("local_reply", (503, b"", 14)), ("local_reply", (500, b"again\n", None))],
    # the client went away: nothing more
    [("request_headers", (False,)), ("reset", ("client disconnected",)), ("request_data", (b"x", True)),
     ("local_reply", (504, b"timeout\n", None)), ("response_headers", (True,))],
]


@pytest.mark.parametrize("script", PASS_THROUGH_SCRIPTS, ids=range(len(PASS_THROUGH_SCRIPTS)))
def test_pass_through_is_a_chain_without_filters(script: list[tuple[str, tuple[Any, ...]]]) -> None:
    """The exchange drives `PassThrough` where a route has no filter: step for step, the same
    actions, wake-ups and state as `FilterChain` with no filter."""
    general, _, _ = build()
    lean = PassThrough()
    woken: dict[str, int] = {"general": 0, "lean": 0}
    general.on_actions = lambda: woken.__setitem__("general", woken["general"] + 1)
    lean.on_actions = lambda: woken.__setitem__("lean", woken["lean"] + 1)
    for step, (name, args) in enumerate(script):
        for chain in (general, lean):
            if name == "request_headers":
                chain.request_headers(req("/p", "POST"), *args)
            elif name == "response_headers":
                chain.response_headers(resp(), *args)
            elif name in ("request_trailers", "response_trailers"):
                getattr(chain, name)(HeaderMap([("x-checksum", "1")]))
            elif name == "local_reply":
                status, body, grpc = args
                chain.send_local_reply(LocalReply(status, body, details="test", grpc_status=grpc))
            else:
                getattr(chain, name)(*args)
        expected, got = general.take_actions(), lean.take_actions()
        assert got == expected, f"step {step} ({name})"
        assert (lean.halted, lean.local_reply, lean.response_started, lean.reset_reason) == (
            general.halted, general.local_reply, general.response_started, general.reset_reason
        ), f"step {step} ({name})"
        assert woken["lean"] == woken["general"], f"step {step} ({name})"
    assert lean.acted_filters() == general.acted_filters() == []
    assert lean.may_change_body(request=True) is general.may_change_body(request=True) is False
    general.complete()
    lean.complete()
    assert lean.halted and lean.on_actions is None


def test_a_filter_without_body_callbacks_is_not_called_for_bodies() -> None:
    chain, _, log = build({"bodies": False}, {})
    chain.request_headers(req(), False)
    chain.request_data(b"abc", True)
    chain.response_headers(resp(), False)
    chain.response_data(b"xyz", True)
    assert [(n, e) for n, e, *_ in log] == [
        ("f0", "req_headers"),
        ("f1", "req_headers"),
        ("f1", "req_body"),
        ("f1", "resp_headers"),
        ("f0", "resp_headers"),
        ("f1", "resp_body"),
    ]
    data = [(type(a).__name__, getattr(a, "data", None)) for a in chain.take_actions()]
    assert ("ForwardRequestData", b"abc") in data and ("SendResponseData", b"xyz") in data


def test_a_filter_without_body_callbacks_still_holds_body_while_it_holds_headers() -> None:
    chain, streams, log = build({"bodies": False, "req_headers": S})
    chain.request_headers(req(), False)
    chain.request_data(b"ab", False)
    chain.request_data(b"cd", True)
    assert kinds(chain.take_actions()) == []
    assert streams[0].callbacks is not None
    streams[0].callbacks.continue_request()
    actions = chain.take_actions()
    assert kinds(actions) == ["ForwardRequestHeaders", "ForwardRequestData"]
    assert isinstance(actions[1], ForwardRequestData) and actions[1].data == b"abcd"


def test_decoding_in_order_encoding_in_reverse() -> None:
    chain, streams, log = build({}, {}, {})
    chain.request_headers(req(), True)
    chain.response_headers(resp(), True)
    assert [(n, e) for n, e, *_ in log] == [
        ("f0", "req_headers"),
        ("f1", "req_headers"),
        ("f2", "req_headers"),
        ("f2", "resp_headers"),
        ("f1", "resp_headers"),
        ("f0", "resp_headers"),
    ]
    assert kinds(chain.take_actions()) == ["ForwardRequestHeaders", "SendResponseHeaders"]


def test_streaming_body_is_not_buffered() -> None:
    chain, _, log = build({}, {})
    chain.request_headers(req(method="POST"), False)
    chain.take_actions()
    for i in range(3):
        chain.request_data(b"%d" % i, i == 2)
        actions = chain.take_actions()
        # Each chunk leaves the chain as soon as it came in.
        assert actions == [ForwardRequestData(b"%d" % i, i == 2)]
    assert ("f1", "req_body", b"2", True) in log


def test_events_are_frozen_values() -> None:
    event = RequestData(b"x", True)
    assert event == RequestData(b"x", True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.end_of_stream = False  # type: ignore[misc]


def test_filter_callbacks_arrive_as_typed_events() -> None:
    # Events a filter raises go through the same entry point as the sockets' events.
    chain, _, log = build({"req_headers": S}, {})
    chain.handle(RequestHeaders(req(method="POST"), False))
    chain.handle(RequestData(b"ab", False))
    assert chain.take_actions() == []
    chain.handle(ContinueRequest(0))
    actions = chain.take_actions()
    assert kinds(actions) == ["ForwardRequestHeaders", "ForwardRequestData"]
    chain.handle(RequestTrailers(HeaderMap([("x-sum", "1")])))
    assert kinds(chain.take_actions()) == ["ForwardRequestTrailers"]
    chain.handle(ResponseHeaders(resp(), False))
    chain.handle(ResponseTrailers(HeaderMap([("x-t", "2")])))
    assert kinds(chain.take_actions()) == ["SendResponseHeaders", "SendResponseTrailers"]
    # A reply after the response started can only reset; a reset after that is a no-op.
    chain.handle(SendLocalReply(1, LocalReply(500, b"late")))
    assert kinds(chain.take_actions()) == ["ResetStream"]
    chain.handle(FilterReset(0))
    assert chain.take_actions() == []


def test_headers_comparison_can_be_turned_off() -> None:
    # "Changed headers" counts as acting only when someone reads it (the access log).
    for track, acted in ((True, ["f0"]), (False, [])):
        chain = FilterChain([("f0", lambda info, cbs: _Rewriter())], StreamInfo(), track_headers=track)
        chain.request_headers(req(), True)
        assert chain.acted_filters() == acted


class _Rewriter(Scripted):
    def __init__(self) -> None:
        super().__init__("f0", [])

    def request_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        headers.set("x-added", "1")
        return C


# -- STOP on headers -------------------------------------------------------------------------------


def test_stop_on_headers_holds_body_then_delivers_it_as_one_buffer() -> None:
    chain, streams, log = build({"req_headers": S}, {})
    chain.request_headers(req(method="POST"), False)
    chain.request_data(b"ab", False)
    chain.request_data(b"cd", False)
    assert chain.take_actions() == []
    # Nothing reached f0's body callback nor f1 while f0 held the headers.
    assert [e for e in log if e[1] != "req_headers"] == []
    assert ("f1", "req_headers", False) not in log
    streams[0].callbacks.continue_request()  # type: ignore[union-attr]
    actions = chain.take_actions()
    assert isinstance(actions[0], ForwardRequestHeaders)
    assert actions[1:] == [ForwardRequestData(b"abcd", False)]
    assert ("f0", "req_body", b"abcd", False) in log
    chain.request_data(b"e", True)
    assert chain.take_actions() == [ForwardRequestData(b"e", True)]


def test_routing_sees_headers_as_the_filters_left_them() -> None:
    def rewrite(stream: Scripted, eos: bool) -> FilterStatus:
        return C

    chain, _, _ = build({"req_headers": rewrite})
    headers = req("/old")
    chain.request_headers(headers, True)
    headers.set(":path", "/new")  # the same map object travels on
    action = chain.take_actions()[0]
    assert isinstance(action, ForwardRequestHeaders) and action.headers.get(":path") == "/new"


def test_continue_from_inside_the_callback_is_applied_after_it_returns() -> None:
    def stop_and_continue(stream: Scripted, eos: bool) -> FilterStatus:
        stream.callbacks.continue_request()  # type: ignore[union-attr]
        return S

    chain, _, _ = build({"req_headers": stop_and_continue}, {})
    chain.request_headers(req(), True)
    assert kinds(chain.take_actions()) == ["ForwardRequestHeaders"]


def test_stale_continue_is_ignored() -> None:
    chain, streams, log = build({}, {})
    chain.request_headers(req(), True)
    streams[0].callbacks.continue_request()  # type: ignore[union-attr]
    assert kinds(chain.take_actions()) == ["ForwardRequestHeaders"]
    assert len([e for e in log if e[1] == "req_headers"]) == 2


# -- STOP on body (buffering) ------------------------------------------------------------------------


def test_stop_on_body_accumulates_until_end_of_stream() -> None:
    def until_eos(stream: Scripted, body: bytes, eos: bool) -> FilterStatus:
        return C if eos else S

    chain, _, log = build({"req_body": until_eos}, {})
    chain.request_headers(req(method="POST"), False)
    chain.take_actions()
    chain.request_data(b"a", False)
    chain.request_data(b"b", False)
    assert chain.take_actions() == []
    chain.request_data(b"c", True)
    assert chain.take_actions() == [ForwardRequestData(b"abc", True)]
    assert [e[2:] for e in log if e[:2] == ("f0", "req_body")] == [
        (b"a", False),
        (b"ab", False),
        (b"abc", True),
    ]
    assert [e[2:] for e in log if e[:2] == ("f1", "req_body")] == [(b"abc", True)]


def test_request_body_over_the_limit_is_a_413_through_the_encoders() -> None:
    chain, _, log = build({"req_body": S}, {}, max_body_buffer=4)
    chain.request_headers(req(method="POST"), False)
    chain.take_actions()
    chain.request_data(b"abc", False)
    chain.request_data(b"def", False)
    actions = chain.take_actions()
    assert isinstance(actions[0], AbortUpstream) and actions[0].reply.status == 413
    assert isinstance(actions[1], SendResponseHeaders) and actions[1].headers.get(":status") == "413"
    assert isinstance(actions[2], SendResponseData) and actions[2].end_of_stream
    # Only f0 saw the request headers... but both did here, f1 first saw nothing of the body.
    assert ("f0", "resp_headers", "413", False) in log


def test_held_headers_with_too_much_body_is_a_413() -> None:
    chain, _, log = build({"req_headers": S}, {}, max_body_buffer=4)
    chain.request_headers(req(method="POST"), False)
    chain.request_data(b"12345", False)
    actions = chain.take_actions()
    assert isinstance(actions[0], AbortUpstream) and actions[0].reply.status == 413
    # f1 never saw the request, so it does not see the reply either.
    assert not any(e[0] == "f1" for e in log)
    assert ("f0", "resp_headers", "413", False) in log


def test_response_body_over_the_limit_is_a_500() -> None:
    chain, _, _ = build({"resp_body": S}, max_body_buffer=4)
    chain.request_headers(req(), True)
    chain.response_headers(resp(), False)
    chain.take_actions()
    # The headers passed f0 (continue) and went to the client: only a reset is possible now.
    chain.response_data(b"123456", False)
    assert kinds(chain.take_actions()) == ["ResetStream"]


def test_response_headers_held_and_body_over_limit_is_a_direct_500() -> None:
    chain, _, _ = build({"resp_headers": S}, max_body_buffer=4)
    chain.request_headers(req(), True)
    chain.take_actions()
    chain.response_headers(resp(), False)
    chain.response_data(b"123456", False)
    actions = chain.take_actions()
    assert kinds(actions) == ["AbortUpstream", "SendResponseHeaders", "SendResponseData"]
    assert isinstance(actions[1], SendResponseHeaders) and actions[1].headers.get(":status") == "500"


# -- trailers --------------------------------------------------------------------------------------


def test_trailers_release_buffered_body_first() -> None:
    chain, _, log = build({"req_body": S})
    chain.request_headers(req(method="POST"), False)
    chain.take_actions()
    chain.request_data(b"ab", False)
    chain.request_trailers(HeaderMap([("x-t", "1")]))
    actions = chain.take_actions()
    assert kinds(actions) == ["ForwardRequestData", "ForwardRequestTrailers"]
    assert actions[0] == ForwardRequestData(b"ab", False)
    assert isinstance(actions[1], ForwardRequestTrailers) and actions[1].trailers.get("x-t") == "1"
    assert ("f0", "req_trailers") in log


def test_response_trailers_flow_to_the_client() -> None:
    chain, _, _ = build({})
    chain.request_headers(req(), True)
    chain.response_headers(resp(), False)
    chain.response_data(b"x", False)
    chain.response_trailers(HeaderMap([("grpc-status", "0")]))
    assert isinstance(chain.take_actions()[-1], SendResponseTrailers)
    assert chain.response_complete


def test_request_trailers_stop_and_continue() -> None:
    chain, streams, _ = build({"req_trailers": S})
    chain.request_headers(req(method="POST"), False)
    chain.request_data(b"x", False)
    chain.request_trailers(HeaderMap([("a", "b")]))
    assert kinds(chain.take_actions()) == ["ForwardRequestHeaders", "ForwardRequestData"]
    streams[0].callbacks.continue_request()  # type: ignore[union-attr]
    assert kinds(chain.take_actions()) == ["ForwardRequestTrailers"]
    assert chain.request_complete


# -- local replies and resets ----------------------------------------------------------------------


def test_local_reply_goes_through_the_replying_filter_and_those_before_it() -> None:
    def deny(stream: Scripted, eos: bool) -> FilterStatus:
        stream.callbacks.send_local_reply(  # type: ignore[union-attr]
            LocalReply(403, b"no", headers=(("x-denied", "1"),), details="denied")
        )
        return S

    chain, _, log = build({}, {"req_headers": deny}, {})
    chain.request_headers(req(), True)
    actions = chain.take_actions()
    assert kinds(actions) == ["AbortUpstream", "SendResponseHeaders", "SendResponseData"]
    headers = actions[1].headers  # type: ignore[union-attr]
    assert headers.get(":status") == "403" and headers.get("x-denied") == "1"
    assert headers.get("content-length") == "2" and headers.get("content-type") == "text/plain"
    assert actions[2] == SendResponseData(b"no", True)
    assert [(n, e) for n, e, *_ in log] == [
        ("f0", "req_headers"),
        ("f1", "req_headers"),
        ("f1", "resp_headers"),
        ("f0", "resp_headers"),
        ("f1", "resp_body"),
        ("f0", "resp_body"),
    ]
    assert chain.local_reply is not None and chain.local_reply.details == "denied"
    assert not chain.request_forwarded


def test_local_reply_after_pause_from_an_async_event() -> None:
    chain, streams, _ = build({"req_headers": S})
    chain.request_headers(req(), True)
    assert chain.take_actions() == []
    streams[0].callbacks.send_local_reply(LocalReply(503, b""))  # type: ignore[union-attr]
    actions = chain.take_actions()
    assert kinds(actions) == ["AbortUpstream", "SendResponseHeaders"]
    assert actions[1].end_of_stream  # type: ignore[union-attr]


def test_router_local_reply_passes_every_filter() -> None:
    chain, _, log = build({}, {})
    chain.request_headers(req(), True)
    chain.take_actions()
    chain.send_local_reply(LocalReply(404, b"no route\n", details="no_route"))
    assert kinds(chain.take_actions()) == ["AbortUpstream", "SendResponseHeaders", "SendResponseData"]
    assert ("f1", "resp_headers", "404", False) in log and ("f0", "resp_headers", "404", False) in log


def test_local_reply_after_response_started_resets() -> None:
    chain, streams, _ = build({})
    chain.request_headers(req(), True)
    chain.response_headers(resp(), False)
    chain.take_actions()
    streams[0].callbacks.send_local_reply(LocalReply(500))  # type: ignore[union-attr]
    assert kinds(chain.take_actions()) == ["ResetStream"]


def test_local_reply_from_own_reply_encoding_does_not_loop() -> None:
    def reply_again(stream: Scripted, status: str, eos: bool) -> FilterStatus:
        if status == "403":
            stream.callbacks.send_local_reply(LocalReply(500, b"again"))  # type: ignore[union-attr]
        return C

    def deny(stream: Scripted, eos: bool) -> FilterStatus:
        stream.callbacks.send_local_reply(LocalReply(403, b"no"))  # type: ignore[union-attr]
        return S

    chain, _, _ = build({"req_headers": deny, "resp_headers": reply_again})
    chain.request_headers(req(), True)
    actions = chain.take_actions()
    statuses = [a.headers.get(":status") for a in actions if isinstance(a, SendResponseHeaders)]
    assert statuses == ["500"]


def test_reset_from_a_filter() -> None:
    chain, streams, _ = build({"req_headers": S})
    chain.request_headers(req(), True)
    streams[0].callbacks.reset()  # type: ignore[union-attr]
    actions = chain.take_actions()
    assert len(actions) == 1 and isinstance(actions[0], ResetStream)
    chain.request_data(b"late", True)  # ignored after a reset
    assert chain.take_actions() == []


def test_crashing_stream_becomes_a_503() -> None:
    def boom(stream: Scripted, eos: bool) -> FilterStatus:
        raise RuntimeError("bug")

    chain, _, _ = build({"req_headers": boom})
    chain.request_headers(req(), True)
    actions = chain.take_actions()
    assert isinstance(actions[0], AbortUpstream) and actions[0].reply.status == 503


def test_complete_runs_once_per_stream() -> None:
    chain, streams, _ = build({}, {"req_headers": S})
    chain.request_headers(req(), True)
    chain.reset("client went away")
    chain.complete()
    chain.complete()
    assert [s.completed for s in streams] == [1, 1]


def test_on_actions_wakes_the_io_side_for_async_events() -> None:
    chain, streams, _ = build({"req_headers": S})
    woken: list[int] = []
    chain.on_actions = lambda: woken.append(1)
    chain.request_headers(req(), True)
    assert woken == []
    streams[0].callbacks.continue_request()  # type: ignore[union-attr]
    assert woken == [1]


def test_feeding_calls_leave_the_actions_to_the_feeder_and_handled_events_wake_it() -> None:
    """The I/O side drains actions after its own feeding calls (with filters or without), so those
    never wake it; an event it did not feed (a local reply, a filter's late callback) does."""
    for scripts in ({"req_headers": C, "resp_headers": C}, None):
        chain, _, _ = build(scripts) if scripts is not None else build()
        woken: list[int] = []
        chain.on_actions = lambda: woken.append(1)  # noqa: B023 - used within the iteration
        chain.request_headers(req(), True)
        assert kinds(chain.take_actions()) == ["ForwardRequestHeaders"] and woken == []
        chain.send_local_reply(LocalReply(502, b"upstream connect error\n", details="upstream_connect_failure"))
        assert woken == [1]
        assert kinds(chain.take_actions()) == ["AbortUpstream", "SendResponseHeaders", "SendResponseData"]


# -- real filters on the real host -----------------------------------------------------------------


class _NullHost:
    def http_call(self, *args: Any) -> bool:
        return False

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Any:
        class _T:
            def cancel(self) -> None:
                pass

        return _T()

    def log(self, plugin: str, level: Any, message: str) -> None:
        pass


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from sluice import abi

    rt = abi.Runtime(cache_dir=tmp_path_factory.mktemp("wasm-cache"))
    yield rt
    rt.close()


def _plugin(runtime: Any, name: str) -> Any:
    from sluice import abi

    path = FIXTURES / f"{name}.wasm"
    if not path.exists():
        pytest.skip(f"{path} not built")
    return runtime.load(abi.PluginSpec(name=name, module_path=path), _NullHost())


def _real_chain(runtime: Any, *names: str, max_body_buffer: int = 1 << 20) -> tuple[FilterChain, list[Any]]:
    plugins = [_plugin(runtime, n) for n in names]
    info = StreamInfo()
    chain = FilterChain(
        [(n, p.new_stream) for n, p in zip(names, plugins, strict=True)], info, max_body_buffer=max_body_buffer
    )
    return chain, plugins


def test_real_headers_filter_rewrites_before_forwarding(runtime: Any) -> None:
    chain, _ = _real_chain(runtime, "headers")
    chain.request_headers(req("/x"), True)
    fwd = chain.take_actions()[0]
    assert isinstance(fwd, ForwardRequestHeaders) and fwd.headers.get("x-as-seen") == "GET /x"
    chain.response_headers(resp(), True)
    out = chain.take_actions()[0]
    assert isinstance(out, SendResponseHeaders) and out.headers.get("x-as-filter") == "headers"
    chain.complete()


def test_real_local_reply_is_seen_by_the_replying_filters_encoder(runtime: Any) -> None:
    # headers (f0) adds x-as-filter on responses; local_reply (f1) replies 403 to /deny.
    chain, _ = _real_chain(runtime, "headers", "local_reply")
    chain.request_headers(req("/deny/me"), True)
    actions = chain.take_actions()
    assert kinds(actions) == ["AbortUpstream", "SendResponseHeaders", "SendResponseData"]
    headers = actions[1].headers  # type: ignore[union-attr]
    assert headers.get(":status") == "403" and headers.get("x-denied") == "1"
    assert headers.get("x-as-filter") == "headers"  # f0 encoded the reply of f1
    assert actions[2] == SendResponseData(b"denied by as", True)
    chain.complete()


def test_real_body_filter_buffers_and_rewrites_both_ways(runtime: Any) -> None:
    chain, _ = _real_chain(runtime, "body")
    chain.request_headers(req(method="POST"), False)
    chain.request_data(b"hello ", False)
    chain.request_data(b"world", True)
    actions = chain.take_actions()
    assert kinds(actions) == ["ForwardRequestHeaders", "ForwardRequestData"]
    assert actions[1] == ForwardRequestData(b"HELLO WORLD", True)
    chain.response_headers(resp(), False)
    chain.response_data(b"ok", False)
    chain.response_data(b"!", True)
    actions = chain.take_actions()
    assert kinds(actions) == ["SendResponseHeaders", "SendResponseData"]
    assert actions[1] == SendResponseData(b"[as]ok!", True)
    chain.complete()


def test_real_body_filter_over_limit_gets_413(runtime: Any) -> None:
    chain, _ = _real_chain(runtime, "body", max_body_buffer=8)
    chain.request_headers(req(method="POST"), False)
    chain.request_data(b"0123456789", False)
    actions = chain.take_actions()
    assert any(isinstance(a, SendResponseHeaders) and a.headers.get(":status") == "413" for a in actions)
    chain.complete()
