"""Forwarding through a real proxy to the real fake Sobot: what arrives, what comes back."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os

import pytest

from proxy.testing.fake_sobot import FakeSobot
from tests.conftest import CapturedLogs, exact_url, send_raw


async def test_request_reaches_the_upstream_with_the_managed_token(proxy, fake: FakeSobot):
    response = await proxy.get("/api/ws/5/ticket/list")
    answer = await response.json()
    assert response.status == 200
    assert answer["ret_code"] == "000000"
    [received] = fake.received
    assert received.token_state == "valid"
    assert received.path == "/api/ws/5/ticket/list"


async def test_many_requests_share_one_token(proxy, fake: FakeSobot):
    for _ in range(20):
        response = await proxy.get("/api/echo")
        assert (await response.json())["ret_code"] == "000000"
    assert fake.stats.get_token_calls == 1
    assert {r.token_serial for r in fake.received} == {1}


@pytest.mark.parametrize(
    "query",
    [
        "a=1&a=2&a=1",  # repeated keys, order kept
        "z=1&b=2&a=3",  # not sorted
        "q=%E4%B8%AD%E6%96%87&sp=a+b&pct=%2F%3F%26",  # percent-encodings kept as sent
        "empty=&flag&x=%20",
        "lower=%2f&upper=%2F",
    ],
)
async def test_query_string_is_forwarded_byte_for_byte(proxy, fake: FakeSobot, query):
    response = await proxy.session.get(exact_url(proxy, f"/api/echo?{query}"))
    assert response.status == 200
    assert fake.received[-1].query == query


async def test_method_and_body_are_forwarded(proxy, fake: FakeSobot):
    body = os.urandom(200_000)
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        response = await proxy.request(method, "/api/5/user/save", data=body)
        assert response.status == 200
        received = fake.received[-1]
        assert received.method == method
        assert received.body == body


async def test_end_to_end_headers_are_forwarded_and_hop_by_hop_dropped(proxy, fake: FakeSobot):
    headers = [
        ("X-Custom", "one"),
        ("X-Custom", "two"),
        ("Content-Type", "application/json; charset=utf-8"),
        ("Authorization", "Bearer app-level"),
        ("Connection", "keep-alive, X-Named-Hop"),
        ("X-Named-Hop", "dropped because Connection names it"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic c2VjcmV0"),
        ("Proxy-Authenticate", "Basic"),
        ("token", "a-token-the-client-brought"),
    ]
    response = await proxy.post("/api/echo", data=b"{}", headers=headers)
    assert response.status == 200
    received = fake.received[-1]
    assert received.headers.getall("X-Custom") == ["one", "two"]
    assert received.headers["Content-Type"] == "application/json; charset=utf-8"
    assert received.headers["Authorization"] == "Bearer app-level"
    for dropped in (
        "Connection",
        "X-Named-Hop",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Authenticate",
    ):
        assert dropped not in received.headers, dropped
    # The client's token is replaced by the managed one, which the fake accepted.
    assert received.headers.getall("token") != ["a-token-the-client-brought"]
    assert len(received.headers.getall("token")) == 1
    assert received.token_state == "valid"
    assert received.headers["Host"] == fake.url.removeprefix("http://")


FORWARDING_HEADERS = [
    ("Forwarded", "for=203.0.113.9;proto=https"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Host", "app.internal"),
    ("X-Forwarded-Proto", "https"),
    ("X-Real-IP", "203.0.113.9"),
]


async def test_by_default_sobot_learns_no_callers_address(proxy, fake: FakeSobot):
    """Sobot is a third party: neither the caller's address nor one a client passed on."""
    response = await proxy.get("/api/echo", headers=FORWARDING_HEADERS)
    assert response.status == 200
    received = fake.received[-1].headers
    for name, _ in FORWARDING_HEADERS:
        assert name not in received, name


