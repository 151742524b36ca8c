"""`FilterChain`: the per-request filter manager, as a sans-I/O state machine.

Typed events go in through one entry point, `handle(event)`: request/response headers, data and
trailers from the sockets, and the continue/local-reply/reset events the filters raise through
their `abi.StreamCallbacks` (the methods `request_headers()`... are shorthands for `handle`).
Typed actions come out (`take_actions()`), for the server to perform. No socket, no event loop,
no clock, so it is tested by feeding events and looking at actions.

Semantics follow Envoy's filter manager (reference sections 2.3-2.4):

* decoding runs the filters in order, encoding in reverse order;
* STOP on headers holds the stream at that filter; body that arrives meanwhile is held too and
  delivered to that filter as one accumulated buffer once it continues;
* STOP on a body callback means "buffer": chunks keep being appended to the same `bytearray` and
  the filter is called again with everything so far (and end_of_stream once it comes);
* a body held beyond `max_body_buffer` ends the request with a local reply: 413 while decoding,
  500 while encoding (or a reset when the response has already started);
* a local reply from filter i while decoding is encoded by filters i, i-1, ..., 0 (the replying
  filter sees its own reply) and the upstream is never used; once encoding has started it replaces
  the response directly if nothing was sent yet, else the stream can only be reset;
* `complete()` finishes every filter stream exactly once.

Filter callbacks may arrive re-entrantly (from inside a stream method, after the VM returned) or
later from the event loop. An event that finds the chain idle is handled at once; one raised
while a filter call of the chain is on the stack waits in a queue until that call unwinds, so the
machine never runs a filter while another filter call of the same chain is still on the stack.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sluice.abi import FilterStatus, HeaderMap, LocalReply, StreamCallbacks, StreamInfo

from .http import local_reply_headers

log = logging.getLogger("sluice.chain")

CONTINUE = FilterStatus.CONTINUE


class FilterStream(Protocol):
    """The part of `abi.HttpStream` the chain drives (tests may pass look-alikes)."""

    reads_request_body: bool
    """The filter's request-body callback runs: it may change the body's length."""
    reads_response_body: bool

    def request_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus: ...

    def request_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus: ...

    def request_trailers(self, trailers: HeaderMap) -> FilterStatus: ...

    def response_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus: ...

    def response_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus: ...

    def response_trailers(self, trailers: HeaderMap) -> FilterStatus: ...

    def complete(self) -> None: ...


StreamFactory = Callable[[StreamInfo, StreamCallbacks], FilterStream]
"""Creates one filter's stream for a request given the callbacks it must use (`plugin.new_stream`)."""

ChainEntry = tuple[str, StreamFactory]
"""A filter of a chain: its name and how it makes a request's stream (built once per config)."""


# -- actions -----------------------------------------------------------------------------------
# Values the chain hands out and never looks at again: read-only by convention, not frozen, since
# a frozen dataclass's __init__ sets each field through object.__setattr__ and every request
# makes three of them (the events, made only when they must wait in the queue, stay frozen).
@dataclasses.dataclass(slots=True)
class ForwardRequestHeaders:
    """All filters continued: route on these headers and start the upstream request."""

    headers: HeaderMap
    end_of_stream: bool


@dataclasses.dataclass(slots=True)
class ForwardRequestData:
    data: bytes
    end_of_stream: bool


@dataclasses.dataclass(slots=True)
class ForwardRequestTrailers:
    trailers: HeaderMap


@dataclasses.dataclass(slots=True)
class SendResponseHeaders:
    """Response headers for the client (`:status` first)."""

    headers: HeaderMap
    end_of_stream: bool


@dataclasses.dataclass(slots=True)
class SendResponseData:
    data: bytes
    end_of_stream: bool


@dataclasses.dataclass(slots=True)
class SendResponseTrailers:
    trailers: HeaderMap


@dataclasses.dataclass(slots=True)
class AbortUpstream:
    """A local reply took over: stop (or never start) the upstream exchange, drop request body."""

    reply: LocalReply


@dataclasses.dataclass(slots=True)
class ResetStream:
    """Abort both connections without a (further) response."""

    reason: str


