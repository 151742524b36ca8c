"""Logs: the JSON access log, and filter logs with per-filter rate limiting.

Access log: one JSON object per request, to stdout or to the file `access_log` names. Fields: see
`access_record` and docs/admin.md. `AccessLog` encodes records with orjson into a buffer that is
written when it reaches 256 KiB, 100 ms after its first line, and on shutdown (`close()`): one
write per many requests instead of a `logging` call per request, and nothing lost on SIGTERM
(`sluice run` drains, then closes the log).

Filter logs: every line a filter writes (`proxy_log`, WASI stdout/stderr) or the host writes about
it (traps, reload failures) goes through `FilterLogs.log`, which logs it on `sluice.filter.<name>`
with the filter's name in the message and in `record.filter`. The per-filter level is applied
inside `abi` (`Plugin.log_level`, changed by `POST /logging`); here each filter gets a token bucket
(default 50 lines/s, burst 100) so a chatty filter cannot flood the log. Lines beyond it are
dropped and counted; a "suppressed N lines" notice follows at most every `notice_interval_s`
(on the filter's next line, or from a timer when it fell silent).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

import orjson

from sluice import AB_FILTER
from sluice.abi import LogLevel

PYTHON_LEVELS: dict[LogLevel, int] = {
    LogLevel.TRACE: 5,
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARN: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.CRITICAL: logging.CRITICAL,
}

# -- access log ------------------------------------------------------------------------------------


_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))
"""The text after the seconds for each millisecond (a table lookup instead of a formatted int)."""

_last: list[Any] = [-1, "", -1, ""]
"""The last millisecond formatted and its text, and the last second and its text: under load many
requests start within one millisecond (one floor division then), and all within one second."""


def format_time(epoch_ns: int) -> str:
    """RFC 3339 UTC with milliseconds: 2026-01-02T03:04:05.678Z."""
    last = _last
    ms = epoch_ns // 1_000_000
    if ms == last[0]:
        return last[1]  # type: ignore[no-any-return]
    seconds, millis = divmod(ms, 1000)
    if seconds != last[2]:
        last[2] = seconds
        last[3] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    text: str = last[3] + _MILLIS[millis]
    last[0] = ms
    last[1] = text
    return text


def access_record(
    start_ns: int,
    method: str,
    path: str,
    status: int,
    bytes_sent: int,
    bytes_received: int,
    duration_ns: int,
    upstream: str,
    cluster: str,
    route: str,
    variant: str | None,
    filters: Sequence[str],
    source: str,
    local_reply: str | None,
) -> dict[str, Any]:
    """The fields of one access log line (documented in docs/admin.md)."""
    return {
        "time": format_time(start_ns),
        "method": method,
        "path": path,
        "status": status,
        "bytes": bytes_sent,
        "bytes_received": bytes_received,
        "duration_ms": duration_ns // 1000 / 1000,  # µs precision; round() costs a float-to-text pass
        "upstream": upstream or None,
        "cluster": cluster or None,
        "route": route or None,
        "variant": variant,
        "filters": filters if type(filters) is list else list(filters),
        "local_reply": local_reply,
        "source": source,
    }


def access_line(record: dict[str, Any]) -> str:
    return orjson.dumps(record).decode()


class AccessLogError(OSError):
    """The access log destination cannot be opened (the message names it)."""


class AccessLog:
    """Buffered JSON lines to a binary stream (a file opened for append, or stdout)."""

    FLUSH_BYTES = 256 * 1024
    """Large enough that the 100 ms timer, not the size, paces the writes up to ~2.5 MB/s of log
    (~8k requests/s): at most 10 writes a second. Each write to a file in the config file's
    directory also wakes the hot-reload watcher (~0.7 ms of CPU per wake-up, measured)."""
    FLUSH_INTERVAL_S = 0.1

    def __init__(self, stream: IO[bytes], *, owned: bool) -> None:
        self._stream = stream
        self._owned = owned
        self._buffer = bytearray()
        """Encoded lines not yet written. One growing buffer, not a list of the lines: orjson's
        output is freed as soon as it is copied in, and keeping ~1,000 of them alive until the
        flush made each `dumps` ten times slower (6.7 us instead of 0.6, measured: its
        allocations then missed the allocator's warm chunks)."""
        self._count = 0
        self._timer: asyncio.TimerHandle | None = None
        self.lines_written = 0
        self.write_errors = 0

    @classmethod
    def open(cls, destination: str) -> AccessLog:
        """"stdout", or a file path (appended to, created if missing)."""
        if destination == "stdout":
            return cls(sys.stdout.buffer, owned=False)
        try:
            fd = os.open(destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise AccessLogError(exc.errno, f"cannot open access log {destination}: {exc.strerror}") from None
        return cls(os.fdopen(fd, "ab", buffering=0), owned=True)

    def write(self, record: dict[str, Any]) -> None:
        buffer = self._buffer
        buffer += orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        self._count += 1
        if len(buffer) >= self.FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._count:
            return
        data = self._buffer
        count = self._count
        self._buffer = bytearray()
        self._count = 0
        try:
            view = memoryview(data)
            while view:
                written = self._stream.write(view)
                if written is None:  # a non-blocking stream that took nothing; try once more
                    written = self._stream.write(view) or 0
                    if not written:
                        raise BlockingIOError("access log stream does not accept data")
                view = view[written:]
            self._stream.flush()
            self.lines_written += count
        except (OSError, ValueError) as exc:
            self.write_errors += count
            logging.getLogger("sluice.server").error("access log: %d lines lost: %s", count, exc)

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._stream.close()


def variant_header(chain: Sequence[Any]) -> str:
    """The request header that carries the A/B variant, read from the chain's config: the header
    the A/B filter's config names (its `header`) when the chain has that filter, else its default."""
    for entry in chain:
        module = str(getattr(entry, "module", ""))
        config = getattr(entry, "config", None)
        if module.rsplit("/", 1)[-1] == AB_FILTER.module and isinstance(config, dict):
            header = config.get(AB_FILTER.header_key)
            if isinstance(header, str) and header:
                return header.lower()
    return AB_FILTER.default_header


# -- filter logs -----------------------------------------------------------------------------------


class _Timer(Protocol):
    def cancel(self) -> object: ...


class _Bucket:
    __slots__ = ("tokens", "updated", "suppressed", "last_notice", "timer")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.updated = now
        self.suppressed = 0
        self.last_notice = now
        self.timer: _Timer | None = None


class FilterLogs:
    """Per-filter token buckets in front of the `sluice.filter.<name>` loggers.

    `clock` and `call_later` are injectable so tests control time; `call_later(delay, fn)` (e.g.
    `loop.call_later`) schedules the notice for a filter that stopped logging while suppressed.
    """

    def __init__(
        self,
        rate: float = 50.0,
        burst: float = 100.0,
        notice_interval_s: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        call_later: Callable[[float, Callable[[], None]], _Timer] | None = None,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.notice_interval_s = notice_interval_s
        self._clock = clock
        self._call_later = call_later
        self._buckets: dict[str, _Bucket] = {}
        self.suppressed_total: dict[str, int] = {}
        """Lines dropped per filter since start (exported on /filters)."""

    @staticmethod
    def logger(plugin: str) -> logging.Logger:
        return logging.getLogger(f"sluice.filter.{plugin}")

    @classmethod
    def set_level(cls, plugin: str, level: LogLevel) -> None:
        """Let the filter's Python logger pass every line the filter emits at `level` (the level
        itself is applied in `abi`; without this the logger would stay at the root's INFO)."""
        cls.logger(plugin).setLevel(PYTHON_LEVELS[level])

    def log(self, plugin: str, level: LogLevel, message: str) -> bool:
        """Log one filter line unless its bucket is empty. Returns whether it was logged."""
        logger = self.logger(plugin)
        py_level = PYTHON_LEVELS.get(level, logging.INFO)
        if not logger.isEnabledFor(py_level):
            return False
        now = self._clock()
        bucket = self._buckets.get(plugin)
        if bucket is None:
            bucket = self._buckets[plugin] = _Bucket(self.burst, now)
        elapsed = now - bucket.updated
        if elapsed > 0:
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        if bucket.tokens < 1.0:
            bucket.suppressed += 1
            self.suppressed_total[plugin] = self.suppressed_total.get(plugin, 0) + 1
            if now - bucket.last_notice >= self.notice_interval_s:
                self._notice(plugin, bucket, now)
            elif bucket.timer is None and self._call_later is not None:
                delay = max(self.notice_interval_s - (now - bucket.last_notice), 0.0)
                bucket.timer = self._call_later(delay, lambda: self._timer_fired(plugin))
            return False
        bucket.tokens -= 1.0
        if bucket.suppressed and now - bucket.last_notice >= self.notice_interval_s:
            self._notice(plugin, bucket, now)
        logger.log(py_level, "[%s] %s", plugin, message, extra={"filter": plugin})
        return True

    def _timer_fired(self, plugin: str) -> None:
        bucket = self._buckets.get(plugin)
        if bucket is None:
            return
        bucket.timer = None
        if bucket.suppressed:
            self._notice(plugin, bucket, self._clock())

    def _notice(self, plugin: str, bucket: _Bucket, now: float) -> None:
        count, bucket.suppressed = bucket.suppressed, 0
        bucket.last_notice = now
        if bucket.timer is not None:
            bucket.timer.cancel()
            bucket.timer = None
        self.logger(plugin).warning(
            "[%s] suppressed %d lines (filter log rate limit: %g lines/s, burst %g)",
            plugin, count, self.rate, self.burst, extra={"filter": plugin},
        )

    def flush(self) -> None:
        """Emit pending "suppressed" notices now (shutdown)."""
        now = self._clock()
        for plugin, bucket in self._buckets.items():
            if bucket.suppressed:
                self._notice(plugin, bucket, now)

    def close(self) -> None:
        for bucket in self._buckets.values():
            if bucket.timer is not None:
                bucket.timer.cancel()
                bucket.timer = None
