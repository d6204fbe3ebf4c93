"""`sobot-proxy check`, run as the real command: settings with their sources, problems, --online."""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
import time
from dataclasses import dataclass

import pytest

from proxy.config.settings import OPTIONS, SECRETS, Settings
from proxy.logs import Secrets, get_logger
from proxy.sobot.v5 import V5Credential
from proxy.testing.fake_sobot import FakeSobot
from proxy.tokens.source import token_client, token_source
from proxy.tokens.store import SharedRedis, StoredToken
from tests.conftest import APP_KEY, APPID, lying_peer
from tests.processes import EXIT_TIMEOUT, HEX32, command_env, routes_config, run_command

PREFIX = "sobot-proxy: configuration error: "
PROBE = "/api/ws/5/ticket/list?page=1"
CLIENT_KEY = "check-client-key-0123456789"
STORE_PASSWORD = "check-redis-password-0123"
NOWHERE = "http://127.0.0.1:9"  # nothing listens there


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def setting(self, name: str) -> str:
        """The line for setting `name`, without its name."""
        lines = [line.split(None, 1) for line in self.stdout.splitlines() if line.startswith("  ")]
        found = [rest for first, rest in lines if first == name]
        assert len(found) == 1, (name, self.stdout)
        return found[0]


def check(tmp_path, *args: str, **env: str) -> Result:
    """Run `sobot-proxy check` with exactly this environment (and nothing else SOBOT_*)."""
    result = run_command("check", *args, cwd=tmp_path, env=command_env(**env))
    return Result(result.returncode, result.stdout, result.stderr)


