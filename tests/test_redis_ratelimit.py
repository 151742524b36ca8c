"""Redis through Higress's host calls, and the ratelimit filter's `backend: redis`, against a real
redis-server on loopback (tests/redis_server.py).

Two in-process gateways stand for two sluice instances: the limit holds across both because the
buckets live in Redis. Stopping Redis mid-run must cost no 5xx: the configured fallback decides,
with one WARN line and counters, and the first answer after Redis returns restores the fleet-wide
limit.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, proxy, run, upstream
from redis_server import RedisServer, needs_redis

from sluice.proxy.redis_host import RedisClients, decode_command, encode_reply

pytestmark = needs_redis


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def config(up: str, redis_address: str, *, burst: int = 20, rate: float = 0.001, failure: str = "local") -> str:
    return f"""
        listen: 127.0.0.1:0
        filters_dir: {ROOT / "sluice" / "filters"}
        access_log: null
        clusters:
          up: {{endpoints: ["{up}"]}}
          limits: {{type: redis, endpoints: ["{redis_address}"], timeout: 1, connect_timeout: 1}}
        chain:
          - name: ratelimit
            module: ratelimit.wasm
            cpu_deadline_ms: 1000  # wall clock: a busy 2-core machine can deschedule us mid-callback
            config:
              requests_per_second: {rate}
              burst: {burst}
              key: "header:x-key"
              backend: redis
              redis: {{cluster: limits, timeout_ms: 1000, retry_interval_ms: 200}}
              on_backend_failure: {failure}
        routes:
          - match: {{prefix: /}}
            cluster: up
        """


async def statuses(session: aiohttp.ClientSession, urls: list[str], key: str, n: int) -> collections.Counter[int]:
    async def one(i: int) -> int:
        async with session.get(urls[i % len(urls)], headers={"x-key": key}) as r:
            await r.read()
            return r.status

    return collections.Counter(await asyncio.gather(*(one(i) for i in range(n))))


def metric(gateway: Any, name: str) -> int:
    f = gateway.generation.filters[0]
    return next((m.value for m in f.report().metrics if m.name == name), 0)


# -- the host side ---------------------------------------------------------------------------------


def test_resp_commands_and_replies() -> None:
    assert decode_command(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n") == [b"GET", b"k"]
    assert decode_command(b"*1\r\n$4\r\nPING\r\n") == [b"PING"]
    for bad in (b"PING\r\n", b"*2\r\n$3\r\nGET\r\n", b"*1\r\n$9\r\nPING\r\n", b"*1\r\n$4\r\nPING\r\nextra", b"*0\r\n"):
        assert decode_command(bad) is None, bad
    assert encode_reply(7) == b":7\r\n"
    assert encode_reply(None) == b"$-1\r\n"
    assert encode_reply([1, b"ab", None]) == b"*3\r\n:1\r\n$2\r\nab\r\n$-1\r\n"


def test_redis_clients_against_a_real_server(redis: RedisServer) -> None:
    from sluice.proxy.config import ClusterConfig, HostPort

    async def body() -> None:
        loop = asyncio.get_running_loop()
        cluster = ClusterConfig(type="redis", endpoints=[HostPort.parse(redis.address)], timeout=1.0)
        clients = RedisClients(loop)
        clients.learn({"r": cluster, "web": ClusterConfig(endpoints=[HostPort.parse("127.0.0.1:1")])})
        assert not clients.init("web", "", "", None)  # not a redis cluster
        assert not clients.init("nope", "", "", None)
        assert clients.init("r", "", "", None)

        async def ask(query: bytes) -> tuple[bytes | None, int]:
            answer: asyncio.Future[tuple[bytes | None, int]] = loop.create_future()
            assert clients.call("r", query, lambda reply, status: answer.set_result((reply, status)))
            return await asyncio.wait_for(answer, 5)

        assert await ask(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n") == (b"$2\r\nOK\r\n", 0)
        assert await ask(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n") == (b"$2\r\nv1\r\n", 0)
        reply, status = await ask(b"*1\r\n$7\r\nNOTACMD\r\n")
        assert status == 0 and reply is not None and reply.startswith(b"-ERR unknown command")
        reply, _ = await ask(b"*3\r\n$7\r\nEVALSHA\r\n$40\r\n" + b"0" * 40 + b"\r\n$1\r\n0\r\n")
        assert reply is not None and reply.startswith(b"-NOSCRIPT ")  # the code the filter looks for
        assert not clients.call("r", b"garbage", lambda reply, status: None)
        assert clients.stats()["r"] == (4, 0, 0)
        await clients.aclose()

    run(body())


# -- the ratelimit filter ----------------------------------------------------------------------------


def test_fleet_wide_burst_is_exact_across_two_instances(redis: RedisServer) -> None:
    async def body() -> None:
        async with upstream() as up, proxy(config(up, redis.address, burst=30)) as a, \
                proxy(config(up, redis.address, burst=30)) as b:
            urls = [f"http://127.0.0.1:{a.port}/", f"http://127.0.0.1:{b.port}/"]
            async with aiohttp.ClientSession() as session:
                counts = await statuses(session, urls, "shared", 120)
                assert counts == {200: 30, 429: 90}, counts
                other = await statuses(session, urls, "other-key", 4)
                assert other == {200: 4}
            assert metric(a, "ratelimit_allowed") + metric(b, "ratelimit_allowed") == 34
            assert metric(a, "ratelimit_fallback_decisions") == 0
            assert a.services is not None and a.services.redis.stats()["limits"][1] == 0

    run(body())


def test_redis_down_falls_back_then_recovers(redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def body() -> None:
        async with upstream() as up, proxy(config(up, redis.address, burst=5)) as gw:
            url = [f"http://127.0.0.1:{gw.port}/"]
            async with aiohttp.ClientSession() as session:
                assert await statuses(session, url, "k", 8) == {200: 5, 429: 3}  # Redis decides
                redis.stop()
                during = await statuses(session, url, "k", 8)
                # The local (host-wide) bucket of this key is fresh: 5 more, no 5xx.
                assert during == {200: 5, 429: 3}, during
                assert metric(gw, "ratelimit_backend_failures") >= 1
                assert metric(gw, "ratelimit_fallback_decisions") == 8
                warns = [r for r in caplog.records if r.levelno == logging.WARNING and "falling back" in r.getMessage()]
                assert len(warns) == 1, [r.getMessage() for r in caplog.records]
                redis.start()  # same port, empty: the script cache is gone too (NOSCRIPT path)
                returned = time.monotonic()
                recovered_at = None
                while time.monotonic() - returned < 5:
                    before = metric(gw, "ratelimit_fallback_decisions")
                    status = (await statuses(session, url, "fresh", 1)).most_common(1)[0][0]
                    assert status in (200, 429)
                    if metric(gw, "ratelimit_fallback_decisions") == before:
                        recovered_at = time.monotonic() - returned
                        break
                    await asyncio.sleep(0.05)
                assert recovered_at is not None and recovered_at < 2.0, recovered_at
                assert any("answers again" in r.getMessage() for r in caplog.records)
                after = await statuses(session, url, "again", 8)
                assert after == {200: 5, 429: 3}

    run(body())


@pytest.mark.parametrize(("failure", "expected"), [("allow", {200: 6}), ("deny", {429: 6})])
def test_on_backend_failure_allow_and_deny(tmp_path: Path, failure: str, expected: dict[int, int]) -> None:
    dead = RedisServer(tmp_path / "never")  # a free port nobody listens on

    async def body() -> None:
        async with upstream() as up, proxy(config(up, dead.address, burst=2, failure=failure)) as gw:
            async with aiohttp.ClientSession() as session:
                got = await statuses(session, [f"http://127.0.0.1:{gw.port}/"], "k", 6)
                assert got == expected, got
            assert metric(gw, "ratelimit_fallback_decisions") == 6

    run(body())


def test_sluice_check_readies_the_configs_redis_clusters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sluice.proxy.cli import main

    path = tmp_path / "sluice.yaml"
    path.write_text(config("127.0.0.1:9", "127.0.0.1:9"))
    assert main(["check", "-c", str(path)]) == 0
    assert "falling back" not in capsys.readouterr().err  # nothing is contacted, nothing degrades
    path.write_text(config("127.0.0.1:9", "127.0.0.1:9").replace("cluster: limits,", "cluster: nosuch,"))
    assert main(["check", "-c", str(path)]) == 0  # the filter loads, degraded, and says so
    assert "redis cluster nosuch failed (the cluster cannot be initialised)" in capsys.readouterr().err
