"""Test support for `workers: N`: a real `sluice run` (supervisor + worker processes) in a subprocess.

`Fleet` writes the config into a directory, starts `python -m sluice.proxy run -c ...`, waits for
the supervisor's `/ready`, and stops it by PID (SIGTERM, then SIGKILL if it does not drain).
`owner_pid` finds which process accepted a client connection (from /proc), so tests can tell the
workers' connections apart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
FILTERS = ROOT / "sluice" / "filters"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fleet:
    def __init__(self, directory: Path, config: str) -> None:
        self.directory = directory
        self.config_path = directory / "sluice.yaml"
        self.admin_port = free_port()
        self.config_path.write_text(textwrap.dedent(config).replace("@ADMIN@", f"127.0.0.1:{self.admin_port}"))
        self.log_path = directory / "fleet.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self, timeout: float = 60.0) -> None:
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sluice.proxy", "run", "-c", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.directory,
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(f"sluice exited with {self.process.returncode}:\n{self.log()}")
                try:
                    async with session.get(f"{self.admin}/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"fleet not ready in {timeout}s:\n{self.log()}")
                await asyncio.sleep(0.05)
        self.port = int((await self.get_json("/workers"))["listen"].rsplit(":", 1)[1])

    async def get_json(self, path: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(f"{self.admin}{path}") as r:
            return await r.json()

    async def post(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.post(f"{self.admin}{path}") as r:
            return r.status, await r.json()

    async def worker_pids(self) -> list[int]:
        return [w["pid"] for w in (await self.get_json("/workers"))["workers"]]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the supervisor (it drains the workers); its exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process is not None else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"fleet did not stop in {timeout}s:\n{self.log()}") from None

    def kill_all(self) -> None:
        """Last resort after a failed test: SIGKILL the supervisor and the workers it listed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _socket_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the server-side socket of a loopback connection (server on `local_port`)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == local_port and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                return int(fields[9])
    return None


def owner_pid(server_port: int, client_port: int, pids: list[int], wait_s: float = 5.0) -> int | None:
    """Which of `pids` holds the accepted socket of the connection from `client_port`.

    A connection the kernel completed may still wait in the listen backlog (a busy machine): the
    lookup is repeated for up to `wait_s` until a worker has accepted it.
    """
    deadline = time.monotonic() + wait_s
    while True:
        owner = _owner_now(server_port, client_port, pids)
        if owner is not None or time.monotonic() >= deadline:
            return owner
        time.sleep(0.02)  # the workers are other processes: blocking here stalls none of them


def _owner_now(server_port: int, client_port: int, pids: list[int]) -> int | None:
    inode = _socket_inode(server_port, client_port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


class Client:
    """One keep-alive HTTP/1.1 connection, one request at a time (tests want to know its port)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.local_port = int(writer.get_extra_info("sockname")[1])

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
        lines = [f"GET {path} HTTP/1.1", "Host: test"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("connection closed")
        status = int(status_line.split()[1])
        got: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            got[name.strip().lower()] = value.strip()
        await self.reader.readexactly(int(got.get("content-length", "0")))
        return status, got

    def close(self) -> None:
        self.writer.close()