async def check_async(tmp_path, *args: str, **env: str) -> Result:
    """The same, without blocking the event loop an in-process fake Sobot answers on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "check",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=command_env(**env),
        cwd=tmp_path,
    )
    try:
        async with asyncio.timeout(EXIT_TIMEOUT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


def assert_no_secret(result: Result, *secrets: str) -> None:
    for secret in (APP_KEY, CLIENT_KEY, STORE_PASSWORD, *secrets):
        assert secret not in result.output
    assert HEX32.search(result.output) is None, result.output  # no token, no sign


# --- offline: the settings in force -------------------------------------------------------------


def test_a_valid_configuration_lists_every_setting_with_its_value_and_source(tmp_path):
    key_file = tmp_path / "app_key"
    key_file.write_text(APP_KEY + "\n")
    result = check(
        tmp_path,
        "--allow-paths",
        "/api/5/user/",
        SOBOT_APPID=APPID,
        SOBOT_APP_KEY_FILE=str(key_file),
        SOBOT_REGION="us",
        SOBOT_PROXY_CLIENT_KEYS=CLIENT_KEY,
    )
    assert result.status == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("sobot-proxy check: the configuration is valid")
    assert "flag > env > config file > default" in result.stdout.splitlines()[0]
    names = {o.name for o in OPTIONS} | {s.name for s in SECRETS} | {"config"}
    for name in names:
        result.setting(name)  # exactly one line each
    assert re.fullmatch(rf"{APPID}\s+env SOBOT_APPID", result.setting("appid"))
    assert re.fullmatch(
        rf"set \(read from {re.escape(str(key_file))}\)\s+env SOBOT_APP_KEY_FILE",
        result.setting("app_key"),
    )
    assert re.fullmatch(
        r"us \(https://us\.sobot\.com\)\s+env SOBOT_REGION", result.setting("region")
    )
    assert re.fullmatch(
        r"https://us\.sobot\.com\s+env SOBOT_REGION \(the region's URL\)",
        result.setting("base_url"),
    )
    assert re.fullmatch(r"8080\s+default", result.setting("port"))
    assert re.fullmatch(r"/api/5/user/\s+flag --allow-paths", result.setting("allow_paths"))
    assert re.fullmatch(r"every method\s+default", result.setting("allow_methods"))
    assert re.fullmatch(r"64MiB \(67108864 bytes\)\s+default", result.setting("max_body"))
    assert re.fullmatch(r"25 s\s+default", result.setting("shutdown_grace"))
    assert re.fullmatch(r"1 key set\s+env SOBOT_PROXY_CLIENT_KEYS", result.setting("client_keys"))
    assert re.fullmatch(r"memory\s+default", result.setting("token_store"))
    assert re.fullmatch(r"not set\s+default", result.setting("token_store_password"))
    assert re.fullmatch(r"none\s+default", result.setting("config"))
    assert_no_secret(result)


# (flag, environment, TOML file) present; the port and source the check must show.
LAYERS = [
    pytest.param(
        True, True, True, "1111", "flag --port", ["env SOBOT_PROXY_PORT", "toml"], id="flag"
    ),
    pytest.param(False, True, True, "2222", "env SOBOT_PROXY_PORT", ["toml"], id="env"),
    pytest.param(False, False, True, "3333", "config file {toml}: port", [], id="toml"),
    pytest.param(False, False, False, "8080", "default", [], id="default"),
]


@pytest.mark.parametrize(("flag", "env", "toml", "port", "source", "overridden"), LAYERS)
def test_flag_beats_env_beats_toml_beats_default_and_says_what_it_overrides(
    tmp_path, flag, env, toml, port, source, overridden
):
    config = tmp_path / "proxy.toml"
    config.write_text("port = 3333\n" if toml else "")
    toml_source = f"config file {config}: port"
    result = check(
        tmp_path,
        "--config",
        str(config),
        *(["--port", "1111"] if flag else []),
        SOBOT_APPID=APPID,
        SOBOT_APP_KEY=APP_KEY,
        SOBOT_REGION="sg",
        **({"SOBOT_PROXY_PORT": "2222"} if env else {}),
    )
    assert result.status == 0, result.stderr
    line = result.setting("port")
    value, where = line.split(None, 1)
    assert value == port
    assert where.startswith(source.replace("{toml}", str(config)))
    expected = [toml_source if layer == "toml" else layer for layer in overridden]
    if expected:
        assert where.endswith(f"(overrides {', '.join(expected)})"), where
    else:
        assert "overrides" not in where
    assert re.fullmatch(rf"{re.escape(str(config))}\s+flag --config", result.setting("config"))


def test_an_app_key_from_the_config_file_is_shown_as_set_with_its_file(tmp_path):
    (tmp_path / "key").write_text(APP_KEY)
    config = tmp_path / "proxy.toml"
    config.write_text('appid = "toml-appid"\nregion = "sg"\napp_key_file = "key"\n')
    result = check(tmp_path, SOBOT_PROXY_CONFIG=str(config))
    assert result.status == 0, result.stderr
    assert re.fullmatch(
        rf"toml-appid\s+config file {re.escape(str(config))}: appid", result.setting("appid")
    )
    assert re.fullmatch(
        rf"set \(read from {re.escape(str(tmp_path / 'key'))}\)\s+config file "
        rf"{re.escape(str(config))}: app_key_file",
        result.setting("app_key"),
    )
    assert re.fullmatch(
        rf"{re.escape(str(config))}\s+env SOBOT_PROXY_CONFIG", result.setting("config")
    )
    assert_no_secret(result)


def test_allowed_but_doubtful_settings_are_warned_about(tmp_path):
    result = check(
        tmp_path,
        "--host",
        "0.0.0.0",
        "--allow-unauthenticated",
        SOBOT_APPID=APPID,
        SOBOT_APP_KEY=APP_KEY,
        SOBOT_REGION="sg",
        SOBOT_BASE_URL="https://gateway.example.com",
        SOBOT_TOKEN_STORE=f"redis://:{STORE_PASSWORD}@redis.example.com:6379/0",
        SOBOT_TOKEN_STORE_PASSWORD="another-password-0123",
    )
    assert result.status == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == 3, result.stderr
    assert warnings[0].startswith("sobot-proxy: warning: listening on 0.0.0.0 without client keys")
    assert "env SOBOT_TOKEN_STORE_PASSWORD is not used" in warnings[1]
    assert "the region (env SOBOT_REGION) is not used" in warnings[2]
    assert re.fullmatch(r"sg \(not used\)\s+env SOBOT_REGION", result.setting("region"))
    assert re.fullmatch(
        r"redis://:\*\*\*@redis\.example\.com:6379/0\s+env SOBOT_TOKEN_STORE",
        result.setting("token_store"),
    )
    assert re.fullmatch(
        r"in the URL \(masked\)\s+env SOBOT_TOKEN_STORE", result.setting("token_store_password")
    )
    assert_no_secret(result, "another-password-0123")


# --- offline: problems --------------------------------------------------------------------------

CONFIGURED = {"SOBOT_APPID": APPID, "SOBOT_APP_KEY": APP_KEY, "SOBOT_REGION": "sg"}

# (arguments, environment, the start of each problem line); {tmp} is the test's directory.
PROBLEMS = [
    pytest.param(
        [],
        {},
        ["appid is required", "app_key is required", "no upstream: set SOBOT_REGION"],
        id="nothing-configured",
    ),
    pytest.param(
        ["--port", "70000"], CONFIGURED, ["--port: '70000' is not a port number"], id="bad-flag"
    ),
    pytest.param(
        [],
        {**CONFIGURED, "SOBOT_UPSTREAM_TIMEOUT": "soon"},
        ["SOBOT_UPSTREAM_TIMEOUT: 'soon' is not a positive number of seconds"],
        id="bad-env",
    ),
    pytest.param(
        ["--config", "{tmp}/proxy.toml"],
        CONFIGURED,
        ["config file {tmp}/proxy.toml: unknown setting 'colour'"],
        id="unknown-toml-key",
    ),
    pytest.param(
        [],
        {**CONFIGURED, "SOBOT_APP_KEY": "", "SOBOT_APP_KEY_FILE": "{tmp}/missing"},
        ["SOBOT_APP_KEY_FILE: cannot read {tmp}/missing (No such file or directory)"],
        id="unreadable-secret-file",
    ),
    pytest.param(
        [],
        {**CONFIGURED, "SOBOT_TOKEN_STORE": f"memcached://:{STORE_PASSWORD}@h/0"},
        ["SOBOT_TOKEN_STORE: is not memory or a redis://host:port/db or rediss:// URL"],
        id="bad-store-url",
    ),
    pytest.param(
        ["--host", "0.0.0.0"],
        CONFIGURED,
        ["listening on 0.0.0.0 lets anyone who reaches it act as your Sobot company"],
        id="unsafe-combination",
    ),
]


@pytest.mark.parametrize(("args", "env", "problems"), PROBLEMS)
def test_each_problem_is_one_line_as_serve_says_it_and_exit_2(tmp_path, args, env, problems):
    (tmp_path / "proxy.toml").write_text('colour = "blue"\n')
    tmp = str(tmp_path)
    args = [arg.replace("{tmp}", tmp) for arg in args]
    env = {name: value.replace("{tmp}", tmp) for name, value in env.items()}
    result = check(tmp_path, *args, **env)
    assert result.status == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == len(problems), result.stderr
    for line, problem in zip(lines, problems, strict=True):
        assert line.startswith(PREFIX + problem.replace("{tmp}", tmp)), line
    # The same lines as serve gives for the same configuration.
    served = run_command(*args, cwd=tmp_path, env=command_env(**env))
    assert (served.returncode, served.stderr) == (2, result.stderr)
    assert_no_secret(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--online", "--probe-path", "/api/get_token?appid=x"], "is a token request"),
        (["--online", "--probe-path", "/tokens/company"], "is a token request"),
        (["--online", "--probe-path", "/api/../admin"], "dot segments"),
        (["--online", "--probe-path", "/healthz"], "/healthz: no route serves it"),
        (["--probe-path", PROBE], "--rotate-token and --probe-path go with check --online"),
        (["--rotate-token"], "--rotate-token and --probe-path go with check --online"),
        (["--app-key", APP_KEY], "unrecognized arguments: --app-key"),
    ],
)
def test_usage_mistakes_exit_2(tmp_path, args, message):
    result = check(tmp_path, *args, **CONFIGURED)
    assert result.status == 2
    assert message in result.stderr
    assert APP_KEY not in result.output


# --- online -------------------------------------------------------------------------------------


def online_env(fake: FakeSobot, **more: str) -> dict[str, str]:
    return {"SOBOT_APPID": APPID, "SOBOT_APP_KEY": APP_KEY, "SOBOT_BASE_URL": fake.url, **more}


def online_lines(result: Result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("online: ")]


async def test_online_without_a_shared_store_warns_and_needs_rotate_token(tmp_path, fake):
    result = await check_async(tmp_path, "--online", **online_env(fake))
    assert result.status == 2, result.output
    assert "issues a NEW token and invalidates the one in use" in result.stderr
    assert "900002" in result.stderr
    assert "add --rotate-token" in result.stderr
    assert fake.stats.get_token_calls == 0


async def test_online_proves_the_credentials_with_get_token_when_told_to(tmp_path, fake):
    result = await check_async(
        tmp_path, "--online", "--rotate-token", "--probe-path", PROBE, **online_env(fake)
    )
    assert result.status == 0, result.output
    assert "issues a NEW token and invalidates the one in use" in result.stderr
    assert online_lines(result) == [
        f"online: get_token succeeded at {fake.url} for appid {APPID}: a token valid for "
        "86400 s was issued (not shown)",
        f"online: Sobot accepted the new token: GET {PROBE} answered 000000 (success)",
    ]
    assert fake.stats.get_token_calls == 1
    assert [(r.path, r.query, r.token_state) for r in fake.received] == [
        ("/api/ws/5/ticket/list", "page=1", "valid")
    ]
    assert_no_secret(result, *fake.issued_tokens)


async def test_the_probe_path_finds_its_route_as_the_proxy_folds_it(tmp_path, fake):
    """`//api/...` goes along the `/api/` route in the proxy: the probe proves that route's set."""
    result = await check_async(
        tmp_path, "--online", "--rotate-token", "--probe-path", "/" + PROBE, **online_env(fake)
    )
    assert result.status == 0, result.output
    assert [(r.path, r.token_state) for r in fake.received] == [("/api/ws/5/ticket/list", "valid")]


