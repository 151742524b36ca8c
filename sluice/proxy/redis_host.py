"""The proxy's side of the Redis host calls (`abi.RedisHost`, docs/abi.md): `RedisClients`.

A filter's command arrives as RESP bytes for a `type: redis` cluster. It is sent with redis-py's
asyncio connections (hiredis parses the replies) from a small pool per cluster, and the reply is
encoded back into RESP for the filter. No redis-py response callbacks run: the filter sees what
Redis answered (errors as `-ERR ...` replies, which are answers, not failures).

Endpoints are tried in order: a connection failure moves to the next one (a standalone Redis
with a replica promoted by hand, or Valkey/Redis behind a failover address; Redis Cluster's
slot routing is not done here, see docs/scaling.md). A call that times out drops its connection
(a late reply would otherwise be read as the answer to the next command).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import exceptions as rexc
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from sluice.abi import REDIS_CALL_FAILED, REDIS_CALL_TIMEOUT

from .config import ClusterConfig

__all__ = ["RedisClients", "RedisCollector", "decode_command", "encode_reply"]

log = logging.getLogger("sluice.redis")

MAX_COMMAND = 1 << 20
POOL_SIZE = 32
"""Connections per endpoint and process: one command in flight each (loopback RTT ~50 µs)."""


def decode_command(query: bytes) -> list[bytes] | None:
    """The arguments of one RESP array of bulk strings (what a client sends), or None if malformed."""
    if len(query) > MAX_COMMAND or not query.startswith(b"*"):
        return None
    try:
        end = query.index(b"\r\n")
        count = int(query[1:end])
        pos = end + 2
        args: list[bytes] = []
        for _ in range(count):
            if query[pos : pos + 1] != b"$":
                return None
            end = query.index(b"\r\n", pos)
            size = int(query[pos + 1 : end])
            start = end + 2
            if size < 0 or query[start + size : start + size + 2] != b"\r\n":
                return None
            args.append(query[start : start + size])
            pos = start + size + 2
    except ValueError:
        return None
    return args if args and pos == len(query) else None


_ERROR_CODES: tuple[tuple[type[ResponseError], str], ...] = (
    (rexc.NoScriptError, "NOSCRIPT"),
    (rexc.OutOfMemoryError, "OOM"),
    (rexc.ExecAbortError, "EXECABORT"),
    (rexc.ReadOnlyError, "READONLY"),
    (rexc.NoPermissionError, "NOPERM"),
    (rexc.AskError, "ASK"),
    (rexc.MovedError, "MOVED"),
    (rexc.TryAgainError, "TRYAGAIN"),
    (rexc.ClusterDownError, "CLUSTERDOWN"),
    (rexc.ClusterCrossSlotError, "CROSSSLOT"),
    (rexc.MasterDownError, "MASTERDOWN"),
)
"""redis-py strips the error code of the replies it knows; the filter must see it (NOSCRIPT...)."""
_CODE_RE = re.compile(r"[A-Z][A-Z_]+ ")


def _error_line(exc: ResponseError) -> str:
    message = str(exc).replace("\r\n", " ")
    for cls, code in _ERROR_CODES:
        if isinstance(exc, cls):
            return f"{code} {message}"
    # An unknown code stays in the message ("WRONGTYPE ..."); the rest were "ERR ...".
    return message if _CODE_RE.match(message) else f"ERR {message}"


def encode_reply(value: Any) -> bytes:
    """RESP2 bytes for a reply as redis-py's parser returned it."""
    if isinstance(value, ResponseError):
        return b"-" + _error_line(value).encode() + b"\r\n"
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bool):
        return b":1\r\n" if value else b":0\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes | bytearray):
        return b"$%d\r\n%s\r\n" % (len(value), bytes(value))
    if isinstance(value, list | tuple):
        return b"*%d\r\n" % len(value) + b"".join(encode_reply(v) for v in value)
    if isinstance(value, float):
        text = repr(value).encode()
        return b"$%d\r\n%s\r\n" % (len(text), text)
    raise TypeError(f"cannot encode a {type(value).__name__} reply")


class _Failure(enum.Enum):
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    STALE = "stale"
    """The connection broke: Redis restarted or the path failed (worth one fresh try)."""


@dataclasses.dataclass
class _Cluster:
    config: ClusterConfig
    pools: list[aioredis.BlockingConnectionPool]
    timeout_s: float
    calls: int = 0
    failures: int = 0
    timeouts: int = 0


