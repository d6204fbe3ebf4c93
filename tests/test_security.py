"""Who may use the proxy, what it forwards, what it never reveals: hostile input over sockets."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
import trustme

from proxy.config.routes import CredentialSettings, RouteSettings
from proxy.server.forward import Forwarder
from proxy.sobot import v6
from proxy.sobot.v5 import make_sign
from proxy.testing.fake_sobot import V5_PREFIXES, FakeSobot
from proxy.tokens.manager import Backoff
from tests.conftest import APP_KEY, APPID, CapturedLogs, exact_url, send_raw, tokens_of

KEYS = ("client-key-one-0123456789", "client-key-two-0123456789")


# -- client keys -------------------------------------------------------------------------------


@pytest.fixture
async def keyed(make_proxy):
    return await make_proxy(client_keys=KEYS)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-key",
        f"Bearer {KEYS[0]}x",
        f"Bearer {KEYS[0][:-1]}",
        f"Basic {KEYS[0]}",
        KEYS[0],
        f"Bearer {KEYS[0]},{KEYS[1]}",
    ],
)
async def test_a_missing_or_wrong_client_key_gets_401_and_nothing_is_forwarded(
    keyed, fake: FakeSobot, authorization
):
    headers = {} if authorization is None else {"Authorization": authorization}
    for path in ("/api/echo", "/api/get_token", "/nowhere"):
        response = await keyed.post(path, data=b"x", headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="sobot-proxy"'
        assert (await response.json())["ret_code"] == "980401"
    assert fake.stats.api_calls == 0


@pytest.mark.parametrize(
    "authorization",
    [
        b"Bearer \xff",  # not UTF-8: aiohttp decodes it to a lone surrogate
        b"Bearer " + KEYS[0].encode() + b"\xb1\xa8",
        b"Bearer \xe4\xb8\xad\xe6\x96\x87",  # UTF-8, not ASCII
        b"\xff\xfe",
        b"Bearer\t" + KEYS[0].encode() + b"\x80",
    ],
)
async def test_malformed_client_key_bytes_get_401_not_500(
    keyed, fake: FakeSobot, logs: CapturedLogs, authorization
):
    for path in (b"/api/echo", b"/api/get_token", b"/metrics"):
        answer = await send_raw(
            keyed,
            b"GET "
            + path
            + b" HTTP/1.1\r\nHost: p\r\nAuthorization: "
            + authorization
            + b"\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), answer[:200]
        assert answer.endswith(b'"ret_code":"980401","ret_msg":"the client key is not valid"}') or (
            answer.endswith(b'"ret_msg":"send a client key as `Authorization: Bearer <key>`"}')
            and not authorization.startswith(b"Bearer ")
        )
    assert fake.stats.api_calls == 0
    assert not logs.events("internal_error")
    assert b"Traceback" not in logs.raw


@pytest.mark.parametrize("key", KEYS)
async def test_a_right_client_key_is_let_through_and_consumed(keyed, fake: FakeSobot, key):
    for scheme in ("Bearer", "bearer"):
        response = await keyed.get("/api/echo", headers={"Authorization": f"{scheme} {key}"})
        assert (await response.json())["ret_code"] == "000000"
        assert "Authorization" not in fake.received[-1].headers  # the proxy's, not Sobot's


async def test_health_stays_open_without_a_key(keyed):
    assert (await keyed.get("/healthz")).status == 200
    # Ready once a token is held (a keyed request waits for it): 200, not 401.
    assert (await keyed.get("/api/echo", headers={"Authorization": f"Bearer {KEYS[0]}"})).ok
    response = await keyed.get("/readyz")
    assert response.status == 200
    assert (await response.json())["status"] == "ready"


async def test_not_ready_is_said_without_a_key_too(make_proxy, fake: FakeSobot):
    fake.fail_get_token("999999", times=-1)
    keyed = await make_proxy(client_keys=KEYS, backoff=Backoff(first=60, cap=60))
    async with asyncio.timeout(5):
        await fake.wait_for_get_token_calls(1)
    # Waits for the failed fetch's outcome: no token, so a 502 (not a 401: the key is right).
    refused = await keyed.get("/api/echo", headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert refused.status == 502
    response = await keyed.get("/readyz")
    assert response.status == 503
    assert (await response.json())["ret_code"] == "999999"


async def test_without_client_keys_authorization_is_forwarded_untouched(proxy, fake: FakeSobot):
    await proxy.get("/api/echo", headers={"Authorization": "Bearer for-sobot"})
    assert fake.received[-1].headers["Authorization"] == "Bearer for-sobot"


# -- allow-lists -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "allowed"),
    [
        ("GET", "/api/ws/5/ticket/list", True),
        ("POST", "/api/5/user/save", True),
        ("GET", "//api/ws/5/ticket/list", True),
        ("GET", "/api/ws/5/%74icket/list", True),  # the same path, encoded: same answer
        ("GET", "/api/ws/5/ticketx/list", False),
        ("GET", "/api/ws/5/", False),
        ("GET", "/api/5/usr/save", False),
        ("GET", "/api/6/user/save", False),
        ("DELETE", "/api/ws/5/ticket/list", False),
        ("PUT", "/api/5/user/save", False),
    ],
)
async def test_allow_lists_admit_only_what_they_name(
    make_proxy, fake: FakeSobot, method, target, allowed
):
    proxy = await make_proxy(
        allow_paths=("/api/ws/5/ticket/", "/api/5/user/"), allow_methods=("GET", "POST")
    )
    response = await proxy.session.request(method, exact_url(proxy, target))
    if allowed:
        assert (await response.json())["ret_code"] == "000000"
        assert fake.stats.api_calls == 1
    else:
        assert response.status == 403
        assert (await response.json())["ret_code"] == "980403"
        assert fake.stats.api_calls == 0


# -- what reaches the upstream -----------------------------------------------------------------

# Each under /api/ could reach the upstream outside it: 400. Each outside /api/: 404.
TRAVERSALS = [
    ("/api/../admin", 400),
    ("/api/..%2fadmin", 400),
    ("/api/%2e%2e/admin", 400),
    ("/api/%2E%2E/admin", 400),
    ("/api/.%2e/admin", 400),
    ("/api/5/%2e%2e/%2e%2e/admin", 400),
    # Java servlet containers drop `;parameters` before resolving dot segments.
    ("/api/..;/admin", 400),
    ("/api/5/..;/admin", 400),
    ("/api/..;x=1/admin", 400),
    ("/api/5/.;/admin", 400),
    ("/api/%2e%2e;/admin", 400),
    ("/api/%2E.;jsessionid=1/admin", 400),
    ("/api/5/..;/..;/admin", 400),
    ("/api/..%3b/admin", 400),
    # A `#` would end the path upstream (nginx resolves `/api/..#x` to `/`); never sent.
    ("/api/..#/admin", 400),
    ("/api/x/..#", 400),
    ("/api/get_token#x", 400),
    # Control characters, raw or encoded, never reach a path.
    ("/api/..%00/admin", 400),
    ("/api/%09../admin", 400),
    ("/api/5/%2fadmin", 400),
    ("/api/5/%2Fadmin", 400),
    ("/api/5/%5cadmin", 400),
    ("/api/5/%5C..%5Cadmin", 400),
    ("/api/5\\..\\admin", 400),
    ("/api/5//admin", 400),
    ("/api/./admin", 400),
    ("/api/%2e/admin", 400),
    ("/%2e%2e/api/admin", 400),  # dot segments are refused under every prefix and outside
    ("/admin/../api/5/user", 400),
    ("//evil.example/api/5/user", 404),
    ("http://evil.example/api/5/user", 400),
    ("evil.example:443", 400),
    ("*", 400),
]


async def assert_answered_by_the_proxy(client, target: str, status: int) -> None:
    answer = await send_raw(
        client, f"GET {target} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n".encode()
    )
    if target.startswith("/") or target.startswith("http://"):
        # The proxy's own answer: JSON with the status's own code.
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
        assert f'"ret_code":"980{status}"'.encode() in answer
    else:
        # Not a target a GET can have: aiohttp's parser refuses it before the proxy sees it.
        assert answer.startswith(f"HTTP/1.0 {status} ".encode()), answer[:200]


@pytest.mark.parametrize(("target", "status"), TRAVERSALS)
async def test_no_target_reaches_the_upstream_outside_api(proxy, fake: FakeSobot, target, status):
    await assert_answered_by_the_proxy(proxy, target, status)
    assert fake.stats.api_calls == 0
    assert fake.stats.outside_api_calls == 0


# Every other kind of route: the other v5 families, a V6 route, and one that injects nothing.
V6_APPID = "security-v6-appid"
V6_SECRET = "security-v6-secret-0123456789"
SIGNED_BY_CLIENT = "/signed-by-client/"
OTHER_PREFIXES = (
    "/chat-facebook/api/",
    "/chat-third/api/",
    "/comm-open/api/",
    "/callservice/",
    SIGNED_BY_CLIENT,
)
CALLCENTER = CredentialSettings("callcenter", "v6", V6_APPID, V6_SECRET)
ROUTES = (
    RouteSettings("/callservice/", None, "callcenter"),
    RouteSettings(SIGNED_BY_CLIENT, None, None),
)


@pytest.fixture
async def routed_fake():
    """A Sobot serving every prefix of OTHER_PREFIXES, V6 included."""
    sobot = FakeSobot(
        APPID,
        APP_KEY,
        v6_appid=V6_APPID,
        v6_secret=V6_SECRET,
        prefixes=(*V5_PREFIXES, SIGNED_BY_CLIENT),
    )
    await sobot.start()
    yield sobot
    await sobot.stop()


@pytest.mark.parametrize(
    ("target", "status"),
    [
        pytest.param(target.replace("/api/", prefix, 1), status, id=f"{prefix}:{target}")
        for prefix in OTHER_PREFIXES
        for target, status in TRAVERSALS
        if "/api/" in target
    ],
)
async def test_no_target_reaches_the_upstream_outside_any_prefix(
    make_proxy, routed_fake: FakeSobot, target, status
):
    proxy = await make_proxy(base_url=routed_fake.url, credentials=(CALLCENTER,), routes=ROUTES)
    await assert_answered_by_the_proxy(proxy, target, status)
    stats = routed_fake.stats
    assert (stats.api_calls, stats.v6_api_calls, stats.outside_api_calls) == (0, 0, 0)


@pytest.mark.parametrize(
    "spelling",
    [
        "/tokens/company/",
        "/TOKENS/company",
        "/tokens/company;x=1",
        "/tokens/%63ompany",
        "/tokens/company.json",
        "//tokens/company",
    ],
)
async def test_every_spelling_of_tokens_company_is_answered_locally(
    make_proxy, routed_fake: FakeSobot, spelling
):
    """Even with a route that would forward it (/tokens/, injecting nothing), no spelling of
    the V6 token request reaches Sobot: each would rotate the token everyone shares."""
    proxy = await make_proxy(
        base_url=routed_fake.url,
        credentials=(CALLCENTER,),
        routes=(*ROUTES, RouteSettings("/tokens/", None, None)),
    )
    await tokens_of(proxy, "callcenter").get()
    assert routed_fake.stats.v6_token_calls == 1  # the proxy's own
    now = str(int(time.time() * 1000))
    claim = {
        "responseType": "token",
        "appId": V6_APPID,
        "currentTime": now,
        "sign": v6.make_sign(V6_APPID, now, V6_SECRET),
    }
    response = await proxy.session.post(exact_url(proxy, spelling), json=claim)
    assert response.status == 200
    assert (await response.json())["access_token"] == routed_fake.current_v6_token
    refused = await proxy.session.post(exact_url(proxy, spelling), json={**claim, "sign": "0" * 32})
    assert refused.status == 401
    assert "access_token" not in await refused.json()
    stats = routed_fake.stats
    assert (stats.v6_token_calls, stats.api_calls, stats.outside_api_calls) == (1, 0, 0)


SMUGGLING = [
    # Both lengths: which one the upstream would believe is the attack.
    b"POST /api/echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: p\r\n\r\n",
    b"POST /api/echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /api/echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST /api/echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"POST /api/echo HTTP/1.1\r\nHost: p\r\nContent-Length : 5\r\n\r\nhello",
    # Header injection: a bare CR or LF would start a new header upstream.
    b"GET /api/echo HTTP/1.1\r\nHost: p\r\nX-A: b\nX-Injected: c\r\n\r\n",
    b"GET /api/echo HTTP/1.1\r\nHost: p\r\nX-A: b\rX-Injected: c\r\n\r\n",
    b"GET /api/echo HTTP/1.1\r\nHost: p\r\nX-A: b\x00c\r\n\r\n",
    b"GET /api/echo HTTP/1.1\r\nHost: p\r\nX-A: b\r\n c\r\n\r\n",
    # Oversized and too many headers.
    b"GET /api/echo HTTP/1.1\r\nHost: p\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n",
    b"GET /api/echo HTTP/1.1\r\nHost: p\r\n" + b"X-A: a\r\n" * 500 + b"\r\n",
    b"GET /api/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: p\r\n\r\n",
    b"GET /api/echo HTTP/1.1\r\nHost: p\r\nX-" + b"A" * 20_000 + b": a\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", SMUGGLING, ids=range(len(SMUGGLING)))
async def test_smuggling_and_malformed_headers_are_refused_and_the_connection_closed(
    proxy, fake: FakeSobot, logs: CapturedLogs, request_bytes
):
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(request_bytes)
        async with asyncio.timeout(10):
            answer = await reader.read()  # to the end: only the proxy closing it ends this
    finally:
        writer.close()
    # aiohttp's parser refuses it before the proxy sees it: HTTP/1.0, so never kept alive.
    assert answer.startswith(b"HTTP/1.0 400 ")
    assert fake.stats.api_calls == 0
    [refusal] = logs.events("bad_http_request")  # one line, no traceback, no request bytes
    assert refusal["level"] == "warning"
    assert "exception" not in refusal
    assert b"X-Injected" not in logs.raw
    assert b"aaaaaaaaaa" not in logs.raw


# -- TLS to the upstream -------------------------------------------------------------------------


@pytest.fixture
async def tls_fake(tmp_path):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sobot = FakeSobot(APPID, APP_KEY)
    await sobot.start(ssl_context=server_context)
    yield sobot, str(ca_file)
    await sobot.stop()


async def test_tls_to_the_upstream_is_verified_against_the_configured_ca(make_proxy, tls_fake):
    fake, ca_file = tls_fake
    proxy = await make_proxy(base_url=fake.url, ca_bundle=ca_file)
    assert fake.url.startswith("https://")
    assert (await (await proxy.get("/api/echo")).json())["ret_code"] == "000000"


async def test_an_upstream_certificate_nobody_vouches_for_is_refused(make_proxy, tls_fake):
    fake, _ = tls_fake
    proxy = await make_proxy(base_url=fake.url)  # the system's CAs do not know the test CA
    response = await proxy.get("/api/echo")
    assert response.status == 502
    assert (await response.json())["ret_code"] == "980502"
    assert fake.stats.get_token_calls == 0  # the TLS handshake failed: no signature was sent


# -- what it never reveals -----------------------------------------------------------------------


async def test_a_crash_in_a_handler_is_a_plain_500_and_its_trace_shows_no_secret(
    proxy, fake: FakeSobot, logs: CapturedLogs, monkeypatch
):
    await proxy.get("/api/echo")
    token = fake.current_token
    assert token is not None

    async def crash(*_args, **_kwargs):
        raise RuntimeError(f"bug with {APP_KEY} and {token} in its message")

    monkeypatch.setattr(Forwarder, "forward", crash)
    response = await proxy.get("/api/echo")
    body = await response.read()
    assert response.status == 500
    assert b'"ret_code":"980500"' in body
    for internal in (b"Traceback", b"/proxy/", b"RuntimeError"):
        assert internal not in body
    [event] = logs.events("internal_error")
    assert "RuntimeError: bug with [redacted] and [redacted]" in event["exception"]
    assert APP_KEY.encode() not in logs.raw
    assert token.encode() not in logs.raw


async def test_client_keys_never_reach_the_logs(keyed, logs: CapturedLogs):
    await keyed.get("/api/echo", headers={"Authorization": f"Bearer {KEYS[0]}"})
    await keyed.get("/api/echo", headers={"Authorization": f"Bearer {KEYS[1]}-not"})
    for key in KEYS:
        assert key.encode() not in logs.raw


async def test_the_token_reaches_only_a_client_that_proves_it_knows_the_app_key(
    proxy, fake: FakeSobot
):
    await proxy.get("/api/echo")
    token = fake.current_token
    assert token is not None
    seen = b""
    for path in ("/api/echo", "/readyz", "/healthz", "/api/get_token?appid=x", "/nowhere"):
        seen += await (await proxy.get(path)).read()
    assert token.encode() not in seen
    create_time = str(int(__import__("time").time()))
    signed = {"appid": APPID, "create_time": create_time}
    signed["sign"] = make_sign(APPID, create_time, APP_KEY)
    answer = await (await proxy.get("/api/get_token", params=signed)).json()
    assert answer["item"]["token"] == token