async def test_online_with_a_wrong_app_key_exits_1_with_sobots_code(tmp_path, fake):
    env = online_env(fake, SOBOT_APP_KEY="not-the-app-key-0123")
    result = await check_async(tmp_path, "--online", "--rotate-token", **env)
    assert result.status == 1, result.output
    assert online_lines(result) == [
        "online: Sobot's get_token answered 900003 (signature error): signature error"
    ]
    assert fake.stats.tokens_issued == 0
    assert_no_secret(result, "not-the-app-key-0123")


async def test_online_with_an_unreachable_upstream_exits_1(tmp_path):
    env = {"SOBOT_APPID": APPID, "SOBOT_APP_KEY": APP_KEY, "SOBOT_BASE_URL": NOWHERE}
    result = await check_async(tmp_path, "--online", "--rotate-token", **env)
    assert result.status == 1, result.output
    assert online_lines(result) == [
        "online: could not reach Sobot's get_token "
        "(cannot connect to 127.0.0.1:9: Connection refused)"
    ]
    assert_no_secret(result)


async def store_a_token(fake: FakeSobot, redis_url: str) -> StoredToken:
    """What a running replica does: fetch a token from the fake and store it in Redis."""
    redis = SharedRedis(redis_url, password=None, log=get_logger())
    store = redis.store(prefix=f"sobot-proxy:{APPID}:", lease=5)
    settings = Settings(appid=APPID, app_key=APP_KEY, base_url=fake.url)
    client = token_client(settings, ssl.create_default_context())
    try:
        source = token_source(
            V5Credential(APPID, APP_KEY),
            fake.url,
            settings,
            client,
            log=get_logger(),
            secrets=Secrets(),
        )
        issued = await source.fetch()
    finally:
        await client.close()
    token = StoredToken(issued.value, time.time(), issued.lifetime)
    try:
        await store.save(token)
    finally:
        await redis.close()
    return token