Action = (
    ForwardRequestHeaders
    | ForwardRequestData
    | ForwardRequestTrailers
    | SendResponseHeaders
    | SendResponseData
    | SendResponseTrailers
    | AbortUpstream
    | ResetStream
)


# -- events ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class RequestHeaders:
    """The client's request headers (as `downstream_request_headers` made them)."""

    headers: HeaderMap
    end_of_stream: bool


@dataclasses.dataclass(frozen=True, slots=True)
class RequestData:
    data: bytes | bytearray
    end_of_stream: bool


@dataclasses.dataclass(frozen=True, slots=True)
class RequestTrailers:
    trailers: HeaderMap


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseHeaders:
    """The upstream's response headers (`:status` first)."""

    headers: HeaderMap
    end_of_stream: bool


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseData:
    data: bytes | bytearray
    end_of_stream: bool


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseTrailers:
    trailers: HeaderMap


@dataclasses.dataclass(frozen=True, slots=True)
class ContinueRequest:
    """Filter `index` continued decoding after it stopped (`proxy_continue_stream`)."""

    index: int


@dataclasses.dataclass(frozen=True, slots=True)
class ContinueResponse:
    """Filter `index` continued encoding after it stopped."""

    index: int


@dataclasses.dataclass(frozen=True, slots=True)
class SendLocalReply:
    """Filter `index` answers the request itself; the proxy's own replies (404, 502, 504...)
    come after every filter, as index len(filters) - 1 (Envoy's router is the last filter)."""

    index: int
    reply: LocalReply


@dataclasses.dataclass(frozen=True, slots=True)
class FilterReset:
    """Filter `index` reset the stream."""

    index: int


Event = (
    RequestHeaders
    | RequestData
    | RequestTrailers
    | ResponseHeaders
    | ResponseData
    | ResponseTrailers
    | ContinueRequest
    | ContinueResponse
    | SendLocalReply
    | FilterReset
)


class ChainError(Exception):
    """An event that contradicts HTTP message order (a bug in the caller, not in a filter)."""


# -- one direction -----------------------------------------------------------------------------
class _Slot:
    """Body and trailers queued at one filter of one direction, made when the first of them
    arrives there (a request whose filters read no body never makes one)."""

    __slots__ = ("body", "body_eos", "body_dirty", "body_stopped", "body_done", "trailers", "trailers_stopped")

    def __init__(self) -> None:
        self.body: bytearray | None = None
        self.body_eos = False
        self.body_dirty = False  # something arrived since the filter last saw the body
        self.body_stopped = False  # filter asked to buffer
        self.body_done = False  # filter saw end_of_stream (or trailers passed)
        self.trailers: HeaderMap | None = None
        self.trailers_stopped = False


