"""The app_key, tokens and signatures never appear in logs or in answers, whatever happens."""

from __future__ import annotations

import dataclasses
import time
import urllib.parse

from aiohttp.test_utils import TestServer

from proxy.config.routes import CredentialSettings, RouteSettings
from proxy.config.settings import Settings
from proxy.config.tenants import TenantSettings
from proxy.logs import Secrets, get_logger
from proxy.server.app import make_app
from proxy.sobot import v6
from proxy.sobot.v5 import make_sign
from proxy.testing.fake_sobot import FakeSobot
from proxy.tokens.manager import Backoff
from tests.conftest import APP_KEY, APPID, CapturedLogs, exact_url, tokens_of
from tests.processes import HEX32


async def test_no_secret_reaches_a_log_line_or_an_answer(
    make_proxy, fake: FakeSobot, logs: CapturedLogs
):
    started = int(time.time())
    proxy = await make_proxy(backoff=Backoff(first=0, cap=0))  # every failure is retried
    answers: list[bytes] = []

    async def call(method: str, path: str, **kwargs) -> None:
        response = await proxy.request(method, path, **kwargs)
        answers.append(await response.read())

    await call("GET", "/api/echo", headers={"token": "client-token", "Authorization": "Bearer x"})
    fake.expire_token()  # a replay
    await call("POST", "/api/echo", data=b"body")
    fake.script({"ret_code": "900002"}, times=2)  # a replay that fails again
    await call("GET", "/api/echo")
    await call("GET", "/api/get_token", params={"appid": APPID, "create_time": "1", "sign": "x"})
    for mode in ("900003", "malformed", "disconnect"):  # get_token failures
        fake.fail_get_token(mode, times=-1)
        fake.expire_token()
        await call("GET", "/api/echo")
        await call("GET", "/readyz")
        fake.fail_get_token(mode, times=0)
    await call("GET", "/api/echo")
    await call("GET", "/readyz")
    await call("GET", "/nowhere")
    ended = int(time.time())

    assert len(fake.issued_tokens) >= 4
    assert tokens_of(proxy).current() is not None
    signs = [make_sign(APPID, str(t), APP_KEY) for t in range(started - 2, ended + 3)]
    secrets = [APP_KEY, *fake.issued_tokens, *signs]
    output = logs.raw
    assert b'"event":"get_token"' in output
    for secret in secrets:
        assert secret.encode() not in output
        for answer in answers:
            assert secret.encode() not in answer


async def test_the_request_log_never_carries_credentials_even_when_asked(logs: CapturedLogs):
    """A last processor masks fields named like credentials, should code ever log one."""
    from proxy.logs import get_logger

    get_logger().info("oops", token="t-value", app_key="k-value", sign="s-value")
    [event] = logs.events("oops")
    assert (event["token"], event["app_key"], event["sign"]) == ("[redacted]",) * 3


async def test_every_failure_path_keeps_the_app_key_and_token_out_of_all_output(
    make_proxy, fake: FakeSobot, logs: CapturedLogs, monkeypatch
):
    client_key = "client-key-for-this-test-0123"
    proxy = await make_proxy(client_keys=(client_key,), backoff=Backoff(first=0, cap=0))
    good = {"Authorization": f"Bearer {client_key}"}
    answers = []

    async def call(path: str = "/api/echo", **headers: str) -> None:
        response = await proxy.get(path, headers=headers or good)
        answers.append(await response.read())

    await call()
    token = fake.current_token
    assert token is not None
    await call(Authorization="Bearer wrong")  # a bad client key
    await call(Authorization=f"Basic {client_key}")
    fake.fail_get_token("900003", times=1)  # get_token errors
    fake.expire_token()
    await call()
    fake.fail_get_token("malformed", times=1)
    fake.expire_token()
    await call()
    await call("/readyz")

    async def crash(*_args, **_kwargs):  # a crash in a handler, naming the secrets
        raise RuntimeError(f"{APP_KEY} {token} {client_key}")

    with monkeypatch.context() as patched:
        patched.setattr("proxy.server.forward.Forwarder.forward", crash)
        await call()
    await fake.stop()  # the upstream goes down
    await call()
    await call("/readyz")

    assert logs.events("internal_error")
    for secret in (APP_KEY, token, client_key, *fake.issued_tokens):
        assert secret.encode() not in logs.raw
        for answer in answers:
            assert secret.encode() not in answer


