"""`check_filters`: load every filter of a config once without serving (`sluice check`, and the
fleet supervisor's validation before a start or a reload)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from sluice import abi

from .config import SluiceConfig

__all__ = ["CheckHost", "CheckResult", "check_filters"]


class _NoTimer:
    def cancel(self) -> bool:
        return False


class CheckHost:
    """An `abi.Host` for loading filters without serving: no callouts leave, no timer ever fires.

    `proxy_redis_init` succeeds for the config's `type: redis` clusters (nothing is contacted), so
    a filter that readies its cluster while configuring loads as it will when serving.
    """

    def __init__(self, redis_clusters: frozenset[str] = frozenset()) -> None:
        self.redis_clusters = redis_clusters

    def redis_init(self, cluster: str, username: str, password: str, timeout_s: float | None) -> bool:
        return cluster in self.redis_clusters

    def redis_call(self, cluster: str, query: bytes, on_response: Callable[[bytes | None, int], None]) -> bool:
        return False

    def http_call(
        self,
        upstream: str,
        headers: abi.HeaderMap,
        body: bytes,
        trailers: abi.HeaderMap,
        timeout_s: float | None,
        on_response: Callable[[abi.CallResponse | None], None],
    ) -> bool:
        return False

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> abi.Cancellable:
        return _NoTimer()

    def log(self, plugin: str, level: abi.LogLevel, message: str) -> None:
        # A filter rejecting its config usually says why in a log line; show it next to the error.
        print(f"[{plugin}] {level.name} {message}", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    problems: list[str]
    """One line per filter that failed: ``<file>:<line>: chain[i] (<name>): <file>: <reason>``."""
    hashes: dict[str, str]
    """filter name -> sha256 of its module, for the filters that loaded."""


def check_filters(config: SluiceConfig) -> CheckResult:
    """Compile and load every filter of `config` once (CPU-heavy; compiled code lands in `cache_dir`)."""
    runtime = abi.Runtime(cache_dir=config.cache_dir)
    host = CheckHost(frozenset(name for name, c in config.clusters.items() if c.type == "redis"))
    problems: list[str] = []
    hashes: dict[str, str] = {}
    try:
        for index, entry in enumerate(config.chain):
            try:
                module = runtime.compile(entry.module_path)
                plugin = runtime.load(config.plugin_spec(entry), host, module=module)
            except abi.PluginLoadError as exc:
                problems.append(f"{config.where('chain', index)} ({entry.name}): {exc}")
                continue
            hashes[entry.name] = module.sha256
            plugin.retire()
    finally:
        runtime.close()
    return CheckResult(problems, hashes)