class RedisClients:
    """Pools for `type: redis` clusters, created on `redis_init`.

    The clusters are learnt from each config before its filters load (`learn`), so a filter's
    `proxy_on_configure` can initialise a cluster its own, not yet current, config defines.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._known: dict[str, ClusterConfig] = {}
        self._loop = loop
        self._by_name: dict[str, _Cluster] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def learn(self, clusters: Mapping[str, ClusterConfig]) -> None:
        """Make the `type: redis` clusters of a config known (a changed one gets new pools on its next init)."""
        self._known.update((name, c) for name, c in clusters.items() if c.type == "redis")

    def init(self, name: str, username: str, password: str, timeout_s: float | None) -> bool:
        config = self._known.get(name)
        if config is None or config.type != "redis":
            return False
        current = self._by_name.get(name)
        if current is not None and current.config == config and (timeout_s is None or current.timeout_s == timeout_s):
            return True
        auth_user = username or config.username
        auth_password = password or config.password
        # A blocking pool: a burst waits for a free connection instead of opening hundreds at once
        # (each costs a connect and a handshake).
        pools = [
            aioredis.BlockingConnectionPool(
                host=hp.host, port=hp.port, username=auth_user, password=auth_password, db=config.database,
                socket_connect_timeout=config.connect_timeout, max_connections=min(config.max_connections, POOL_SIZE),
                timeout=config.connect_timeout,
                connection_class=aioredis.SSLConnection if config.tls is not None else aioredis.Connection,
            )
            for hp in config.endpoints
        ]
        old = self._by_name.get(name)
        self._by_name[name] = _Cluster(config, pools, timeout_s or config.timeout)
        if old is not None:
            self._spawn(self._close_pools(old.pools))
        return True

    def call(self, name: str, query: bytes, on_response: Callable[[bytes | None, int], None]) -> bool:
        cluster = self._by_name.get(name)
        args = decode_command(query)
        if cluster is None or args is None:
            return False
        cluster.calls += 1
        self._spawn(self._call(cluster, name, args, on_response))
        return True

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(
        self, cluster: _Cluster, name: str, args: list[bytes], on_response: Callable[[bytes | None, int], None]
    ) -> None:
        reply: bytes | None = None
        status = REDIS_CALL_FAILED
        for pool in cluster.pools:
            # A second try on the same endpoint only after a pooled connection turned out dead
            # (Redis restarted): the stale ones are dropped first, so the retry connects afresh.
            for _attempt in range(2):
                outcome = await self._send(pool, args, cluster.timeout_s, name)
                if isinstance(outcome, bytes):
                    reply = outcome
                elif outcome is _Failure.TIMEOUT:
                    status = REDIS_CALL_TIMEOUT
                if outcome is not _Failure.STALE:
                    break
            if reply is not None or status == REDIS_CALL_TIMEOUT:
                break  # a timed-out command may have run: never send it to another endpoint
        if reply is None:
            cluster.failures += 1
            if status == REDIS_CALL_TIMEOUT:
                cluster.timeouts += 1
        try:
            on_response(reply, 0 if reply is not None else status)
        except Exception:
            log.exception("redis response handler failed")

    @staticmethod
    async def _send(pool: aioredis.BlockingConnectionPool, args: list[bytes], timeout_s: float, name: str
                    ) -> bytes | _Failure:
        conn: Any = None
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]  # waits up to connect_timeout
        except (RedisError, OSError) as exc:
            log.debug("redis %s: cannot connect: %s", name, exc)
            return _Failure.UNREACHABLE
        try:
            await conn.send_command(*args)
            return encode_reply(await conn.read_response(timeout=timeout_s))
        except ResponseError as exc:  # an error reply is an answer
            return encode_reply(exc)
        except (TimeoutError, RedisTimeout):
            await conn.disconnect()  # a late reply must not be read as the next command's
            return _Failure.TIMEOUT
        except (RedisError, OSError) as exc:
            log.debug("redis %s: %s", name, exc)
            await conn.disconnect()
            await pool.disconnect(inuse_connections=False)
            return _Failure.STALE
        finally:
            await pool.release(conn)

    @staticmethod
    async def _close_pools(pools: list[aioredis.BlockingConnectionPool]) -> None:
        for pool in pools:
            await pool.disconnect()

    def stats(self) -> dict[str, tuple[int, int, int]]:
        """cluster -> (calls, failures, timeouts)."""
        return {name: (c.calls, c.failures, c.timeouts) for name, c in self._by_name.items()}

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for cluster in self._by_name.values():
            await self._close_pools(cluster.pools)
        self._by_name.clear()

    def close(self) -> None:
        """Stop everything (from synchronous shutdown code: the pools close in a task)."""
        for task in list(self._tasks):
            task.cancel()
        pools = [p for c in self._by_name.values() for p in c.pools]
        self._by_name.clear()
        if pools and not self._loop.is_closed():
            self._loop.create_task(self._close_pools(pools))


class RedisCollector(Collector):
    """`sluice_redis_calls_total{cluster}` and `sluice_redis_call_failures_total{cluster,reason}`."""

    def __init__(self, clients: Callable[[], RedisClients | None]) -> None:
        self.clients = clients

    def collect(self) -> Iterator[Metric]:
        clients = self.clients()
        if clients is None:
            return
        calls = CounterMetricFamily("sluice_redis_calls", "Commands filters sent to Redis", labels=["cluster"])
        failures = CounterMetricFamily(
            "sluice_redis_call_failures", "Redis commands that got no answer", labels=["cluster", "reason"]
        )
        for name, (count, failed, timeouts) in clients.stats().items():
            calls.add_metric([name], count)
            failures.add_metric([name, "timeout"], timeouts)
            failures.add_metric([name, "unreachable"], failed - timeouts)
        yield calls
        yield failures