# A quote, a backslash and text outside ASCII: JSON and repr() show each of them escaped, and a
# traceback rendered into a JSON line escapes the repr again. The markers (Kq7z, Pw9x) are
# found in any form a line could show them in.
ESCAPED_CLIENT_KEY = 'client"key\\0123456789-Kq7z-ключ'
ESCAPED_STORE_PASSWORD = 'store"pass\\word-Pw9x-密码'


async def test_secrets_that_json_and_repr_escape_are_scrubbed_in_every_form(
    aiohttp_client, settings: Settings, logs: CapturedLogs, monkeypatch
):
    """In a request's log line, an error's line and a traceback (its repr too) of a crash."""
    key, password = ESCAPED_CLIENT_KEY, ESCAPED_STORE_PASSWORD
    settings = dataclasses.replace(settings, client_keys=(key,), token_store_password=password)
    app = make_app(settings, secrets=logs.secrets)
    # Without aiohttp's access log, as the proxy runs (server/listen.py): it would show the
    # target as sent, percent-encoded, which no log line of the proxy's does.
    server = TestServer(app)
    await server.start_server(access_log=None)
    proxy = await aiohttp_client(server)
    bearer = f"Bearer {key}"
    answers: list[bytes] = []

    async def call(path: str) -> None:
        response = await proxy.session.get(
            exact_url(proxy, path), headers={"Authorization": bearer}
        )
        answers.append(await response.read())

    # The client key in a request's path (sent by mistake), as the request's line shows it.
    await call("/api/" + urllib.parse.quote(f"{key}|{password}", safe=""))
    get_logger().error("store_failed", detail=f"a bug logs {key} and {password}")

    async def crash(*_args, **_kwargs):
        # An exception's args are shown by their repr(), and the traceback goes into JSON.
        raise KeyError(key, password)

    with monkeypatch.context() as patched:
        patched.setattr("proxy.server.forward.Forwarder.forward", crash)
        await call("/api/echo")

    [request_line, crash_line] = logs.events("request")
    assert request_line["path"] == "/api/[redacted]|[redacted]"
    [error] = logs.events("store_failed")
    assert error["detail"] == "a bug logs [redacted] and [redacted]"
    [internal] = logs.events("internal_error")
    assert "KeyError: ('[redacted]', '[redacted]')" in internal["exception"]
    assert crash_line["status"] == 500
    for marker in (b"Kq7z", b"Pw9x"):
        assert marker not in logs.raw
        for answer in answers:
            assert marker not in answer


def test_the_scrubber_replaces_every_secret_whole_wherever_it_appears():
    from proxy.logs import Secrets

    secrets = Secrets(["app-key-0123456789"])
    secrets.add("token-0123456789")
    secrets.add("token-0123456789-and-more")  # contains the one before: replaced whole
    secrets.add("short")  # too short to scrub safely: ordinary text would be mangled
    line = b"a app-key-0123456789 b token-0123456789-and-more c token-0123456789 d short"
    assert secrets.scrub(line) == b"a [redacted] b [redacted] c [redacted] d short"
    assert Secrets().scrub(line) == line