async def stored_token(redis_url: str) -> StoredToken | None:
    redis = SharedRedis(redis_url, password=None, log=get_logger())
    store = redis.store(prefix=f"sobot-proxy:{APPID}:", lease=5)
    try:
        return await store.load()
    finally:
        await redis.close()


async def test_online_with_a_shared_token_in_redis_never_calls_get_token(
    tmp_path, fake, redis_server
):
    token = await store_a_token(fake, redis_server.url)
    assert fake.stats.get_token_calls == 1
    env = online_env(fake, SOBOT_TOKEN_STORE=redis_server.url)
    for args in (["--online", "--probe-path", PROBE], ["--online", "--rotate-token"]):
        result = await check_async(tmp_path, *args, **env)
        assert result.status == 0, result.output
        assert result.stderr == ""  # no rotation, no warning
        lines = online_lines(result)
        assert lines[0].startswith(
            f"online: the token store {redis_server.url} holds a token for the appid, issued "
        )
        assert lines[0].endswith(
            "get_token not called (it would rotate the token every replica holds)"
        )
        assert_no_secret(result, token.value)
    assert lines[1:] == [
        "online: --rotate-token not needed: get_token was not called",
        "online: the shared token was not sent to Sobot: the protocol documents no read-only API "
        "to prove it with; name one your application calls with --probe-path",
    ]
    assert fake.stats.get_token_calls == 1  # still only the replica's
    assert [r.token_state for r in fake.received] == ["valid"]  # the probe, with that token
    assert await stored_token(redis_server.url) == token