class _Direction:
    """Headers, body and trailers flowing through `order` (filter indices) to a sink.

    Headers pass the filters in order, one at a time, so where they are is one position:
    every filter before `hpos` continued them; the one at `hpos` has them (being called, or
    stopped on them when `hstopped`); the ones after it have not seen them yet.
    """

    __slots__ = ("chain", "order", "decoding", "slots", "headers", "headers_eos", "hpos", "hstopped",
                 "finished", "aborted", "sink_started")

    def __init__(self, chain: FilterChain, order: Sequence[int], decoding: bool) -> None:
        self.chain = chain
        self.order = order
        self.decoding = decoding
        self.slots: list[_Slot | None] = [None] * len(order)
        self.headers: HeaderMap | None = None
        self.headers_eos = False
        self.hpos = 0
        self.hstopped = False
        self.finished = False  # end of stream reached the sink
        self.aborted = False
        self.sink_started = False  # headers reached the sink

    # -- input at the head of the direction --------------------------------------------------
    def on_headers(self, headers: HeaderMap, end_of_stream: bool) -> None:
        if self.headers is not None:
            raise ChainError("headers twice")
        self.headers = headers
        self.headers_eos = end_of_stream
        self._arrive_headers(0)

    def on_data(self, data: bytes | bytearray, end_of_stream: bool) -> None:
        if self.headers is None or self.headers_eos:
            raise ChainError("data without headers or after end of stream")
        self._arrive_data(0, data, end_of_stream)

    def on_trailers(self, trailers: HeaderMap) -> None:
        if self.headers is None or self.headers_eos:
            raise ChainError("trailers without headers or after end of stream")
        self._arrive_trailers(0, trailers)

    # -- propagation ----------------------------------------------------------------------------
    def _arrive_headers(self, pos: int) -> None:
        """Headers reached position `pos`: run them through every filter that continues.

        Nothing is queued at a filter before its headers reach it (body follows headers), so
        one loop passes them on; what a filter held while it stopped them is delivered by
        `resume`, after this returns."""
        chain = self.chain
        order = self.order
        n = len(order)
        headers = self.headers
        assert headers is not None
        eos = self.headers_eos
        streams = chain.streams
        decoding = self.decoding
        track = chain.track_headers
        if self.aborted or chain._halted:
            self.hpos = pos
            return
        # `hpos` is written when the loop leaves: nothing reads it while a filter runs (what a
        # filter raises waits in the chain's queue until this returns).
        while pos < n:
            index = order[pos]
            stream = streams[index]
            # A Python exception out of a stream method is a host bug; the request fails like a
            # filter failure instead of taking the proxy down. The map's write count is how
            # "changed headers" is seen (only when someone reads it).
            before = headers.writes
            try:
                status = stream.request_headers(headers, eos) if decoding else stream.response_headers(headers, eos)
            except Exception:
                status = chain._filter_crashed(index)
            else:
                if status is not CONTINUE or (track and headers.writes != before):
                    chain.acted |= 1 << index
                if chain._queue:
                    status = chain._overridden(index, status)
            if self.aborted or chain._halted:
                self.hpos = pos
                return
            if status is not CONTINUE:
                self.hpos = pos
                self.hstopped = True
                return
            pos += 1
        self.hpos = n
        self.sink_started = True
        if eos:
            self.finished = True
        # The sink: the upstream request, or the client's response.
        if decoding:
            chain._actions.append(ForwardRequestHeaders(headers, eos))
        else:
            chain._response_started = True
            chain._actions.append(SendResponseHeaders(headers, eos))

    def _arrive_data(self, pos: int, data: bytes | bytearray, end_of_stream: bool) -> None:
        slots = self.slots
        n = len(slots)
        slot: _Slot | None = None
        while pos < n:
            slot = slots[pos]
            if (slot is not None and slot.body is not None) or pos >= self.hpos:
                break
            stream = self.chain.streams[self.order[pos]]
            if stream.reads_request_body if self.decoding else stream.reads_response_body:
                break
            # No body callback, headers passed and nothing held: the data passes this filter
            # untouched (no copy into a buffer, no call), as cpp-host skips callbacks not exported.
            pos += 1
        if pos == n:
            if end_of_stream:
                self.finished = True
            data = bytes(data)
            self.chain._actions.append(
                ForwardRequestData(data, end_of_stream) if self.decoding else SendResponseData(data, end_of_stream)
            )
            return
        if slot is None:
            slot = slots[pos] = _Slot()
        if slot.body is None:
            # Hand the buffer over without copying when the previous filter is done with it.
            slot.body = data if isinstance(data, bytearray) else bytearray(data)
        else:
            slot.body += data
        slot.body_eos = slot.body_eos or end_of_stream
        slot.body_dirty = True
        holding = (pos == self.hpos and self.hstopped) or slot.body_stopped or slot.trailers_stopped
        if holding and len(slot.body) > self.chain.max_body_buffer:
            self.chain._overflow(self, pos)
            return
        self._pump(pos)

    def _arrive_trailers(self, pos: int, trailers: HeaderMap) -> None:
        if pos == len(self.order):
            self.finished = True
            self.chain._actions.append(
                ForwardRequestTrailers(trailers) if self.decoding else SendResponseTrailers(trailers)
            )
            return
        slot = self.slots[pos]
        if slot is None:
            slot = self.slots[pos] = _Slot()
        slot.trailers = trailers
        self._pump(pos)

    def _pump(self, pos: int) -> None:
        """Run filter `pos` on the body and trailers queued for it, passing results on (once
        its headers continued; until then they wait)."""
        if self.aborted or self.chain._halted or pos >= self.hpos:
            return
        slot = self.slots[pos]
        if slot is None:
            return
        index = self.order[pos]
        # Body: call the filter only when something new arrived for it.
        if slot.body is not None and slot.body_dirty and not slot.body_done:
            slot.body_dirty = False
            body = slot.body
            status = self.chain._call_body(self, index, body, slot.body_eos)
            if self.aborted or self.chain._halted:
                return
            if status is CONTINUE:
                self._release_body(pos)
                if self.aborted or self.chain._halted:
                    return
            else:
                slot.body_stopped = True
                if len(body) > self.chain.max_body_buffer:
                    self.chain._overflow(self, pos)
                    return
        if slot.trailers is None or slot.trailers_stopped:
            return
        # Trailers reach the filter even while it buffers body (Envoy calls decodeTrailers then);
        # continuing them releases the buffered body first.
        status = self.chain._call_trailers(self, index, slot.trailers)
        if self.aborted or self.chain._halted:
            return
        if status is not CONTINUE:
            slot.trailers_stopped = True
            return
        if slot.body is not None:
            self._release_body(pos)
        self._release_trailers(pos)

    def _release_body(self, pos: int) -> None:
        slot = self.slots[pos]
        assert slot is not None
        body, eos = slot.body, slot.body_eos
        slot.body = None
        slot.body_stopped = False
        if eos:
            slot.body_done = True
        if body is not None:
            self._arrive_data(pos + 1, body, eos)

    def _release_trailers(self, pos: int) -> None:
        slot = self.slots[pos]
        assert slot is not None
        trailers = slot.trailers
        slot.trailers = None
        slot.trailers_stopped = False
        slot.body_done = True
        if trailers is not None:
            self._arrive_trailers(pos + 1, trailers)

    def resume(self, index: int) -> None:
        """The filter at `index` continued (after STOP on headers, body or trailers)."""
        if self.aborted or index not in self.order:
            return
        pos = self.order.index(index)
        if pos == self.hpos and self.hstopped:
            self.hstopped = False
            self._arrive_headers(pos + 1)
            # Body held while the filter sat on the headers is now delivered to it, as one buffer.
            self._pump(pos)
            return
        slot = self.slots[pos]
        if slot is None:
            return  # the filter was not holding anything: a stale or duplicate continue
        if slot.body_stopped:
            self._release_body(pos)
            self._pump(pos)
        elif slot.trailers_stopped:
            if slot.body is not None:
                # The filter buffered body until trailers and now releases both.
                self._release_body(pos)
            self._release_trailers(pos)
        # Otherwise the filter was not holding anything: a stale or duplicate continue.

    def frontier(self) -> int:
        """Highest filter index that has seen this direction's headers, or -1."""
        order = self.order
        if self.headers is None or not order:
            return -1
        return max(order[: min(self.hpos, len(order) - 1) + 1])