async def test_a_sets_token_stays_scrubbed_however_many_tenants_fetch(
    make_proxy, fake: FakeSobot, logs: CapturedLogs
):
    """Tokens and signatures are watched per owner: twenty tenants fetching (and refused: their
    appids are not the fake's) add forty signatures, and `default`'s token is still scrubbed."""
    tenants = tuple(
        TenantSettings(f"t{i}", f"appid-{i}", f"app-key-{i:02d}-0123456789abcdef", fake.url)
        for i in range(20)
    )
    proxy = await make_proxy(tenants=tenants, backoff=Backoff(first=60, cap=60))
    token = await tokens_of(proxy).get()
    for tenant in tenants:
        answer = await proxy.get("/api/echo", headers={"X-Sobot-Tenant": tenant.name})
        assert answer.status == 502  # Sobot refused the tenant's appid
    assert fake.stats.get_token_calls == 1 + 20
    get_logger().info("leak", detail=f"a bug logs {token.value} and {tenants[0].app_key}")
    [leak] = logs.events("leak")
    assert leak["detail"] == "a bug logs [redacted] and [redacted]"


def test_the_scrubber_costs_little_per_line_and_per_token_with_thousands_of_secrets():
    """2,000 keys and 2,000 sets' tokens: built once, a token added without rebuilding the keys,
    a line searched in one pass (one regular expression alternating them took about 0.4 ms a
    line and 30 ms at every add; the bounds leave room for a slow, busy machine)."""
    keys = [f"app-key-{i:06d}-0123456789abcdef" for i in range(2000)]
    owners = [_Owner() for _ in range(2000)]
    tokens = [f"token-{i:06d}-0123456789abcdef" for i in range(2000)]
    line = b'{"event":"request","path":"/api/ws/5/ticket/list","status":200,"tenant":"t1"}' * 3
    secrets = Secrets()
    started = time.perf_counter()
    secrets.add_lasting(keys)
    for owner, token in zip(owners, tokens, strict=True):
        secrets.add(token, owner=owner)
    built = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(2000):
        assert secrets.scrub(line) == line
    scrubbed = time.perf_counter() - started
    assert built < 2.0
    assert scrubbed < 0.2  # 100 us a line at most
    quoting = f"{keys[1234]} {tokens[0]} {tokens[-1]}".encode()
    assert secrets.scrub(quoting) == b"[redacted] [redacted] [redacted]"


def test_an_owners_last_two_values_stay_scrubbed_whatever_others_add():
    secrets = Secrets()
    owner = _Owner()
    for n in range(5):
        secrets.add(f"token-{n}-0123456789", owner=owner)
    for i in range(100):  # others come and go
        secrets.add(f"other-{i}-0123456789", owner=_Owner())
    line = b" ".join(f"token-{n}-0123456789".encode() for n in range(5))
    # The owner's current token and the one before it, however many others were added since.
    assert secrets.scrub(line).endswith(b" [redacted] [redacted]")


class _Owner:
    """Something that owns short-lived secrets (a token manager, a token source)."""


