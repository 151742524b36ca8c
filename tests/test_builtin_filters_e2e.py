"""The three built-in filters together, end to end: a real sluice in front of real upstreams, with
the chain the default config uses (auth -> ratelimit keyed on the auth subject -> ab keyed on it).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
from conftest import proxy, run, upstream
from hosting import metric_values

from sluice import BUILTIN_FILTERS_DIR

FILTERS = BUILTIN_FILTERS_DIR


def config(stable: str, canary: str, burst: int = 5) -> str:
    return f"""
    listen: 127.0.0.1:0
    access_log: null
    filters_dir: {FILTERS}
    clusters:
      web: {{endpoints: ["{stable}"]}}
      web-canary: {{endpoints: ["{canary}"]}}
    chain:
      - name: auth
        module: auth.wasm
        config:
          api_keys: [{{key: "alice-key", subject: alice}}, {{key: "bob-key", subject: bob}}]
          exempt_paths: ["/healthz"]
      - name: ratelimit
        module: ratelimit.wasm
        config: {{requests_per_second: 1, burst: {burst}, key: subject}}
      - name: ab
        module: ab.wasm
        config:
          variants: {{stable: 50, canary: 50}}
          header: x-variant
          key: subject
          allow_force: ["canary"]
    routes:
      - name: canary
        match: {{prefix: /, headers: {{x-variant: canary}}}}
        cluster: web-canary
      - name: default
        match: {{prefix: /}}
        cluster: web
    """


def header(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name]


def test_auth_ratelimit_ab_chain_end_to_end() -> None:
    async def main() -> None:
        async with (
            upstream(name="stable") as stable,
            upstream(name="canary") as canary,
            proxy(config(stable, canary)) as gw,
            aiohttp.ClientSession() as s,
        ):
            base = f"http://127.0.0.1:{gw.port}"

            # Exempt path: no credentials needed, and a spoofed subject is removed.
            async with s.get(f"{base}/healthz", headers={"x-auth-subject": "admin"}) as r:
                assert r.status == 200
                assert header(await r.json(), "x-auth-subject") == []

            # No key: 401 from auth, the upstream never sees it.
            async with s.get(f"{base}/anything") as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")

            # A good key: the subject reaches the upstream (the client's own value replaced),
            # with a variant, and the response carries the rate-limit headers.
            async with s.get(f"{base}/anything", headers={"x-api-key": "alice-key", "x-auth-subject": "mallory"}) as r:
                assert r.status == 200
                echo = await r.json()
                assert header(echo, "x-auth-subject") == ["alice"]
                variant = header(echo, "x-variant")
                assert variant in (["stable"], ["canary"])
                assert echo["upstream"] == variant[0]  # routed on the header ab set
                assert r.headers["RateLimit-Limit"] == "5"
                assert int(r.headers["RateLimit-Remaining"]) == 4

            # Sticky: alice always lands on the same variant.
            seen = set()
            for _ in range(3):
                async with s.get(f"{base}/anything", headers={"x-api-key": "alice-key"}) as r:
                    assert r.status == 200
                    seen.add((await r.json())["upstream"])
            assert seen == {variant[0]}

            # alice has used 4 of her 5 tokens; 3 more requests: 1 allowed, 2 limited.
            statuses = []
            for _ in range(3):
                async with s.get(f"{base}/anything", headers={"x-api-key": "alice-key"}) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert int(r.headers["Retry-After"]) >= 1
                        assert r.headers["RateLimit-Remaining"] == "0"
            assert statuses == [200, 429, 429]

            # The limit is per subject: bob still has his whole burst.
            async with s.get(f"{base}/anything", headers={"x-api-key": "bob-key"}) as r:
                assert r.status == 200

            # A client may force an allow-listed variant.
            async with s.get(f"{base}/anything", headers={"x-api-key": "bob-key", "x-variant": "canary"}) as r:
                assert (await r.json())["upstream"] == "canary"

            # The filters' own metrics are there for the admin endpoint.
            plugins = {f.name: f.plugin for f in gw.generation.filters}
            assert metric_values(plugins["auth"])["auth_denied"] == 1
            assert metric_values(plugins["ratelimit"])["ratelimit_denied"] == 2

    run(main())


def test_concurrent_clients_get_exactly_the_burst() -> None:
    """The token bucket holds exactly across concurrent requests through the real proxy."""

    async def main() -> None:
        async with (
            upstream(name="stable") as stable,
            upstream(name="canary") as canary,
            proxy(config(stable, canary, burst=20)) as gw,
            aiohttp.ClientSession() as s,
        ):
            url = f"http://127.0.0.1:{gw.port}/anything"

            async def one() -> int:
                async with s.get(url, headers={"x-api-key": "alice-key"}) as r:
                    await r.read()
                    return r.status

            statuses = Counter(await asyncio.gather(*(one() for _ in range(60))))
            # 20 tokens, refilling at 1/s: 20 allowed, possibly one more if a second passed.
            assert statuses[200] in (20, 21)
            assert statuses[200] + statuses[429] == 60

    run(main())