async def test_online_with_a_rejected_shared_token_exits_1_without_renewing_it(
    tmp_path, fake, redis_server
):
    await store_a_token(fake, redis_server.url)
    fake.expire_token()
    env = online_env(fake, SOBOT_TOKEN_STORE=redis_server.url)
    result = await check_async(tmp_path, "--online", "--probe-path", PROBE, **env)
    assert result.status == 1, result.output
    assert online_lines(result)[1] == (
        f"online: Sobot rejected the shared token on GET {PROBE}: 900002 (token has expired)"
    )
    assert fake.stats.get_token_calls == 1


async def test_online_with_an_empty_store_fetches_under_the_lock_and_stores_the_token(
    tmp_path, fake, redis_server
):
    env = online_env(fake, SOBOT_TOKEN_STORE=redis_server.url)
    refused = await check_async(tmp_path, "--online", **env)
    assert refused.status == 2, refused.output
    assert "add --rotate-token" in refused.stderr
    assert fake.stats.get_token_calls == 0

    result = await check_async(tmp_path, "--online", "--rotate-token", **env)
    assert result.status == 0, result.output
    assert online_lines(result) == [
        f"online: the token store {redis_server.url} holds no token for the appid",
        f"online: get_token succeeded at {fake.url} for appid {APPID}: a token valid for "
        "86400 s was issued (not shown)",
        "online: the new token was stored: running replicas adopt it",
        "online: the credentials work",
    ]
    assert fake.stats.get_token_calls == 1
    stored = await stored_token(redis_server.url)
    assert stored is not None
    assert stored.value == fake.current_token
    assert_no_secret(result, stored.value)


async def test_online_with_an_unreachable_store_exits_1(tmp_path, fake):
    env = online_env(fake, SOBOT_TOKEN_STORE="redis://127.0.0.1:9/0")
    result = await check_async(tmp_path, "--online", "--rotate-token", **env)
    assert result.status == 1, result.output
    assert online_lines(result)[0].startswith(
        "online: the token store redis://127.0.0.1:9/0 cannot be reached ("
    )
    assert fake.stats.get_token_calls == 0


