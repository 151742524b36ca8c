#!/usr/bin/env python3
"""Instructions per request in the sluice process, counted by valgrind's callgrind.

    python bench/count_instructions.py [--target sluice-nolog] [--requests 2000] [--out DIR]

Wall-clock and CPU-time figures on a shared 2-core machine move by 15 % from run to run;
instruction counts do not (the same binary, inputs and environment give the same total whatever
else the machine does). So this is the figure to compare a change by: sluice (one of
bench_proxy.py's sluice targets) runs under callgrind in front of nginx `return 200`; a client in
another process warms it up, the counters are zeroed (`callgrind_control -z`), `--requests`
keep-alive requests are sent over 4 connections, and the counters are dumped. Instructions per
request = the dump's total / requests. `callgrind_annotate DIR/callgrind.out.*` shows where, in C
terms (CPython's eval loop, uvloop, llhttp, the kernel is not counted). Needs valgrind and nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_proxy import API_KEY, PY, free_port, sluice_config, started, upstream_config, wait_http  # noqa: E402

REQUEST = b"GET /bench HTTP/1.1\r\nhost: bench\r\nuser-agent: count\r\naccept: */*\r\nx-api-key: %s\r\n\r\n"


async def load(port: int, requests: int, key: bytes) -> None:
    async def one(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(n):
            writer.write(REQUEST % key)
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"content-length: *(\d+)", head, re.I)
            assert match is not None, head
            await reader.readexactly(int(match.group(1)))
        writer.close()

    await asyncio.gather(*(one(requests // 4) for _ in range(4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="sluice-nolog")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="keep the callgrind dump here")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool}")
    with tempfile.TemporaryDirectory() as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        up_port, port = free_port(), free_port()
        stack.enter_context(started(["nginx", "-c", str(upstream_config(tmp, up_port))], tmp / "nginx.log"))
        out = args.out or tmp
        out.mkdir(parents=True, exist_ok=True)
        config = sluice_config(tmp, args.target, port, up_port)
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.out.%p",
                   PY, "-m", "sluice.proxy", "run", "-c", str(config)]
        proc = stack.enter_context(started(command, tmp / "sluice.log"))
        wait_http(f"http://127.0.0.1:{port}/", timeout=300, proc=proc)
        asyncio.run(load(port, 400, API_KEY.encode()))
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        began = time.monotonic()
        asyncio.run(load(port, args.requests, API_KEY.encode()))
        took = time.monotonic() - began
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1)
        dumps = sorted(out.glob(f"callgrind.out.{proc.pid}.*"), key=lambda p: p.stat().st_mtime)
        assert dumps, "no dump"
        text = dumps[-1].read_text(errors="replace")
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        assert total is not None
        count = int(total.group(1))
        print(f"{args.target}: {count / args.requests:,.0f} instructions per request "
              f"({args.requests} requests, {took:.1f} s under valgrind)")

if __name__ == "__main__":
    main()
