"""Logs: the JSON access log line, filter log levels and the per-filter log rate limit."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import wasmtime
from conftest import ROOT, run, upstream
from test_admin import API_KEY, admin_proxy, admin_url, builtin_config, need_filters, proxy_url

from sluice.abi import LogLevel
from sluice.proxy.logs import AccessLog, AccessLogError, FilterLogs, access_record, format_time, variant_header

# A filter that logs one debug and one info line on every request's headers.
CHATTY_WAT = """
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0x100) "chatty debug line")
  (data (i32.const 0x200) "chatty info line")
  (global $heap (mut i32) (i32.const 0x1000))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $n)) (i32.const 0x10000))
      (then (global.set $heap (i32.const 0x1000))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $log (i32.const 1) (i32.const 0x100) (i32.const 17)))
    (drop (call $log (i32.const 2) (i32.const 0x200) (i32.const 16)))
    (i32.const 0))
)
"""


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, logger: str | None = None) -> list[str]:
        return [r.getMessage() for r in self.records if logger is None or r.name == logger]


@pytest.fixture
def capture() -> Iterator[Capture]:
    """A handler on the `sluice` logger at DEBUG (levels restored afterwards)."""
    handler = Capture()
    names = ["sluice", "sluice.access", "sluice.filter.chatty", "sluice.filter.other"]
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).disabled) for n in names}
    root = logging.getLogger("sluice")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    for n, (level, disabled) in saved.items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).disabled = disabled


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTimers:
    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None], FakeTimer]] = []

    def __call__(self, delay: float, fn: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer()
        self.pending.append((delay, fn, timer))
        return timer

    def fire_all(self) -> None:
        pending, self.pending = self.pending, []
        for _delay, fn, timer in pending:
            if not timer.cancelled:
                fn()


class FakeTimer:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


# -- rate limiting (unit, with a fake clock) ----------------------------------------------------------


def test_filter_log_rate_limit_token_bucket(capture: Capture) -> None:
    clock, timers = FakeClock(), FakeTimers()
    logs = FilterLogs(rate=50, burst=100, notice_interval_s=5, clock=clock, call_later=timers)
    logged = sum(logs.log("chatty", LogLevel.INFO, f"line {i}") for i in range(250))
    assert logged == 100  # the burst
    assert logs.suppressed_total == {"chatty": 150}
    # Another filter has its own bucket.
    assert logs.log("other", LogLevel.INFO, "hello")
    msgs = capture.messages("sluice.filter.chatty")
    assert msgs[0] == "[chatty] line 0" and msgs[-1] == "[chatty] line 99" and len(msgs) == 100
    record = capture.records[0]
    assert record.filter == "chatty"  # type: ignore[attr-defined]
    # One timer is armed for the notice; it fires once the interval has passed.
    assert len(timers.pending) == 1 and timers.pending[0][0] == pytest.approx(5.0)
    clock.now += 5
    timers.fire_all()
    notice = capture.messages("sluice.filter.chatty")[-1]
    assert notice.startswith("[chatty] suppressed 150 lines")
    assert [r.levelno for r in capture.records][-1] == logging.WARNING
    # Refill: 1 s at 50 lines/s.
    clock.now += 1
    capture.records.clear()
    logged = sum(logs.log("chatty", LogLevel.INFO, "x") for _ in range(150))
    assert logged == 100  # 5 s + 1 s of refill, capped at the burst
    clock.now += 1
    assert sum(logs.log("chatty", LogLevel.INFO, "y") for _ in range(80)) == 50


def test_notice_on_the_next_line_after_the_interval(capture: Capture) -> None:
    clock = FakeClock()
    logs = FilterLogs(rate=1, burst=2, notice_interval_s=5, clock=clock)  # no timers
    assert [logs.log("chatty", LogLevel.INFO, str(i)) for i in range(4)] == [True, True, False, False]
    clock.now += 10
    assert logs.log("chatty", LogLevel.INFO, "back")
    msgs = capture.messages("sluice.filter.chatty")
    assert msgs[-2].startswith("[chatty] suppressed 2 lines") and msgs[-1] == "[chatty] back"


def test_lines_below_the_logger_level_cost_no_tokens(capture: Capture) -> None:
    logging.getLogger("sluice.filter.chatty").setLevel(logging.INFO)
    logs = FilterLogs(rate=1, burst=1, clock=FakeClock())
    assert not logs.log("chatty", LogLevel.DEBUG, "hidden")
    assert logs.log("chatty", LogLevel.INFO, "shown")
    assert logs.suppressed_total == {}


# -- filter logs through the proxy ---------------------------------------------------------------------


def chatty_config(tmp_path: Path, up: str) -> str:
    filters = tmp_path / "filters"
    filters.mkdir(exist_ok=True)
    (filters / "chatty.wasm").write_bytes(wasmtime.wat2wasm(CHATTY_WAT))
    return f"""
    listen: 127.0.0.1:0
    admin: {{listen: "127.0.0.1:0"}}
    access_log: null
    filters_dir: {filters}
    clusters:
      web: {{endpoints: ["{up}"]}}
    chain:
      - {{name: chatty, module: chatty.wasm}}
    routes:
      - {{match: {{prefix: /}}, cluster: web}}
    """


def test_filter_log_level_changes_take_effect_and_flood_is_limited(tmp_path: Path, capture: Capture) -> None:
    async def main() -> None:
        async with upstream() as up, admin_proxy(chatty_config(tmp_path, up)) as (gw, admin):
            filter_logs = gw.services.filter_logs
            clock = FakeClock()
            filter_logs._clock = clock  # frozen time: the bucket does not refill during the test
            filter_logs._call_later = FakeTimers()  # and no notice timer fires on a slow machine
            async with aiohttp.ClientSession() as s:
                for _ in range(3):
                    async with s.get(proxy_url(gw, "/")) as r:
                        assert r.status == 200
                msgs = capture.messages("sluice.filter.chatty")
                assert msgs == ["[chatty] chatty info line"] * 3  # level info: no debug lines
                async with s.post(admin_url(admin, "/logging?level=debug&filter=chatty")) as r:
                    assert r.status == 200
                async with s.get(proxy_url(gw, "/")) as r:
                    assert r.status == 200
                msgs = capture.messages("sluice.filter.chatty")
                assert msgs[-2:] == ["[chatty] chatty debug line", "[chatty] chatty info line"]
                # Flood: 3 + 2 lines so far; 100 requests x 2 lines exceed the burst of 100.
                for _ in range(100):
                    async with s.get(proxy_url(gw, "/")) as r:
                        assert r.status == 200
                chatty = capture.messages("sluice.filter.chatty")
                assert len(chatty) == 100
                assert filter_logs.suppressed_total["chatty"] == 105
                async with s.get(admin_url(admin, "/filters")) as r:
                    body = await r.json()
                assert body["chatty"]["counters"]["log_lines_suppressed"] == 105
                assert body["chatty"]["log_level"] == "debug"
            clock.now += 60
            filter_logs.flush()
            assert capture.messages("sluice.filter.chatty")[-1].startswith("[chatty] suppressed 105 lines")

    run(main())


# -- access log ------------------------------------------------------------------------------------------


def test_access_log_json_lines(tmp_path: Path) -> None:
    need_filters()
    path = tmp_path / "access.log"

    async def main() -> None:
        async with upstream() as up:
            cfg = builtin_config(up).replace("access_log: null", f"access_log: {path}")
            async with admin_proxy(cfg) as (gw, _admin), aiohttp.ClientSession() as s:
                assert gw.server.access_log
                headers = {"x-api-key": API_KEY, "x-variant": "canary"}
                async with s.get(proxy_url(gw, "/anything?x=1"), headers=headers) as r:
                    assert r.status == 200
                    size = len(await r.read())
                async with s.get(proxy_url(gw, "/plain"), headers={"x-api-key": API_KEY}) as r:
                    assert r.status == 200
                async with s.post(proxy_url(gw, "/denied"), data=b"12345") as r:
                    assert r.status == 401
                    denied_size = len(await r.read())
        # The proxy has stopped: its buffered writer flushed everything on the way out.
        lines = path.read_text().splitlines()
        assert len(lines) == 3
        ok, plain, denied = (json.loads(line) for line in lines)
        assert set(ok) >= {"time", "method", "path", "status", "bytes", "duration_ms", "upstream", "variant", "filters"}
        assert ok["method"] == "GET" and ok["path"] == "/anything?x=1" and ok["status"] == 200
        assert ok["bytes"] == size and ok["duration_ms"] > 0
        assert ok["upstream"] == up and ok["cluster"] == "web" and ok["route"] == "canary"
        assert ok["variant"] == "canary"
        assert "auth" in ok["filters"]  # it set x-auth-subject
        assert ok["time"].endswith("Z") and ok["local_reply"] is None
        assert plain["variant"] == "stable" and plain["route"] == "default"
        assert "ab" in plain["filters"]  # it wrote x-variant
        assert denied["method"] == "POST" and denied["status"] == 401 and denied["bytes"] == denied_size
        assert denied["upstream"] is None and denied["filters"] == ["auth"]
        assert isinstance(denied["bytes_received"], int) and denied["variant"] is None
        assert denied["local_reply"] is not None

    run(main())


def test_format_time_reuses_nothing_stale() -> None:
    """The texts it keeps (the last millisecond, the last second) never leak into another instant:
    every instant below, in any order, reads as strftime and the milliseconds say."""
    second = 1_700_000_000
    instants = [second * 10**9 + 123_456_789, second * 10**9 + 123_999_999, second * 10**9 + 124_000_000,
                second * 10**9 + 999_000_000, (second + 1) * 10**9, (second + 1) * 10**9 + 7_000_000,
                second * 10**9 + 123_456_789, (second - 86_400) * 10**9 + 1_000_000, 0]
    for ns in instants + instants[::-1]:
        ms = ns // 1_000_000
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
        assert format_time(ns) == expected, ns
    assert format_time(second * 10**9 + 124_000_000) == "2023-11-14T22:13:20.124Z"
    assert format_time(0) == "1970-01-01T00:00:00.000Z"


def test_access_record_helpers() -> None:
    assert format_time(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123Z"
    rec: dict[str, Any] = access_record(
        start_ns=0, method="GET", path="/", status=204, bytes_sent=0, bytes_received=0, duration_ns=1_500_000,
        upstream="", cluster="", route="", variant=None, filters=[], source="127.0.0.1:1", local_reply=None,
    )
    assert rec["duration_ms"] == 1.5 and rec["upstream"] is None

    class Entry:
        def __init__(self, module: str, config: object) -> None:
            self.module, self.config = module, config

    assert variant_header([Entry("auth.wasm", {}), Entry("ab.wasm", {"header": "X-Arm"})]) == "x-arm"
    assert variant_header([Entry("ab.wasm", {"variants": {"a": 1}})]) == "x-variant"
    assert variant_header([]) == "x-variant"


def test_access_log_buffers_and_flushes_by_size_time_and_close(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    record = {"path": "/x" * 100, "status": 200, "note": "caf\u00e9"}
    line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    async def main() -> None:
        log = AccessLog.open(str(path))
        log.write(record)
        assert path.read_bytes() == b""  # buffered
        await asyncio.sleep(AccessLog.FLUSH_INTERVAL_S * 2)
        assert path.read_bytes() == line  # flushed by time
        per_flush = AccessLog.FLUSH_BYTES // len(line) + 1
        for _ in range(per_flush):
            log.write(record)
        assert path.read_bytes() == line * (per_flush + 1)  # flushed by size, at once
        log.write(record)
        log.close()
        assert path.read_bytes() == line * (per_flush + 2)  # and on close
        assert log.lines_written == per_flush + 2

    run(main())


def test_access_log_that_cannot_be_opened_says_so(tmp_path: Path) -> None:
    with pytest.raises(AccessLogError, match=r"cannot open access log .*missing/a.log: No such file"):
        AccessLog.open(str(tmp_path / "missing" / "a.log"))


def test_access_log_to_stdout(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    async def main() -> None:
        log = AccessLog.open("stdout")
        log.write({"status": 204})
        log.close()

    run(main())
    assert capfdbinary.readouterr().out.endswith(b'{"status":204}\n')


def test_sigterm_flushes_the_access_log(tmp_path: Path) -> None:
    """`sluice run` with the access log in a file: every request's line is there after SIGTERM."""
    from test_proxy_lifecycle import free_port, wait_serving

    path = tmp_path / "access.log"

    async def main() -> None:
        async with upstream() as up:
            port, admin = free_port(), free_port()
            cfg = tmp_path / "sluice.yaml"
            cfg.write_text(
                f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin}"}}
access_log: {path}
clusters:
  web: {{endpoints: ["{up}"]}}
routes:
  - match: {{prefix: /}}
    cluster: web
"""
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sluice.proxy", "run", "-c", str(cfg), cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            try:
                async with aiohttp.ClientSession() as s:
                    await wait_serving(s, f"http://127.0.0.1:{port}/hello?n=0")
                    for i in range(1, 50):
                        async with s.get(f"http://127.0.0.1:{port}/hello?n={i}") as r:
                            assert r.status == 200
                # Right away: the last lines are still in the writer's buffer (100 ms).
                os.kill(proc.pid, signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 30) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        records = [json.loads(line) for line in path.read_text().splitlines()]
        paths = [r["path"] for r in records]
        assert paths[-49:] == [f"/hello?n={i}" for i in range(1, 50)]

    run(main(), timeout=60)