async def test_online_with_something_else_on_the_store_port_exits_1(tmp_path, fake):
    """Not Redis (a peer that answers +OK to everything): as unreachable, not a traceback."""
    async with lying_peer(b"+OK\r\n") as peer:
        env = online_env(fake, SOBOT_TOKEN_STORE=peer.url)
        result = await check_async(tmp_path, "--online", "--rotate-token", **env)
    assert result.status == 1, result.output
    assert online_lines(result) == [
        f"online: the token store {peer.url} cannot be reached (AttributeError)"
    ]
    assert "Traceback" not in result.output
    assert fake.stats.get_token_calls == 0


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret-pass@r:6379/0", "redis://:***@r:6379/0"),
        ("redis://user:s3cret-pass@r:6379/0", "redis://user:***@r:6379/0"),
        (
            "redis://r:6379/0?password=s3cret-pass&ssl_cert_reqs=none",
            "redis://r:6379/0?password=***&ssl_cert_reqs=none",
        ),
        ("redis://r:6379/0", "redis://r:6379/0"),
    ],
)
def test_a_redis_password_is_masked_wherever_redis_py_would_take_it(url, shown):
    from proxy.cli.check import mask_store_url

    assert mask_store_url(url) == shown


# --- routes and credential sets -----------------------------------------------------------------

V6_APPID = "check-v6-appid"
V6_SECRET = "check-v6-secret-0123456789"
SECOND_HOST = "https://api-c.soboten.com"


def routes_file(tmp_path, *, v6_secret: str = V6_SECRET) -> str:
    """A TOML file with a V6 set on /callservice/, the AI agent on a second host and a route
    that injects nothing; its secret in a file beside it."""
    more = f"""
[[routes]]
prefix = "/text/ai-agent-open/"
upstream = "{SECOND_HOST}"

[[routes]]
prefix = "/signed/"
credentials = "none"
"""
    return str(routes_config(tmp_path, v6_appid=V6_APPID, v6_secret=v6_secret, more=more))


@pytest.fixture
async def v6_fake():
    sobot = FakeSobot(APPID, APP_KEY, v6_appid=V6_APPID, v6_secret=V6_SECRET)
    await sobot.start()
    yield sobot
    await sobot.stop()


def test_check_prints_the_route_table_and_the_credential_sets(tmp_path):
    result = check(tmp_path, "--config", routes_file(tmp_path), **CONFIGURED)
    assert result.status == 0, result.output
    lines = result.stdout.splitlines()
    table = lines[lines.index("routes (longest prefix first):") :]
    sg = "https://sg.sobot.io"
    assert table == [
        "routes (longest prefix first):",
        f"  /text/ai-agent-open/  -> {SECOND_HOST}  credentials: default",
        f"  /chat-facebook/api/   -> {sg}  credentials: default",
        f"  /chat-third/api/      -> {sg}  credentials: default",
        f"  /comm-open/api/       -> {sg}  credentials: default",
        f"  /callservice/         -> {sg}  credentials: callcenter",
        f"  /signed/              -> {sg}  credentials: none (nothing injected)",
        f"  /api/                 -> {sg}  credentials: default",
        "credential sets:",
        f"  default     kind v5, appid {APPID}, secret set, token from {sg}",
        f"  callcenter  kind v6, appid {V6_APPID}, secret set, token from {sg}",
    ]
    assert re.fullmatch(r"every path a route serves\s+default", result.setting("allow_paths"))
    assert_no_secret(result, V6_SECRET)


def v6_issued(fake: FakeSobot) -> str:
    """The pattern of the line saying the V6 set's token call succeeded (its lifetime is read
    from the JWT's exp, to the millisecond)."""
    return (
        rf"online: \[callcenter\] /tokens/company succeeded at {re.escape(fake.url)} for appid "
        rf"{V6_APPID}: a token valid for 8640\d(\.\d+)? s was issued \(not shown\)"
    )


async def online_check(tmp_path, fake: FakeSobot, *args: str, v6_secret: str = V6_SECRET):
    config = routes_file(tmp_path, v6_secret=v6_secret)
    return await check_async(
        tmp_path, "--config", config, "--online", "--rotate-token", *args, **online_env(fake)
    )