async def test_forwarded_headers_on_tell_sobot_the_callers_address(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(forwarded_headers=True)
    response = await proxy.get("/api/echo", headers=FORWARDING_HEADERS)
    assert response.status == 200
    received = fake.received[-1].headers
    assert received["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"  # the chain, the caller last
    assert received["X-Forwarded-Proto"] == "http"  # how the caller reached the proxy
    assert received["Forwarded"] == "for=203.0.113.9;proto=https"
    assert received["X-Forwarded-Host"] == "app.internal"
    assert received["X-Real-IP"] == "203.0.113.9"
    bare = await proxy.get("/api/echo")
    assert bare.status == 200
    assert fake.received[-1].headers["X-Forwarded-For"] == "127.0.0.1"


async def test_header_bytes_that_are_not_utf8_reach_sobot_byte_exact(proxy, fake: FakeSobot):
    """A client's GBK bytes (aiohttp decodes them with surrogateescape) go out as they came."""
    gbk = b"\xb1\xa8\xb1\xed.xls"  # "报表.xls" in GBK
    answer = await send_raw(
        proxy,
        b"GET /api/echo HTTP/1.1\r\nHost: p\r\nConnection: close\r\nX-File: " + gbk + b"\r\n"
        b"X-Utf8: \xe6\x8a\xa5\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    received = fake.received[-1].headers
    assert received["X-File"].encode("utf-8", "surrogateescape") == gbk
    assert received["X-Utf8"].encode("utf-8", "surrogateescape") == b"\xe6\x8a\xa5"


async def test_no_headers_are_invented_for_the_upstream(proxy, fake: FakeSobot):
    """aiohttp's client would add User-Agent, Accept and friends; the client sent none. (The
    request id is the proxy's own: it goes upstream so Sobot's side can be traced too.)"""
    head = await send_raw(
        proxy, b"GET /api/echo HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200")
    names = {name.lower() for name in fake.received[-1].headers}
    assert names == {"host", "token", "x-request-id"}


async def test_answer_status_headers_and_body_come_back_unchanged(proxy, fake: FakeSobot):
    answer = {"ret_code": "999999", "ret_msg": "unknown system exception", "item": [1, "two"]}
    fake.script(
        answer,
        status=503,
        headers={
            "X-Upstream": "kept",
            "Set-Cookie": "a=b",
            "Keep-Alive": "timeout=9",
            "Proxy-Authenticate": "Basic",
            "Connection": "X-Upstream-Hop",
            "X-Upstream-Hop": "dropped",
        },
    )
    response = await proxy.get("/api/echo")
    assert response.status == 503
    assert response.headers["X-Upstream"] == "kept"
    assert response.headers["Set-Cookie"] == "a=b"
    for dropped in ("Keep-Alive", "Proxy-Authenticate", "X-Upstream-Hop"):
        assert dropped not in response.headers
    assert await response.json() == answer


async def test_sloppily_joined_paths_count_one_leading_slash(proxy, fake: FakeSobot):
    """A public PHP SDK for Sobot sends //api/ws/5/ticket/...; it is forwarded as /api/..."""
    head = await send_raw(
        proxy, b"GET //api/ws/5/ticket/get?id=1 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200")
    assert (fake.received[-1].path, fake.received[-1].query) == ("/api/ws/5/ticket/get", "id=1")


@pytest.mark.parametrize("path", ["/", "/index.html", "/apix/5/user", "/API/5/user", "/api"])
async def test_paths_outside_api_get_404_and_are_never_forwarded(proxy, fake: FakeSobot, path):
    response = await proxy.get(path)
    assert response.status == 404
    assert (await response.json())["ret_code"] == "980404"
    assert fake.stats.api_calls == 0


@pytest.mark.parametrize(
    "target",
    [
        "/api/../secret",
        "/api/5/../../secret",
        "/api/%2e%2e/secret",
        "/api/%2E%2e/secret",
        "/api/5/%2fetc",
        "/api/5/%5cetc",
        "/api/5\\..\\etc",
        "/api/5//user",
        "/api/./5/user",
        "http://evil.example/api/5/user",
    ],
)
async def test_targets_that_could_escape_api_get_400(proxy, fake: FakeSobot, target):
    answer = await send_raw(
        proxy, f"GET {target} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    assert b'"ret_code":"980400"' in answer
    assert fake.stats.api_calls == 0


async def test_each_request_is_logged_once_with_its_return_code(
    proxy, fake: FakeSobot, logs: CapturedLogs
):
    fake.script({"retCode": "700046", "ret_msg": "edition"})
    await proxy.get("/api/robot/5/ask?q=1")
    await proxy.post("/api/5/user/save", data=b"x")
    first, second = logs.events("request")
    assert first["method"] == "GET"
    assert first["path"] == "/api/robot/5/ask"  # never the query string
    assert first["status"] == 200
    assert first["ret_code"] == "700046"  # as it came, under either name
    assert first["attempts"] == 1
    assert first["duration_ms"] >= first["upstream_ms"] > 0  # a real exchange takes time
    assert second["ret_code"] == "000000"


async def test_answers_that_are_not_json_are_relayed_uninspected(proxy, fake: FakeSobot):
    """A download never carries a return code: even one that looks like 900002 is not replayed."""
    fake.script({"ret_code": "900002"}, headers={"Content-Type": "application/octet-stream"})
    response = await proxy.get("/api/file")
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert await response.read() == b'{"ret_code":"900002"}'
    assert fake.stats.api_calls == 1


async def test_large_answers_stream_through_byte_exact(proxy, fake: FakeSobot):
    items = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(60_000)]
    fake.script({"ret_code": "000000", "item": items})  # about 4 MiB of JSON
    response = await proxy.get("/api/export")
    body = await response.read()
    assert response.status == 200
    assert len(body) > 1024 * 1024
    assert body.endswith(b'"]}')
    assert response.headers["Content-Length"] == str(len(body))


async def test_compressed_answers_are_inspected_and_relayed_compressed(
    proxy, fake: FakeSobot, logs: CapturedLogs
):
    compressed = gzip.compress(b'{"ret_code": "700046", "ret_msg": "edition"}')
    gzip_json = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    fake.script(compressed, headers=gzip_json)
    response = await proxy.get(
        "/api/echo", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    )
    assert response.headers["Content-Encoding"] == "gzip"
    assert await response.read() == compressed
    assert logs.events("request")[-1]["ret_code"] == "700046"


async def test_a_compressed_900002_is_replayed(proxy, fake: FakeSobot):
    await proxy.get("/api/echo")
    gzip_json = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    fake.script(gzip.compress(b'{"ret_code":"900002"}'), headers=gzip_json)
    response = await proxy.get("/api/echo")
    assert (await response.json())["ret_code"] == "000000"
    assert fake.stats.api_calls == 3


@pytest.mark.parametrize("size", [10, 2 * 1024 * 1024])
async def test_head_answers_keep_the_length_a_get_would_have(proxy, fake: FakeSobot, size):
    fake.script(b"x" * size, headers={"Content-Type": "application/octet-stream"})
    response = await proxy.head("/api/file")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(size)
    assert await response.read() == b""
    assert fake.received[-1].method == "HEAD"


async def test_an_empty_post_is_forwarded_with_an_empty_body(proxy, fake: FakeSobot):
    head = await send_raw(
        proxy,
        b"POST /api/5/user/touch HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 200")
    assert fake.received[-1].body == b""
    assert fake.received[-1].headers.get("Content-Length") == "0"


async def test_a_chunked_request_body_is_streamed_on_chunked(proxy, fake: FakeSobot):
    head = await send_raw(
        proxy,
        b"POST /api/5/user/save HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 200")
    received = fake.received[-1]
    assert received.body == b"hello world"
    # Its length is unknown until it ends, and it is not held back until then.
    assert received.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in received.headers


async def test_a_body_over_the_cap_gets_413_and_is_not_forwarded(proxy, fake: FakeSobot):
    head = await send_raw(
        proxy,
        b"POST /api/5/file HTTP/1.1\r\nHost: p\r\nContent-Length: 999999999999\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 413")
    assert b"Connection: close" in head  # the unread body makes the connection unusable
    assert b'"ret_code":"980413"' in head
    assert fake.stats.api_calls == 0


async def test_a_stalled_upstream_gives_504_and_is_not_retried(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(upstream_timeout=0.3)
    await proxy.get("/api/echo")
    fake.hold_answers()
    async with asyncio.timeout(10):
        response = await proxy.post("/api/5/user/save", data=b"once")
    assert response.status == 504
    assert (await response.json())["ret_code"] == "980504"
    assert fake.stats.api_calls == 2  # the first call, and this one exactly once


async def test_an_unreachable_upstream_gives_502_for_forwarded_calls(make_proxy, fake: FakeSobot):
    proxy = await make_proxy()
    await proxy.get("/api/echo")  # a valid token is held
    await fake.stop()
    response = await proxy.get("/api/echo")
    assert response.status == 502
    assert (await response.json())["ret_code"] == "980502"


async def test_expect_100_continue_is_answered_by_the_proxy_not_forwarded(proxy, fake: FakeSobot):
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(
            b"POST /api/5/user/save HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(b"hello")
            await writer.drain()
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    received = fake.received[-1]
    assert received.body == b"hello"
    assert "Expect" not in received.headers


async def test_failed_exchanges_are_logged_with_attempts_and_upstream_time(
    make_proxy, fake: FakeSobot, logs: CapturedLogs
):
    proxy = await make_proxy(upstream_timeout=0.2)
    await proxy.get("/api/echo")
    fake.hold_answers()
    assert (await proxy.get("/api/echo")).status == 504
    event = logs.events("request")[-1]
    assert (event["status"], event["ret_code"], event["attempts"]) == (504, "980504", 1)
    assert event["upstream_ms"] >= 200
    assert event["error"] == "Sobot did not answer in time"


@pytest.mark.parametrize("target", ["*", "sg.sobot.io:443"])
async def test_targets_no_route_matches_get_a_json_404(proxy, fake: FakeSobot, target):
    method = "CONNECT" if ":" in target else "OPTIONS"
    answer = await send_raw(proxy, f"{method} {target} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert b'"ret_code":"980404"' in answer
    assert fake.stats.api_calls == 0


async def test_header_rules_hold_whatever_the_case_of_sobots_header_names(proxy):
    """An answer whose names are all lower case (as an HTTP/2 gateway writes them) loses its
    hop-by-hop headers and is framed once, by the proxy: no `transfer-encoding: chunked` left
    beside the Content-Length of a body the proxy read whole."""
    answer = await send_raw(
        proxy,
        b"GET /api/echo HTTP/1.1\r\nHost: p\r\nX-Fake-Fault: lowercase-headers\r\n"
        b"Connection: close\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b'{"ret_code":"000000","ret_msg":"success"}'
    assert names.count(b"content-length") == 1
    for hop in (b"transfer-encoding", b"x-hop", b"keep-alive", b"proxy-authenticate"):
        assert hop not in names, head
    assert b"x-kept" in names