# -- the chain ---------------------------------------------------------------------------------

class _Callbacks(tuple["FilterChain", int]):
    """The `abi.StreamCallbacks` handed to filter `index`: each call becomes an event, handled
    at once when the chain is idle, queued when it comes from inside a filter call.

    A (chain, index) pair made by `tuple.__new__`: one per filter and request, so no Python
    `__init__` runs to make it."""

    __slots__ = ()

    def continue_request(self) -> None:
        chain, index = self
        chain.handle(ContinueRequest(index))

    def continue_response(self) -> None:
        chain, index = self
        chain.handle(ContinueResponse(index))

    def send_local_reply(self, reply: LocalReply) -> None:
        chain, index = self
        # After complete() (a callout answering after the client left) there is nothing to act on;
        # a halted chain ignores the event itself.
        if not chain._completed:
            chain.acted |= 1 << index
            chain.handle(SendLocalReply(index, reply))

    def reset(self) -> None:
        chain, index = self
        if not chain._completed:
            chain.acted |= 1 << index
            chain.handle(FilterReset(index))


_new_callbacks = tuple.__new__


class FilterChain:
    """One request's trip through the filters. Create, feed events, drain `take_actions()`."""

    __slots__ = ("max_body_buffer", "track_headers", "entries", "_actions", "_queue", "_running", "_halted",
                 "_completed", "local_reply", "reset_reason", "acted", "on_actions", "streams", "_dec", "_enc",
                 "_response_started")

    def __init__(
        self,
        entries: Sequence[ChainEntry],
        info: StreamInfo,
        *,
        max_body_buffer: int = 1 << 20,
        track_headers: bool = True,
    ) -> None:
        self.max_body_buffer = max_body_buffer
        self.track_headers = track_headers
        """Compare headers before and after each filter's headers callback, so that `acted`
        covers "changed headers" (the access log's `filters`); off when nothing reads it."""
        self._actions: list[Action] = []
        self._queue: list[Event] = []
        """Events raised while a filter call is on the stack, handled once it unwinds."""
        self._running = False
        self._halted = False  # reset: nothing more happens
        self._completed = False
        self.local_reply: LocalReply | None = None
        """The local reply that answered this request, if any (for stats and logs)."""
        self.reset_reason: str | None = None
        self.acted = 0
        """Bit i set: filter i paused the stream, replied, reset or changed headers (access log)."""
        self.on_actions: Callable[[], None] | None = None
        """Called when `handle` (a filter's callback from a timer or a callout, a proxy's local
        reply) made actions available: the I/O side wakes its action loop. After its own feeding
        calls (`request_headers()`, `request_data()`, `response_headers()`, `response_data()`)
        the I/O side drains `take_actions()` itself, so those do not call it."""
        self.entries = entries
        """The filters, in decoding order (index i: `streams[i]`)."""
        self.streams: list[FilterStream] = []
        streams = self.streams
        for index, (_name, new_stream) in enumerate(entries):
            streams.append(new_stream(info, _new_callbacks(_Callbacks, (self, index))))
        self._dec = _Direction(self, range(len(self.streams)), decoding=True)
        self._enc: _Direction | None = None
        self._response_started = False  # response headers went to the client

    # -- public events -----------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        """Feed one event. Raised from inside a filter call, it is handled once that unwinds."""
        if self._halted:
            return
        if self._running:
            self._queue.append(event)
            return
        self._running = True
        try:
            _dispatch(self, event)
            if self._queue:
                self._drain()
        finally:
            self._running = False
        if self._actions and self.on_actions is not None:
            self.on_actions()

    def _drain(self) -> None:
        """Handle what the filters raised while the chain was running, in order (it still is)."""
        queue = self._queue
        while queue and not self._halted:
            _dispatch(self, queue.pop(0))

    # The shorthands below skip building an event when it is handled at once (the usual case:
    # the sockets feed an idle chain): the chain runs the event's handler (or, for headers and
    # data, the direction it goes to) itself, then what the filters raised meanwhile.
    def request_headers(self, headers: HeaderMap, end_of_stream: bool) -> None:
        if self._running or self._halted:
            self.handle(RequestHeaders(headers, end_of_stream))
            return
        self._running = True
        try:
            self._dec.on_headers(headers, end_of_stream)
            if self._queue:
                self._drain()
        finally:
            self._running = False

    def request_data(self, data: bytes | bytearray, end_of_stream: bool) -> None:
        if self._running or self._halted:
            self.handle(RequestData(data, end_of_stream))
            return
        self._running = True
        try:
            self._on_request_data(data, end_of_stream)
            if self._queue:
                self._drain()
        finally:
            self._running = False

    def request_trailers(self, trailers: HeaderMap) -> None:
        self.handle(RequestTrailers(trailers))

    def response_headers(self, headers: HeaderMap, end_of_stream: bool) -> None:
        if self._running or self._halted:
            self.handle(ResponseHeaders(headers, end_of_stream))
            return
        self._running = True
        try:
            self._on_response_headers(headers, end_of_stream)
            if self._queue:
                self._drain()
        finally:
            self._running = False

    def response_data(self, data: bytes | bytearray, end_of_stream: bool) -> None:
        if self._running or self._halted:
            self.handle(ResponseData(data, end_of_stream))
            return
        self._running = True
        try:
            self._on_response_data(data, end_of_stream)
            if self._queue:
                self._drain()
        finally:
            self._running = False

    def response_trailers(self, trailers: HeaderMap) -> None:
        self.handle(ResponseTrailers(trailers))

    def send_local_reply(self, reply: LocalReply) -> None:
        """A reply from the proxy itself, after the filters (Envoy's router: 404, 502, 504...)."""
        self.handle(SendLocalReply(len(self.streams) - 1, reply))

    def reset(self, reason: str = "reset") -> None:
        """The client or the upstream went away: stop everything (no action is produced)."""
        self._halted = True
        self.reset_reason = self.reset_reason or reason
        self._queue.clear()

    def take_actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def complete(self) -> None:
        """Finish every filter stream exactly once (log, done, delete in the VM)."""
        if self._completed:
            return
        self._completed = True
        self._halted = True
        self._queue.clear()
        streams = self.streams
        if streams:
            for index, stream in enumerate(streams):
                try:
                    stream.complete()
                except Exception:
                    log.exception("filter %s: complete() failed", self.entries[index][0])
            # Break the reference cycles (chain -> streams -> callbacks -> chain) so that a
            # finished request is freed by reference counting at once: left to the cycle
            # collector, requests pile up and collections become pauses. A late callback finds
            # the chain halted.
            self.streams = []
        # And chain <-> directions, chain -> I/O side -> chain.
        self.on_actions = None
        for direction in (self._dec, self._enc):
            if direction is not None:
                direction.slots = []
                del direction.chain

    # -- state queries -----------------------------------------------------------------------
    @property
    def request_forwarded(self) -> bool:
        """Request headers passed every filter (the upstream may be contacted)."""
        return self._dec.sink_started and self.local_reply is None

    @property
    def request_complete(self) -> bool:
        return self._dec.finished

    @property
    def response_started(self) -> bool:
        return self._response_started

    @property
    def response_complete(self) -> bool:
        return self._enc is not None and self._enc.finished

    @property
    def halted(self) -> bool:
        return self._halted

    def may_change_body(self, *, request: bool) -> bool:
        """Whether a filter of the chain may change the length of the request (or response) body:
        then a body that streams cannot keep the Content-Length it came with."""
        if request:
            return any(stream.reads_request_body for stream in self.streams)
        return any(stream.reads_response_body for stream in self.streams)

    def acted_filters(self) -> list[str]:
        """Names of the filters that paused, replied locally, reset or changed headers."""
        acted = self.acted
        if not acted:
            return []
        return [name for i, (name, _) in enumerate(self.entries) if acted >> i & 1]

    # -- handlers: headers and data take the event's fields (they are also called directly) ----
    def _on_request_headers(self, headers: HeaderMap, end_of_stream: bool) -> None:
        self._dec.on_headers(headers, end_of_stream)

    def _on_request_data(self, data: bytes | bytearray, end_of_stream: bool) -> None:
        if not self._dec.aborted:
            self._dec.on_data(data, end_of_stream)

    def _on_request_trailers(self, event: RequestTrailers) -> None:
        if not self._dec.aborted:
            self._dec.on_trailers(event.trailers)

    def _on_response_headers(self, headers: HeaderMap, end_of_stream: bool) -> None:
        if self._enc is not None:
            return  # a local reply already answered; the upstream response is moot
        n = len(self.streams)
        self._enc = _Direction(self, range(n - 1, -1, -1), decoding=False)
        self._enc.on_headers(headers, end_of_stream)

    def _on_response_data(self, data: bytes | bytearray, end_of_stream: bool) -> None:
        if self._enc is not None and not self._enc.aborted and self.local_reply is None:
            self._enc.on_data(data, end_of_stream)

    def _on_response_trailers(self, event: ResponseTrailers) -> None:
        if self._enc is not None and not self._enc.aborted and self.local_reply is None:
            self._enc.on_trailers(event.trailers)

    def _on_continue_request(self, event: ContinueRequest) -> None:
        self._dec.resume(event.index)

    def _on_continue_response(self, event: ContinueResponse) -> None:
        if self._enc is not None:
            self._enc.resume(event.index)

    def _on_local_reply(self, event: SendLocalReply) -> None:
        self._local_reply(event.index, event.reply)

    def _on_filter_reset(self, event: FilterReset) -> None:
        self._reset(f"reset by filter {self.entries[event.index][0]}")

    # -- filter calls ----------------------------------------------------------------------------
    # (Headers callbacks are called by `_Direction._arrive_headers`, in its loop.)
    # A Python exception out of a stream method is a host bug; the request fails like a filter
    # failure instead of taking the proxy down.
    def _call_body(self, d: _Direction, index: int, body: bytearray, eos: bool) -> FilterStatus:
        stream = self.streams[index]
        try:
            status = stream.request_body(body, eos) if d.decoding else stream.response_body(body, eos)
        except Exception:
            return self._filter_crashed(index)
        if status is not CONTINUE:
            self.acted |= 1 << index
        return self._overridden(index, status)

    def _call_trailers(self, d: _Direction, index: int, trailers: HeaderMap) -> FilterStatus:
        stream = self.streams[index]
        try:
            status = stream.request_trailers(trailers) if d.decoding else stream.response_trailers(trailers)
        except Exception:
            return self._filter_crashed(index)
        if status is not CONTINUE:
            self.acted |= 1 << index
        return self._overridden(index, status)

    def _overridden(self, index: int, status: FilterStatus) -> FilterStatus:
        # A filter that replied or reset during its callback stops there whatever it returned
        # (cpp-host overrides the return value the same way).
        if status is CONTINUE and self._queue:
            for event in self._queue:
                if isinstance(event, SendLocalReply | FilterReset) and event.index == index:
                    return FilterStatus.STOP
        return status

    def _filter_crashed(self, index: int) -> FilterStatus:
        self.acted |= 1 << index
        log.exception("filter %s: stream callback raised", self.entries[index][0])
        self._queue.insert(0, SendLocalReply(index, LocalReply(503, b"filter failure\n", details="filter_exception")))
        return FilterStatus.STOP

    # -- local replies and resets --------------------------------------------------------------
    def _overflow(self, d: _Direction, pos: int) -> None:
        if d.decoding:
            reply = LocalReply(413, b"request body too large\n", details="request_payload_too_large")
            self._local_reply(d.order[pos], reply)
        else:
            reply = LocalReply(500, b"response body too large\n", details="response_payload_too_large")
            self._local_reply(-1, reply)

    def _local_reply(self, index: int, reply: LocalReply) -> None:
        if self._halted:
            return
        if self._response_started:
            # Envoy cannot replace a response that is already on the wire either.
            self._reset(f"local reply {reply.status} after response start")
            return
        first = self.local_reply is None
        self.local_reply = reply
        self._dec.aborted = True
        if first:
            self._actions.append(AbortUpstream(reply))
        headers = reply_headers(reply)
        eos = not reply.body
        if self._enc is not None:
            # Encoding already began (upstream response, or a reply to a reply): send directly,
            # so a filter replying from its own response callback cannot loop.
            self._enc.aborted = True
            self._response_started = True
            self._actions.append(SendResponseHeaders(headers, eos))
            if not eos:
                self._actions.append(SendResponseData(reply.body, True))
            self._enc.finished = True
            return
        # Only filters that saw the request headers see the reply: index, index-1, ..., 0.
        last = min(index, self._dec.frontier()) if index >= 0 else -1
        self._enc = _Direction(self, range(last, -1, -1), decoding=False)
        self._enc.on_headers(headers, eos)
        if not eos and not self._enc.aborted and not self._halted:
            self._enc.on_data(reply.body, True)

    def _reset(self, reason: str) -> None:
        if self._halted:
            return
        self.reset_reason = reason
        self._actions.append(ResetStream(reason))
        self._halted = True
        self._queue.clear()