async def test_online_proves_every_credential_set(tmp_path, v6_fake):
    result = await online_check(tmp_path, v6_fake)
    assert result.status == 0, result.output
    default_issued, default_works, v6_line, v6_works = online_lines(result)
    assert default_issued == (
        f"online: get_token succeeded at {v6_fake.url} for appid {APPID}: a token valid for "
        "86400 s was issued (not shown)"
    )
    assert default_works == "online: the credentials work"
    assert re.fullmatch(v6_issued(v6_fake), v6_line), v6_line
    assert v6_works == "online: [callcenter] the credentials work"
    # Each rotation is warned about, the V6 one under the set's name.
    warned = result.stderr.splitlines()
    assert [line.startswith("sobot-proxy: warning: [callcenter] ") for line in warned] == [
        False,
        True,
    ]
    assert (v6_fake.stats.get_token_calls, v6_fake.stats.v6_token_calls) == (1, 1)
    assert_no_secret(result, V6_SECRET, *v6_fake.issued_tokens, *v6_fake.issued_v6_tokens)


async def test_online_with_a_wrong_v6_secret_exits_1_though_the_default_set_works(
    tmp_path, v6_fake
):
    wrong = "not-the-v6-secret-0123"
    result = await online_check(tmp_path, v6_fake, v6_secret=wrong)
    assert result.status == 1, result.output
    assert online_lines(result)[1:] == [
        "online: the credentials work",
        "online: [callcenter] Sobot's tokens/company answered 401002 (signature error): "
        "signature error",
    ]
    assert (v6_fake.stats.tokens_issued, v6_fake.stats.v6_tokens_issued) == (1, 0)
    assert_no_secret(result, wrong, V6_SECRET, *v6_fake.issued_tokens)


async def test_online_proves_the_v6_set_with_its_jwt_on_a_probe_path(tmp_path, v6_fake):
    result = await online_check(tmp_path, v6_fake, "--probe-path", "/callservice/v6/x?page=1")
    assert result.status == 0, result.output
    lines = online_lines(result)
    assert lines[1] == "online: the credentials work"  # the probe is not the default set's
    assert re.fullmatch(v6_issued(v6_fake), lines[2]), lines[2]
    assert lines[3:] == [
        "online: [callcenter] Sobot accepted the new token: GET /callservice/v6/x?page=1 "
        "answered HTTP 200"
    ]
    [probe] = v6_fake.received
    assert (probe.path, probe.query, probe.kind) == ("/callservice/v6/x", "page=1", "v6")
    assert (probe.token_state, probe.authorization_form) == ("valid", "bearer")
    assert_no_secret(result, V6_SECRET, *v6_fake.issued_v6_tokens)


async def test_online_with_a_v6_probe_answered_401_exits_1(tmp_path, v6_fake):
    v6_fake.script({"code": 401, "message": "token is not valid"}, status=401)
    result = await online_check(tmp_path, v6_fake, "--probe-path", "/callservice/v6/x")
    assert result.status == 1, result.output
    assert online_lines(result)[3:] == [
        "online: [callcenter] Sobot rejected the new token on GET /callservice/v6/x: HTTP 401"
    ]


# --- online, with tenants -----------------------------------------------------------------------

ACME_APPID = "check-acme-appid"
ACME_KEY = "check-acme-app-key-0123"
ACME_V6_APPID = "check-acme-v6-appid"
ACME_V6_SECRET = "check-acme-v6-secret-0123"


@pytest.fixture
async def acme_fake():
    """The tenant acme's Sobot: another host, its own appid and keys."""
    sobot = FakeSobot(ACME_APPID, ACME_KEY, v6_appid=ACME_V6_APPID, v6_secret=ACME_V6_SECRET)
    await sobot.start()
    yield sobot
    await sobot.stop()


