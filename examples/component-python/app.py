"""A sluice component filter in Python (componentize-py), for the `sluice:filter@0.1.0` world.

Configuration (JSON): {"header": "x-python-count", "key": "requests"}
  on-request   counts requests in shared data under `key` (a CAS loop: the count is shared with
               every filter of the same vm_id, proxy-wasm ones included) and sets `header: N`
  on-response  adds `x-python: <environment variable GREETING, or "hello">`
Also prints one line when configured: stdout goes to the filter's log (restricted WASI). With
"probe": "yes" in the configuration it also prints what the sandbox grants (files, network,
environment, clocks, randomness), which tests/test_component_examples.py checks.
"""

from __future__ import annotations

import json
import os
import random
import time

import wit_world
from componentize_py_types import Err
from wit_world.imports import logging, shared_data, types

_settings = {"header": "x-python-count", "key": "requests"}


def _edits(set_: list[tuple[str, str]] | None = None, add: list[tuple[str, str]] | None = None) -> types.Action:
    return types.Action_Continue(types.HeaderEdits(remove=[], set=set_ or [], add=add or []))


def _bump(key: str) -> int:
    while True:
        entry = shared_data.get(key)
        count = int(entry.value) + 1 if entry is not None else 1
        try:
            shared_data.set(key, str(count), entry.cas if entry is not None else 0)
            return count
        except Err as err:
            if err.value != shared_data.Error.CAS_MISMATCH:
                raise


def _probe() -> None:
    try:
        with open("/etc/passwd", "rb"):
            files = "readable"
    except OSError as exc:
        files = f"denied ({type(exc).__name__})"
    print(f"probe files: {files}")
    try:
        import socket

        with socket.create_connection(("127.0.0.1", 9), timeout=1):
            network = "open"
    except Exception as exc:  # noqa: BLE001 - any failure means no network: that is the point
        network = f"denied ({type(exc).__name__})"
    print(f"probe network: {network}")
    print(f"probe environment: {sorted(os.environ)}")
    print(f"probe clock: {'ok' if time.time() > 1.6e9 else 'wrong'}")
    print(f"probe random: {'ok' if len({random.getrandbits(64) for _ in range(4)}) == 4 else 'constant'}")


class WitWorld(wit_world.WitWorld):
    def configure(self, config: str) -> None:
        try:
            parsed = json.loads(config) if config else {}
        except ValueError as exc:
            raise Err(f"configuration is not JSON: {exc}") from None
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise Err("configuration must be an object of strings")
        _settings.update(parsed)
        print(f"configured: counting in {_settings['key']!r}")
        if _settings.get("probe") == "yes":
            _probe()

    def on_request(self, head: list[tuple[str, str]]) -> types.Action:
        count = _bump(_settings["key"])
        logging.log(logging.Level.DEBUG, "python", f"request {count}")
        return _edits(set_=[(_settings["header"], str(count))])

    def on_callout_response(self, response: types.CalloutResponse | None) -> types.Action:
        return _edits()

    def on_response(self, head: list[tuple[str, str]]) -> types.Action:
        return _edits(add=[("x-python", os.environ.get("GREETING", "hello"))])