def reply_headers(reply: LocalReply) -> HeaderMap:
    """The response headers of a local reply (Envoy's, with `grpc-status` when it has one)."""
    headers = local_reply_headers(reply.status, reply.body, reply.headers)
    if reply.grpc_status is not None:
        headers.set("grpc-status", str(reply.grpc_status))
    return headers


class PassThrough:
    """The chain of a request no filter sees: what `FilterChain` does with no filter, each input
    turned into its action at once (no directions, no event queue, no filter calls), with the same
    surface for the exchange. A route without filters is the common case of a plain proxy."""

    __slots__ = ("_actions", "_halted", "_replied", "local_reply", "reset_reason", "on_actions", "_response_started")

    def __init__(self) -> None:
        self._actions: list[Action] = []
        self._halted = False  # reset or complete: nothing more happens
        self._replied = False  # a local reply was sent: the upstream's response is moot
        self.local_reply: LocalReply | None = None
        self.reset_reason: str | None = None
        self.on_actions: Callable[[], None] | None = None
        """As `FilterChain.on_actions`: called when `handle`/`send_local_reply` made actions."""
        self._response_started = False

    # -- inputs (the feeding calls leave the actions to the feeder, as FilterChain's) ------------
    def request_headers(self, headers: HeaderMap, end_of_stream: bool) -> None:
        if not self._halted and self.local_reply is None:
            self._actions.append(ForwardRequestHeaders(headers, end_of_stream))

    def request_data(self, data: bytes | bytearray, end_of_stream: bool) -> None:
        if not self._halted and self.local_reply is None:
            self._actions.append(ForwardRequestData(bytes(data), end_of_stream))

    def request_trailers(self, trailers: HeaderMap) -> None:
        if not self._halted and self.local_reply is None:
            self._actions.append(ForwardRequestTrailers(trailers))
            self._wake()

    def response_headers(self, headers: HeaderMap, end_of_stream: bool) -> None:
        if not self._halted and not self._replied:
            self._response_started = True
            self._actions.append(SendResponseHeaders(headers, end_of_stream))

    def response_data(self, data: bytes | bytearray, end_of_stream: bool) -> None:
        if not self._halted and not self._replied and self._response_started:
            self._actions.append(SendResponseData(bytes(data), end_of_stream))

    def response_trailers(self, trailers: HeaderMap) -> None:
        if not self._halted and not self._replied and self._response_started:
            self._actions.append(SendResponseTrailers(trailers))
            self._wake()

    def send_local_reply(self, reply: LocalReply) -> None:
        """A reply from the proxy itself (404, 502, 504...): the upstream is dropped and the
        reply sent, or, once the response has started, the stream can only be reset (Envoy)."""
        if self._halted:
            return
        if self._response_started:
            self._reset_stream(f"local reply {reply.status} after response start")
        else:
            if self.local_reply is None:
                self._actions.append(AbortUpstream(reply))
            self.local_reply = reply
            self._replied = True
            self._response_started = True
            eos = not reply.body
            self._actions.append(SendResponseHeaders(reply_headers(reply), eos))
            if not eos:
                self._actions.append(SendResponseData(reply.body, True))
        self._wake()

    def _reset_stream(self, reason: str) -> None:
        self.reset_reason = reason
        self._actions.append(ResetStream(reason))
        self._halted = True

    def _wake(self) -> None:
        if self._actions and self.on_actions is not None:
            self.on_actions()

    def reset(self, reason: str = "reset") -> None:
        self._halted = True
        self.reset_reason = self.reset_reason or reason

    def take_actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def complete(self) -> None:
        self._halted = True
        self.on_actions = None  # the exchange <-> chain reference

    # -- state queries ---------------------------------------------------------------------------
    @property
    def response_started(self) -> bool:
        return self._response_started

    @property
    def halted(self) -> bool:
        return self._halted

    def may_change_body(self, *, request: bool) -> bool:
        return False

    def acted_filters(self) -> list[str]:
        return []


Chain = FilterChain | PassThrough
"""What an exchange drives: the filters of its route, or none."""


_HANDLERS: dict[type, Callable[[FilterChain, Any], None]] = {
    RequestHeaders: lambda c, e: c._on_request_headers(e.headers, e.end_of_stream),
    RequestData: lambda c, e: c._on_request_data(e.data, e.end_of_stream),
    RequestTrailers: FilterChain._on_request_trailers,
    ResponseHeaders: lambda c, e: c._on_response_headers(e.headers, e.end_of_stream),
    ResponseData: lambda c, e: c._on_response_data(e.data, e.end_of_stream),
    ResponseTrailers: FilterChain._on_response_trailers,
    ContinueRequest: FilterChain._on_continue_request,
    ContinueResponse: FilterChain._on_continue_response,
    SendLocalReply: FilterChain._on_local_reply,
    FilterReset: FilterChain._on_filter_reset,
}
"""One handler per event type: a dict lookup, not a chain of isinstance tests."""


def _dispatch(chain: FilterChain, event: Event) -> None:
    _HANDLERS[type(event)](chain, event)
