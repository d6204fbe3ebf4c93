"""The spool of request bodies on disk, against real processes: bounded by SOBOT_SPOOL_LIMIT,
and a failure to write it answered as the proxy's own (507), logged with its cause."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import resource
import threading
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from tests.processes import command_env, run_command, stack

MIB = 1024 * 1024
UPLOAD = "/api/5/file/upload"


def spooled_bytes(pid: int, directory: Path) -> int:
    """What process `pid` holds on disk in `directory` now: the sizes of its open files there
    (the spools are unlinked at once, so only its descriptors still see them)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(directory)):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue  # closed meanwhile
    return total


class PeakSpool:
    """Samples spooled_bytes every 5 ms in a thread, keeping the peak."""

    def __init__(self, pid: int, directory: Path) -> None:
        self.pid, self.directory = pid, directory
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, spooled_bytes(self.pid, self.directory))

    def __enter__(self) -> PeakSpool:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def exchange(url: str, request: bytes) -> bytes:
    """Send `request` (a head, or a head and a body) on a new connection; the answer."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)\r$", head)
            assert length is not None, head
            return head + await reader.readexactly(int(length.group(1)))
    finally:
        writer.close()


async def spool_reserved(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as answer:
        page = await answer.text()
    found = re.search(r"^sobot_proxy_spool_reserved_bytes ([0-9.e+]+)$", page, re.M)
    assert found is not None, page
    return float(found.group(1))


async def test_concurrent_large_uploads_stay_within_the_spool_limit(tmp_path):
    """Two 3 MiB uploads fill most of an 8 MiB budget; a third is refused with 503 before it
    sends a byte of its body, the two finish intact, and the disk never holds more than 8 MiB."""
    spool = tmp_path / "spool"
    spool.mkdir()
    limit, size = 8 * MIB, 3 * MIB
    with stack(
        tmp_path,
        SOBOT_TEMP_DIR=str(spool),
        SOBOT_MAX_BODY="4MiB",
        SOBOT_SPOOL_LIMIT=str(limit),
    ) as running:
        pid = running.proxy.process.pid
        url = running.proxy_url
        running.control("hold")  # the admitted uploads stay in flight, their bodies on disk
        bodies = [os.urandom(size) for _ in range(2)]
        async with aiohttp.ClientSession() as session:
            with PeakSpool(pid, spool) as disk:
                uploads = [
                    asyncio.create_task(session.post(f"{url}{UPLOAD}", data=io.BytesIO(body)))
                    for body in bodies
                ]
                async with asyncio.timeout(20):
                    while spooled_bytes(pid, spool) < 2 * size:
                        assert not any(upload.done() for upload in uploads)
                        await asyncio.sleep(0.01)
                calls_before = running.fake_stats()["api_calls"]
                head = f"POST {UPLOAD} HTTP/1.1\r\nHost: p\r\nContent-Length: {size}\r\n"
                # The third: only its head is ever sent, and the answer comes all the same.
                refused = await exchange(url, (head + "\r\n").encode())
                expect = f"{head}Expect: 100-continue\r\n\r\n".encode()
                refused_expect = await exchange(url, expect)
                assert await spool_reserved(session, url) == 2 * size
                running.control("release")
                async with asyncio.timeout(20):
                    answers = [await upload for upload in uploads]
                    echoes = [await answer.json() for answer in answers]
            assert running.fake_stats()["api_calls"] == calls_before  # the third never went on
            async with asyncio.timeout(10):
                while await spool_reserved(session, url):  # noqa: ASYNC110 -- another process
                    await asyncio.sleep(0.01)
            # The room is back: the largest body allowed is taken now.
            async with session.post(f"{url}{UPLOAD}", data=io.BytesIO(os.urandom(4 * MIB))) as last:
                assert last.status == 200
    for answer in (refused, refused_expect):
        assert answer.startswith(b"HTTP/1.1 503")
        assert b'"ret_code":"980503"' in answer
        assert b"SOBOT_SPOOL_LIMIT" in answer
        assert b"Connection: close" in answer
    assert b"100 Continue" not in refused_expect
    assert [echo["ret_code"] for echo in echoes] == ["000000", "000000"]
    assert [echo["item"]["body_sha256"] for echo in echoes] == [
        hashlib.sha256(body).hexdigest() for body in bodies
    ]
    print(f"\npeak spool on disk: {disk.peak / MIB:.1f} MiB of {limit / MIB:.0f} MiB")
    assert 2 * size <= disk.peak <= limit


async def upload_until_answered(url: str, size: int) -> bytes:
    """A raw upload of `size` bytes, sent whole, and the answer."""
    head = f"POST {UPLOAD} HTTP/1.1\r\nHost: p\r\nContent-Length: {size}\r\n\r\n".encode()
    return await exchange(url, head + os.urandom(size))


async def test_a_temp_dir_removed_after_start_up_gets_507_and_the_proxy_keeps_serving(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    with stack(tmp_path, SOBOT_TEMP_DIR=str(spool)) as running:
        spool.rmdir()
        answer = await upload_until_answered(running.proxy_url, 2 * MIB)
        assert answer.startswith(b"HTTP/1.1 507")
        assert b'"ret_code":"980507"' in answer
        assert b"ENOENT" in answer
        assert str(spool).encode() not in answer  # an internal path stays in the log
        failed = running.proxy.wait_for_event("spool_failed")
        assert failed["errno"] == "ENOENT"
        assert failed["reason"] == "No such file or directory"
        assert failed["temp_dir"] == str(spool)
        request = running.proxy.wait_for_event("request")
        assert (request["status"], request["ret_code"]) == (507, "980507")
        # Still serving: a small body needs no disk; with the directory back, a large one works.
        small = await upload_until_answered(running.proxy_url, 1000)
        assert small.startswith(b"HTTP/1.1 200")
        spool.mkdir()
        large = await upload_until_answered(running.proxy_url, 2 * MIB)
        assert large.startswith(b"HTTP/1.1 200")


async def test_a_full_disk_gets_507_and_the_proxy_keeps_serving(tmp_path):
    """A file size limit (RLIMIT_FSIZE) stands in for a full disk: a write past it fails with
    EFBIG, as one on a full disk fails with ENOSPC (Python ignores SIGXFSZ)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    with stack(tmp_path, SOBOT_TEMP_DIR=str(spool)) as running:
        fits = 3 * MIB // 2
        resource.prlimit(running.proxy.process.pid, resource.RLIMIT_FSIZE, (fits, fits))
        answer = await upload_until_answered(running.proxy_url, 3 * MIB)
        assert answer.startswith(b"HTTP/1.1 507")
        assert b'"ret_code":"980507"' in answer
        failed = running.proxy.wait_for_event("spool_failed")
        assert (failed["errno"], failed["reason"]) == ("EFBIG", "File too large")
        # Still serving, and still spooling what fits.
        fitting = await upload_until_answered(running.proxy_url, fits - 1000)
        assert fitting.startswith(b"HTTP/1.1 200")
        assert spooled_bytes(running.proxy.process.pid, spool) == 0  # the spools are gone


def test_a_max_body_over_the_spool_limit_stops_start_up(tmp_path):
    env = command_env(
        SOBOT_APPID="a",
        SOBOT_APP_KEY="k",
        SOBOT_REGION="sg",
        SOBOT_MAX_BODY="64MiB",
        SOBOT_SPOOL_LIMIT="32MiB",
    )
    result = run_command("serve", cwd=tmp_path, env=env)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("sobot-proxy: configuration error: max_body (67108864 bytes) is over")
    assert "SOBOT_SPOOL_LIMIT" in line
