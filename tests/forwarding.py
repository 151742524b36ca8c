"""Calling one host function with chosen arguments through fixtures/wat/hostcall_forward.wat.

The fixture forwards the raw u32s of request header `x-args` (function number, then 12
arguments) to the host function and logs its status as "R" + 4 bytes; header `x-data` is copied
to `DATA` first. Header values carry raw bytes as surrogate-escaped text, which the host hands
back to the module byte for byte.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import wasmtime
from hosting import FilterRig

from sluice import abi

WAT = Path(__file__).resolve().parent / "fixtures" / "wat" / "hostcall_forward.wat"
DATA = 0x1000
"""Where `x-data` lands in the module's memory."""
MEMORY = 8 * 65536
ARGS = 12


def _numbering() -> dict[str, int]:
    # The fixture's header comment lists "<number>=<function>" for each one it forwards.
    header = WAT.read_text().split("(module", 1)[0]
    return {name: int(num) for num, name in re.findall(r"(\d+)=(\w+)", header)}


FUNCTIONS: dict[str, int] = _numbering()


def compile_forwarder(directory: Path) -> Path:
    out = directory / "hostcall_forward.wasm"
    if not out.exists():
        out.write_bytes(wasmtime.wat2wasm(WAT.read_text()))
    return out


def as_header(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def forward_headers(function: str | int, args: tuple[int, ...], data: bytes | None = None) -> list[tuple[str, str]]:
    number = FUNCTIONS[function] if isinstance(function, str) else function
    padded = (*args, *([0] * (ARGS - len(args))))
    headers = [("x-args", as_header(struct.pack(f"<{1 + ARGS}I", number, *padded)))]
    if data is not None:
        headers.append(("x-data", as_header(data)))
    return headers


def statuses(rig: FilterRig, plugin: str = "filter") -> list[int]:
    """Every status the forwarder logged, in order."""
    out = []
    for who, level, message in rig.logs:
        raw = message.encode("utf-8", "surrogateescape")
        if who == plugin and level is abi.LogLevel.INFO and len(raw) == 5 and raw[:1] == b"R":
            out.append(struct.unpack("<i", raw[1:])[0])
    return out


def call(
    rig: FilterRig, plugin: abi.Plugin, function: str | int, *args: int, data: bytes | None = None,
    name: str = "filter",
) -> int:
    """One forwarded call in its own request; its status."""
    before = len(statuses(rig, name))
    rig.request(plugin, headers=forward_headers(function, args, data))
    after = statuses(rig, name)
    # The forwarder logs last; a forwarded proxy_log may have logged a look-alike before it.
    assert len(after) > before, "the forwarder did not report a status"
    return after[-1]