async def test_log_lines_are_stamped_in_iso_8601_utc_with_microseconds(logs: CapturedLogs):
    import datetime

    from proxy.logs import get_logger

    before = datetime.datetime.now(datetime.UTC)
    get_logger().info("stamped")
    [event] = logs.events("stamped")
    stamp = datetime.datetime.strptime(event["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    stamp = stamp.replace(tzinfo=datetime.UTC)
    assert before - datetime.timedelta(seconds=1) <= stamp <= datetime.datetime.now(datetime.UTC)


async def test_no_v6_secret_jwt_or_sign_reaches_a_log_line_or_an_error_answer(
    make_proxy, logs: CapturedLogs, monkeypatch
):
    """The V6 app_secret, every JWT and every V6 sign, whatever happens on a V6 route and at
    the local /tokens/company. Only a client that signs correctly gets the JWT, in that answer."""
    v6_appid, v6_secret = "secrets-v6-appid", "secrets-v6-secret-0123456789"
    fake = FakeSobot(APPID, APP_KEY, v6_appid=v6_appid, v6_secret=v6_secret)
    await fake.start()
    started_ms = int(time.time() * 1000)
    proxy = await make_proxy(
        base_url=fake.url,
        credentials=(CredentialSettings("callcenter", "v6", v6_appid, v6_secret),),
        routes=(RouteSettings("/callservice/", None, "callcenter"),),
        backoff=Backoff(first=0, cap=0),  # every failure is retried
    )
    answers: list[bytes] = []
    granted: list[bytes] = []

    async def call(method: str, path: str, **kwargs) -> None:
        response = await proxy.request(method, path, **kwargs)
        answers.append(await response.read())

    def token_request(secret: str = v6_secret, appid: str = v6_appid) -> dict[str, str]:
        now = str(int(time.time() * 1000))
        sign = v6.make_sign(appid, now, secret)
        return {"responseType": "token", "appId": appid, "currentTime": now, "sign": sign}

    await call("GET", "/callservice/v6/agents", headers={"Authorization": "Bearer clients-own"})
    fake.expire_token("v6")  # a 401, a refresh and a replay
    await call("POST", "/callservice/v6/calls", data=b'{"callee": "1"}')
    fake.script({"code": 401, "message": "expired"}, times=2, status=401)  # a replay that fails
    await call("GET", "/callservice/v6/agents")
    for claim in (token_request("wrong-secret"), token_request(appid="other"), {"appId": 1}):
        await call("POST", "/tokens/company", json=claim)
    for mode in ("401", "malformed", "http500", "disconnect"):  # /tokens/company failures
        fake.fail_get_token(mode, times=-1, kind="v6")
        fake.expire_token("v6")
        await call("GET", "/callservice/v6/agents")
        await call("POST", "/tokens/company", json=token_request())
        await call("GET", "/readyz")
        fake.fail_get_token(mode, times=0, kind="v6")
    await call("GET", "/callservice/v6/agents")
    jwt = fake.current_v6_token

    async def crash(*_args, **_kwargs):  # a crash in a handler, naming the secrets
        raise RuntimeError(f"{v6_secret} {jwt}")

    with monkeypatch.context() as patched:
        patched.setattr("proxy.server.forward.Forwarder.forward", crash)
        await call("GET", "/callservice/v6/agents")
    await call("GET", "/readyz")
    await call("GET", "/nowhere")
    answer = await proxy.post("/tokens/company", json=token_request())
    granted.append(await answer.read())
    ended_ms = int(time.time() * 1000)
    await fake.stop()

    assert len(fake.issued_v6_tokens) >= 4  # the first, the refreshes, the one after failures
    assert jwt is not None
    assert jwt.encode() in granted[0]  # the one answer that carries it
    assert logs.events("internal_error")
    output = logs.raw
    assert b'"kind":"v6"' in output  # the token calls were logged
    for secret in (v6_secret, *fake.issued_v6_tokens):
        assert secret.encode() not in output
        for answer in answers:
            assert secret.encode() not in answer
    # Every sign made in the test's time, by the proxy or its clients: none was written.
    signs = {
        v6.make_sign(v6_appid, str(ms), v6_secret)
        for ms in range(started_ms - 2000, ended_ms + 2000)
    }
    written = b"\n".join([output, *answers, *granted]).decode()
    assert signs.isdisjoint(HEX32.findall(written))


def test_a_percent_encoded_password_in_the_store_url_is_hidden_as_redis_py_sends_it(
    settings: Settings,
):
    """redis-py sends the password decoded: the logs hide it in that form as well."""
    store = "redis://:p%40ss%2Fword-0123456789@127.0.0.1:6379/0"
    secrets = Secrets()
    make_app(dataclasses.replace(settings, token_store=store), secrets=secrets)
    line = b"AUTH p@ss/word-0123456789 and p%40ss%2Fword-0123456789"
    assert secrets.scrub(line) == b"AUTH [redacted] and [redacted]"