def tenants_file(tmp_path, acme: FakeSobot, *, acme_key: str = ACME_KEY) -> str:
    """The tenant acme at its own host, its v6 set `callcenter` in a file beside."""
    (tmp_path / "acme.key").write_text(acme_key + "\n")
    (tmp_path / "acme_v6.secret").write_text(ACME_V6_SECRET + "\n")
    config = tmp_path / "tenants.toml"
    config.write_text(
        f"""[tenants.acme]
appid = "{ACME_APPID}"
app_key_file = "acme.key"
base_url = "{acme.url}"

[tenants.acme.credentials.callcenter]
kind = "v6"
appid = "{ACME_V6_APPID}"
app_key_file = "acme_v6.secret"
"""
    )
    return str(config)


async def test_online_proves_every_tenants_sets_one_line_each(tmp_path, fake, acme_fake):
    config = tenants_file(tmp_path, acme_fake)
    result = await check_async(
        tmp_path, "--config", config, "--online", "--rotate-token", **online_env(fake)
    )
    assert result.status == 0, result.output
    lines = online_lines(result)
    assert lines[:2] == [  # the tenant `default`, as without tenants
        f"online: get_token succeeded at {fake.url} for appid {APPID}: a token valid for "
        "86400 s was issued (not shown)",
        "online: the credentials work",
    ]
    assert lines[2] == (
        f"online: [acme/default] get_token succeeded at {acme_fake.url} for appid {ACME_APPID}: "
        "a token valid for 86400 s was issued (not shown); the credentials work"
    )
    assert re.fullmatch(
        rf"online: \[acme/callcenter\] /tokens/company succeeded at {re.escape(acme_fake.url)} "
        rf"for appid {ACME_V6_APPID}: a token valid for 8640\d(\.\d+)? s was issued "
        r"\(not shown\); the credentials work",
        lines[3],
    ), lines[3]
    assert len(lines) == 4
    # One rotation warning per set, a named tenant's on one line under its name.
    warned = result.stderr.splitlines()
    assert [line.split(" ")[2] for line in warned] == [
        "proving",
        "[acme/default]",
        "[acme/callcenter]",
    ]
    assert (fake.stats.get_token_calls, acme_fake.stats.get_token_calls) == (1, 1)
    assert acme_fake.stats.v6_token_calls == 1
    assert_no_secret(result, ACME_KEY, ACME_V6_SECRET, *acme_fake.issued_tokens)


async def test_online_names_the_tenant_and_set_refused_and_exits_1(tmp_path, fake, acme_fake):
    wrong = "not-the-acme-key-0123"
    config = tenants_file(tmp_path, acme_fake, acme_key=wrong)
    result = await check_async(
        tmp_path, "--config", config, "--online", "--rotate-token", **online_env(fake)
    )
    assert result.status == 1, result.output
    lines = online_lines(result)
    assert lines[1] == "online: the credentials work"  # the tenant `default` is fine
    assert lines[2] == (
        "online: [acme/default] Sobot's get_token answered 900003 (signature error): "
        "signature error"
    )
    assert lines[3].startswith("online: [acme/callcenter] /tokens/company succeeded at ")
    assert acme_fake.stats.tokens_issued == 0
    assert_no_secret(result, wrong, ACME_KEY, ACME_V6_SECRET, *fake.issued_tokens)


async def test_online_probes_each_tenant_at_its_own_upstream(tmp_path, fake, acme_fake):
    """A probe on a route to the main upstream goes to each tenant's own host, with its own
    token."""
    config = tenants_file(tmp_path, acme_fake)
    result = await check_async(
        tmp_path,
        "--config",
        config,
        "--online",
        "--rotate-token",
        "--probe-path",
        PROBE,
        **online_env(fake),
    )
    assert result.status == 0, result.output
    lines = online_lines(result)
    assert (
        lines[1] == f"online: Sobot accepted the new token: GET {PROBE} answered 000000 (success)"
    )
    assert lines[2].endswith(
        f"; Sobot accepted the new token: GET {PROBE} answered 000000 (success)"
    )
    assert lines[3].endswith("; the credentials work")  # the probe is not the v6 set's
    for sobot in (fake, acme_fake):
        assert [(r.path, r.token_state) for r in sobot.received] == [
            ("/api/ws/5/ticket/list", "valid")
        ]
