#!/usr/bin/env python3
"""CPU per request of sluice's own request path, without the kernel and without a peer.

    python bench/bench_path.py [--targets sluice-nolog,sluice,sluice+noop,sluice+as,sluice+3]
                               [--requests 20000] [--rounds 5]

bench_proxy.py measures the whole process under load (the kernel's socket work included, and
that grows per request as the proxy slows: fewer requests per wake-up). This one isolates what
the Python code and the wasm filters cost: a real `Gateway` (the config bench_proxy.py writes for
the target, its filter chain with the real .wasm files, router, cluster pool, access log), one
client connection and one upstream connection whose transports are in-memory buffers. Each
request is one `data_received` of a keep-alive GET on the client side (with the API key the
auth filter wants), the upstream's request bytes are checked and dropped, and one
`data_received` of an nginx-like 200 on the upstream side completes it. No event loop turn, no
syscall: process CPU time per request, best of `--rounds`.

It is a measurement aid, not a test: the transports are stand-ins by design. The figures in
bench/README.md say what the path costs; bench_proxy.py says what a client sees.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_proxy import API_KEY, free_port, sluice_config  # noqa: E402

from sluice.proxy.app import Gateway  # noqa: E402
from sluice.proxy.config import parse_config  # noqa: E402
from sluice.proxy.downstream import DownstreamConnection  # noqa: E402
from sluice.proxy.upstream import UpstreamConnection  # noqa: E402

REQUEST = (
    b"GET /bench HTTP/1.1\r\nhost: bench\r\nuser-agent: bench\r\naccept: */*\r\nx-api-key: %s\r\n\r\n"
    % API_KEY.encode()
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 03:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\nhello\n"
)


class MemoryTransport(asyncio.Transport):
    """What a connection writes, kept in a list; always open, always readable."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def measure(target: str, requests: int, rounds: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="sluice-path-"))
    path = sluice_config(tmp, target, free_port(), 9)  # the upstream port is never dialled
    gateway = Gateway(parse_config(path.read_text(), source=str(path), base_dir=path.parent))
    await gateway.start("127.0.0.1", 0)
    try:
        endpoint = gateway.generation.clusters["up"].endpoints[0]
        upstream = UpstreamConnection(endpoint.label)
        upstream_side = MemoryTransport()
        upstream.connection_made(upstream_side)
        endpoint.idle.append(upstream)  # the pool leases it as a kept-alive connection
        client = DownstreamConnection(gateway.server)
        client_side = MemoryTransport()
        client.connection_made(client_side)

        def one() -> None:
            client.data_received(REQUEST)
            if not upstream_side.written:
                raise RuntimeError(f"{target}: the request did not reach the upstream: {client_side.written[-1:]}")
            upstream_side.written.clear()
            upstream.data_received(RESPONSE)
            if not client_side.written or not client_side.written[0].startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{target}: unexpected response: {client_side.written[:1]}")
            client_side.written.clear()

        for _ in range(2000):
            one()
        best = float("inf")
        for _ in range(rounds):
            began = time.process_time()
            for _ in range(requests):
                one()
            best = min(best, (time.process_time() - began) / requests)
        return best * 1e6
    finally:
        await gateway.stop(drain_timeout=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="sluice-nolog,sluice,sluice+noop,sluice+as,sluice+3")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, float] = {}
    for target in args.targets.split(","):
        results[target] = uvloop.run(measure(target, args.requests, args.rounds))
        print(f"{target:14} {results[target]:7.1f} us CPU per request", flush=True)
    base = results.get("sluice")
    if base is not None:
        for target, cost in results.items():
            if target.startswith("sluice+"):
                filters = 3 if target == "sluice+3" else 1
                print(f"{target:14} adds {cost - base:6.1f} us ({(cost - base) / filters:.1f} per filter)")


if __name__ == "__main__":
    main()
