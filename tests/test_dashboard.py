"""The HTML dashboard: self-contained, and rendering live data in a real (headless) browser."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import struct
import zlib
from pathlib import Path

import aiohttp
import pytest
from conftest import run, upstream
from test_admin import admin_proxy, admin_url, builtin_config, known_traffic, need_filters

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_TIMEOUT_S = 90.0


def test_dashboard_is_self_contained() -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up, admin_proxy(builtin_config(up)) as (_gw, admin), aiohttp.ClientSession() as s:
            async with s.get(admin_url(admin, "/")) as r:
                assert r.status == 200
                assert r.content_type == "text/html"
                csp = r.headers["Content-Security-Policy"]
                html = await r.text()
            async with s.get(admin_url(admin, "/dashboard.json")) as r:
                data = await r.json()
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        # No external assets: no link/src/url() pointing anywhere, everything inline.
        assert "<link" not in html
        assert not re.search(r"""\bsrc\s*=""", html)
        assert "http://" not in html and "https://" not in html and "url(" not in html
        assert "dashboard.json" in html and "setTimeout(refresh" in html
        assert [f["name"] for f in data["filters"]] == ["auth", "ratelimit", "ab"]
        assert data["requests_total"] == 0 and data["ready"] is True

    run(main())


def test_dashboard_json_after_traffic() -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up, admin_proxy(builtin_config(up)) as (gw, admin), aiohttp.ClientSession() as s:
            await known_traffic(s, gw)
            async with s.get(admin_url(admin, "/dashboard.json")) as r:
                data = await r.json()
        assert data["requests_total"] == 5 and data["responses"] == {"2xx": 3, "4xx": 2}
        assert data["request_rate"] > 0
        auth = data["filters"][0]
        assert auth["name"] == "auth" and auth["generation"] == 1 and auth["state"] == "ok"
        assert auth["counters"]["streams"] == 5 and auth["counters"]["traps"] == 0
        assert auth["latency"]["mean_us"] > 0 and auth["latency"]["p99_le_us"] is not None
        assert {"route": "default", "cluster": "web", "status_class": "2xx", "requests": 2} in data["routes"]
        assert data["reloads"] == {"enabled": False, "events": []}

    run(main())


# -- headless Chromium ----------------------------------------------------------------------------------


async def chromium(url: str, tmp_path: Path, *args: str) -> bytes:
    """Run headless Chromium once against `url`; returns its stdout. Killed (by pid) on timeout."""
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
        "--window-size=1200,900", *args, url,
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BROWSER_TIMEOUT_S)
    except BaseException:
        # Its own session: the group id is the pid of the browser we started; helpers go with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stray helper processes of this browser, if any
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of pixels (bytes per pixel 3 or 4) of an 8-bit RGB(A) PNG, stdlib only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = bpp = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r) for r in rows]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (CI installs it: .ci/run)")
def test_dashboard_renders_live_data_in_headless_chromium(tmp_path: Path) -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up, admin_proxy(builtin_config(up)) as (gw, admin):
            async with aiohttp.ClientSession() as s:
                await known_traffic(s, gw)
            url = admin_url(admin, "/")
            dom = (await chromium(url, tmp_path, "--dump-dom")).decode()
            png = tmp_path / "dashboard.png"
            await chromium(url, tmp_path, f"--screenshot={png}")
        # The DOM holds what the script rendered from /dashboard.json, not the empty template.
        rows = re.findall(r"<tr><td>(auth|ratelimit|ab)</td>.*?</tr>", dom)
        assert rows == ["auth", "ratelimit", "ab"], dom[-3000:]
        total = re.search(r'id="requests-total">(\d+)<', dom)
        assert total is not None and int(total.group(1)) == 5
        auth_row = re.search(r"<tr><td>auth</td>(.*?)</tr>", dom)
        assert auth_row is not None
        cells = re.findall(r'<td class="num">([^<]*)</td>', auth_row.group(1))
        assert cells[0] == "1"  # generation
        assert cells[1] == "5"  # streams through auth
        assert ">ok<" in auth_row.group(1)
        assert "2xx: 3" in dom and "4xx: 2" in dom
        assert 'class="pill ok">ready<' in dom
        # The screenshot is a real rendering: the right size and far from uniform.
        width, height, pixels = png_pixels(png.read_bytes())
        assert (width, height) == (1200, 900)
        colours: set[bytes] = set()
        for row in pixels[::7]:
            step = len(row) // width
            colours.update(row[i : i + 3] for i in range(0, len(row), step * 5))
        assert len(colours) > 50, f"only {len(colours)} distinct colours: blank page?"

    run(main(), timeout=240.0)
