"""Memory stays bounded whatever the size of a body: measured on a real proxy process."""

from __future__ import annotations

import hashlib
import json
import urllib.request

from proxy.testing.fake_sobot import FAULT_HEADER, download_sha256
from tests.processes import OPENER, PeakRss, rss_bytes, stack

MIB = 1024 * 1024
# The proxy's resident memory may rise by at most this much while relaying a huge body.
ALLOWED_GROWTH = 16 * MIB


def fetch(url: str, headers: dict[str, str], data=None) -> tuple[int, str, int, bytes]:
    """Status, sha256 and size of the answer body, read in pieces, and its first bytes."""
    request = urllib.request.Request(
        url, headers=headers, data=data, method="POST" if data else "GET"
    )
    digest, size, head = hashlib.sha256(), 0, b""
    with OPENER.open(request, timeout=120) as response:
        while chunk := response.read(MIB):
            digest.update(chunk)
            size += len(chunk)
            head = head or chunk[:4096]
        return response.status, digest.hexdigest(), size, head


def warm_up(url: str) -> None:
    """Run each code path once, so imports and buffers are not counted as growth."""
    for _ in range(3):
        fetch(f"{url}/api/echo", {})
        fetch(f"{url}/api/file", {FAULT_HEADER: f"download={4 * MIB}"})
        fetch(f"{url}/api/upload", {}, data=b"x" * (2 * MIB))


def test_a_1_gib_download_barely_moves_the_proxys_memory(tmp_path):
    size = 1024 * MIB
    with stack(tmp_path) as running:
        warm_up(running.proxy_url)
        pid = running.proxy.process.pid
        baseline = rss_bytes(pid)
        with PeakRss(pid) as rss:
            status, digest, got, _ = fetch(
                f"{running.proxy_url}/api/file", {FAULT_HEADER: f"download={size}"}
            )
        assert (status, digest, got) == (200, download_sha256(size), size)
        report("1 GiB download", baseline, rss.peak)
        assert rss.peak - baseline < ALLOWED_GROWTH


def report(label: str, baseline: int, peak: int) -> None:
    print(f"\n{label}: proxy RSS {baseline / MIB:.1f} MiB, peak +{(peak - baseline) / MIB:.1f} MiB")


def pattern(size: int):
    block = hashlib.sha256(b"upload").digest() * 2048  # 64 KiB
    for start in range(0, size, len(block)):
        yield block[: min(len(block), size - start)]


def test_a_256_mib_upload_replayed_after_900002_is_intact_in_bounded_memory(tmp_path):
    size = 256 * MIB
    expected = hashlib.sha256()
    for chunk in pattern(size):
        expected.update(chunk)
    with stack(tmp_path, SOBOT_MAX_BODY="512MiB", SOBOT_TEMP_DIR=str(tmp_path)) as running:
        warm_up(running.proxy_url)
        running.control("expire")  # the upload meets 900002 and must be replayed whole
        pid = running.proxy.process.pid
        baseline = rss_bytes(pid)
        with PeakRss(pid) as rss:
            status, _, _, head = fetch(
                f"{running.proxy_url}/api/5/file/upload",
                {"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                data=pattern(size),
            )
        echo = json.loads(head)["item"]
        assert status == 200
        assert (echo["body_size"], echo["body_sha256"]) == (size, expected.hexdigest())
        stats = running.fake_stats()
        assert stats["token_rejections"] == 1  # the first attempt met 900002: this was the replay
        report("256 MiB upload + replay", baseline, rss.peak)
        assert rss.peak - baseline < ALLOWED_GROWTH
        assert list(tmp_path.glob("tmp*")) == []
