"""The main job: sluice with its built-in filters (auth, ratelimit, ab) in front of a demo upstream.

    make demo        (or: python examples/demo.py [-c sluice/config/sluice.yaml])

Starts the demo upstream twice (`stable` on 127.0.0.1:9001, `canary` on 127.0.0.1:9002), then
sluice with `sluice/config/sluice.yaml`, prints lines to try, and runs until Ctrl-C. The upstreams are
child processes and are stopped by their PID on the way out.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPSTREAMS = (("stable", 9001), ("canary", 9002))

TRY = """
sluice is listening on http://127.0.0.1:8080 (admin on http://127.0.0.1:9901). Try:

  curl -i http://127.0.0.1:8080/healthz                              # exempt from auth: 200
  curl -i http://127.0.0.1:8080/anything                             # no API key: 401
  curl -i -H 'x-api-key: demo-key' http://127.0.0.1:8080/anything    # 200, RateLimit-* headers, x-variant
  curl -i -H 'x-api-key: demo-key' -H 'x-variant: canary' http://127.0.0.1:8080/anything
                                                                     # forced to the canary upstream
  for i in $(seq 15); do curl -s -o /dev/null -w '%{http_code} ' \\
      -H 'x-api-key: demo-key' http://127.0.0.1:8080/anything; done; echo   # 200s, then 429s
  curl -s http://127.0.0.1:9901/stats | grep sluice_                 # metrics
  .venv/bin/sluice filter test sluice/filters/auth.wasm --config '{"api_keys":["k1"]}' -H 'x-api-key: k1'

Edit sluice/config/sluice.yaml or drop a new .wasm into sluice/filters/ while it runs: sluice reloads it.
Ctrl-C stops everything.
"""


def _wait_port(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "sluice" / "config" / "sluice.yaml"))
    args = parser.parse_args()

    # Ctrl-C, or SIGTERM from a supervisor, stops the children too (even if SIGINT came ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    children: list[subprocess.Popen[bytes]] = []
    try:
        for name, port in UPSTREAMS:
            children.append(subprocess.Popen(
                [sys.executable, str(ROOT / "examples" / "demo_upstream.py"), "--port", str(port), "--name", name]
            ))
        for name, port in UPSTREAMS:
            if not _wait_port(port):
                print(f"demo: the {name} upstream did not start on port {port} (is the port taken?)",
                      file=sys.stderr)
                return 1
        proxy = subprocess.Popen([sys.executable, "-m", "sluice.proxy", "run", "-c", args.config], cwd=ROOT)
        children.append(proxy)
        if _wait_port(8080):
            print(TRY, flush=True)
        return proxy.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                os.kill(child.pid, signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=35)
            except subprocess.TimeoutExpired:
                os.kill(child.pid, signal.SIGKILL)


if __name__ == "__main__":
    raise SystemExit(main())
