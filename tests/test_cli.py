"""The real `sobot-proxy` command in a subprocess: configuration errors, serving, logs, signals."""

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from proxy.sobot.v5 import make_sign
from proxy.sobot.v6 import V6Credential
from tests.processes import (
    HEX32,
    HTTP_TIMEOUT,
    OPENER,
    Running,
    command_env,
    http_get,
    json_object,
    run_command,
    running,
    wait_until_ready,
)

DEMO_APP_KEY = "demo-app-key"
PREFIX = "sobot-proxy: configuration error: "


def assert_no_secret(command: Running, *secrets: str) -> None:
    for secret in (DEMO_APP_KEY, *secrets):
        assert secret not in command.output
    assert HEX32.search(command.output) is None, command.output


# --- configuration errors -------------------------------------------------------------------

APP_KEY = "cli-test-app-key"
CONFIGURED = {"SOBOT_APPID": "A", "SOBOT_APP_KEY": APP_KEY, "SOBOT_REGION": "sg"}
TOML = 'appid = "A"\nregion = "us"\ncolour = "blue"\n'

# (arguments, environment, the start of each problem line in order); {tmp} is the directory
# holding proxy.toml (TOML above) and nothing else.
CONFIG_ERRORS = [
    pytest.param(
        [],
        {},
        [
            "appid is required: set SOBOT_APPID or --appid",
            "app_key is required: set SOBOT_APP_KEY or SOBOT_APP_KEY_FILE",
            "no upstream: set SOBOT_REGION (sg, us, cn, cn-soboten) or SOBOT_BASE_URL "
            "(--region / --base-url)",
        ],
        id="nothing-configured",
    ),
    pytest.param(
        ["serve"],
        {},
        ["appid is required", "app_key is required", "no upstream"],
        id="nothing-configured-serve",
    ),
    pytest.param(
        ["--region", "mars"],
        {"SOBOT_APPID": "A", "SOBOT_APP_KEY": APP_KEY},
        ["--region: 'mars' is not one of sg, us, cn, cn-soboten"],
        id="unknown-region-flag",
    ),
    pytest.param(
        [],
        {**CONFIGURED, "SOBOT_REGION": "eu"},
        ["SOBOT_REGION: 'eu' is not one of sg, us, cn, cn-soboten"],
        id="unknown-region-env",
    ),
    pytest.param(
        ["serve", "--port", "70000"],
        CONFIGURED,
        ["--port: '70000' is not a port number (0-65535; 0 picks a free port)"],
        id="bad-port-flag",
    ),
    pytest.param(
        [],
        {**CONFIGURED, "SOBOT_PROXY_PORT": "abc"},
        ["SOBOT_PROXY_PORT: 'abc' is not a port number"],
        id="bad-port-env",
    ),
    pytest.param(
        ["--config", "{tmp}/proxy.toml"],
        {"SOBOT_APP_KEY": APP_KEY},
        ["config file {tmp}/proxy.toml: unknown setting 'colour' (known: "],
        id="unknown-toml-key",
    ),
    pytest.param(
        ["--config", "{tmp}/missing.toml"],
        CONFIGURED,
        ["config file {tmp}/missing.toml: cannot be read (No such file or directory)"],
        id="unreadable-config",
    ),
    pytest.param(
        [],
        {**CONFIGURED, "SOBOT_PROXY_CONFIG": "{tmp}"},
        ["config file {tmp}: cannot be read ("],
        id="unreadable-config-env",
    ),
    pytest.param(
        ["--port", "-1", "--region", "mars", "--upstream-timeout", "0"],
        {"SOBOT_APP_KEY": APP_KEY},
        [
            "appid is required",
            "--region: 'mars' is not one of sg, us, cn, cn-soboten",
            "--port: '-1' is not a port number",
            "--upstream-timeout: '0' is not a positive number of seconds",
        ],
        id="every-problem-at-once",
    ),
    pytest.param(
        ["--demo", "--port", "abc"],
        {},
        ["--port: 'abc' is not a port number"],
        id="demo-bad-port",
    ),
    pytest.param(
        ["--host", "0.0.0.0"],
        CONFIGURED,
        [
            "listening on 0.0.0.0 lets anyone who reaches it act as your Sobot company: set "
            "client keys (SOBOT_PROXY_CLIENT_KEYS or SOBOT_PROXY_CLIENT_KEYS_FILE)"
        ],
        id="public-listen-without-client-keys",
    ),
    pytest.param(
        [],
        {**CONFIGURED, "SOBOT_BASE_URL": "http://sobot.example.com"},
        ["the upstream http://sobot.example.com is plain http and not on this host"],
        id="insecure-upstream",
    ),
    pytest.param(
        [],
        {**CONFIGURED, "SOBOT_ALLOW_PATHS": "/api/5/user/,admin/"},
        ["SOBOT_ALLOW_PATHS: 'admin/' is not a path (it must start with /)"],
        id="allow-path-not-a-path",
    ),
]


@pytest.mark.parametrize(("args", "env", "problems"), CONFIG_ERRORS)
def test_configuration_error_exits_2_with_one_line_per_problem(tmp_path, args, env, problems):
    (tmp_path / "proxy.toml").write_text(TOML)
    tmp = str(tmp_path)
    args = [arg.replace("{tmp}", tmp) for arg in args]
    env = {name: value.replace("{tmp}", tmp) for name, value in env.items()}
    result = run_command(*args, cwd=tmp_path, env=command_env(**env))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == len(problems), result.stderr
    for line, problem in zip(lines, problems, strict=True):
        assert line.startswith(PREFIX + problem.replace("{tmp}", tmp))
    assert APP_KEY not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--app-key", "do-not-echo-me"],
        ["serve", "--app-key", "do-not-echo-me"],
        ["serve", "--app-key=do-not-echo-me"],
    ],
)
def test_app_key_has_no_flag_and_a_mistaken_one_is_not_echoed(tmp_path, args):
    result = run_command(*args, cwd=tmp_path, env=command_env(**CONFIGURED))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "unrecognized arguments: --app-key" in result.stderr
    assert "do-not-echo-me" not in result.stderr


# --- serving --------------------------------------------------------------------------------


def test_demo_serves_logs_only_json_and_stops_on_sigterm(tmp_path):
    with running("serve", "--demo", "--port", "0", cwd=tmp_path) as proxy:
        listening = proxy.wait_for_event("listening")
        assert listening["demo"] is True
        base = f"http://127.0.0.1:{listening['port']}"

        assert http_get(f"{base}/healthz") == (200, {"status": "alive"})
        assert wait_until_ready(base)["status"] == "ready"
        status, answer = http_get(f"{base}/api/anything?x=1")
        assert status == 200
        assert answer["ret_code"] == "000000"
        assert answer["item"]["path"] == "/api/anything"
        assert answer["item"]["query"] == "x=1"
        assert answer["item"]["token"]["state"] == "valid"
        request = proxy.wait_for_event("request")

        assert proxy.terminate() == 0

    events = [event for line in proxy.stdout if (event := json_object(line)) is not None]
    assert len(events) == len(proxy.stdout), proxy.stdout  # every line is a JSON object
    assert [e["event"] for e in events if e["event"] in ("stopping", "stopped")] == [
        "stopping",
        "stopped",
    ]
    assert proxy.stderr == []
    assert request["method"] == "GET"
    assert request["path"] == "/api/anything"
    assert request["status"] == 200
    assert request["ret_code"] == "000000"
    assert request["attempts"] == 1
    assert isinstance(request["duration_ms"], int | float)
    assert isinstance(request["upstream_ms"], int | float)
    for event in events:
        assert event.get("token", "[redacted]") == "[redacted]"
        assert event.get("app_key", "[redacted]") == "[redacted]"
    assert_no_secret(proxy)


def test_demo_shows_a_v5_and_a_v6_route(tmp_path):
    with running("serve", "--demo", "--port", "0", cwd=tmp_path) as proxy:
        base = f"http://127.0.0.1:{proxy.wait_for_event('listening')['port']}"
        ready = wait_until_ready(base)
        assert set(ready["credentials"]) == {"default", "callcenter"}
        assert ready["credentials"]["callcenter"]["kind"] == "v6"
        status, answer = http_get(f"{base}/callservice/v6/echo?x=1")
        assert status == 200
        assert answer["code"] == 200
        assert answer["data"]["path"] == "/callservice/v6/echo"
        assert answer["data"]["authorization_form"] == "bearer"
        assert http_get(f"{base}/api/echo")[1]["ret_code"] == "000000"
        started = proxy.wait_for_event("started")
        assert "/callservice/ -> " in " ".join(started["routes"])
        assert proxy.terminate() == 0
    assert_no_secret(proxy)


def test_serve_is_the_default_command(tmp_path):
    with running("--port", "0", "--demo", cwd=tmp_path) as proxy:
        listening = proxy.wait_for_event("listening")
        assert listening["demo"] is True
        assert http_get(f"http://127.0.0.1:{listening['port']}/healthz")[0] == 200
        assert proxy.terminate() == 0
    assert_no_secret(proxy)


def test_demo_ignores_credentials_in_the_environment(tmp_path):
    env = command_env(SOBOT_APPID="other", SOBOT_APP_KEY="other-key", SOBOT_REGION="mars")
    with running("--demo", "--port", "0", cwd=tmp_path, env=env) as proxy:
        base = f"http://127.0.0.1:{proxy.wait_for_event('listening')['port']}"
        assert wait_until_ready(base)["status"] == "ready"
        assert proxy.terminate() == 0
    assert_no_secret(proxy, "other-key")


def test_console_log_format_writes_lines_for_people(tmp_path):
    with running("--demo", "--port", "0", "--log-format", "console", cwd=tmp_path) as proxy:
        line = proxy.wait_for_line(lambda line: "listening" in line)
        port = re.search(r"\bport=(\d+)", line)
        assert port is not None, line
        base = f"http://127.0.0.1:{port[1]}"
        assert wait_until_ready(base)["status"] == "ready"
        assert http_get(f"{base}/api/console?y=2")[1]["ret_code"] == "000000"
        proxy.wait_for_line(lambda line: "request" in line and "/api/console" in line)
        assert proxy.terminate() == 0
    assert proxy.stdout
    assert all(json_object(line) is None for line in proxy.stdout), proxy.stdout
    assert_no_secret(proxy)


def test_fake_sobot_checks_the_sign_and_stops_on_sigterm(tmp_path):
    with running(
        "fake-sobot", "--port", "0", "--appid", "A", "--app-key", "K", cwd=tmp_path
    ) as fake:
        listening = fake.wait_for_event("listening")
        assert listening["role"] == "fake-sobot"
        base = f"http://127.0.0.1:{listening['port']}/api/get_token"
        now = str(int(time.time()))

        status, answer = http_get(
            f"{base}?appid=A&create_time={now}&sign={make_sign('A', now, 'K')}"
        )
        assert status == 200
        assert answer["ret_code"] == "000000"
        token = answer["item"]["token"]
        assert isinstance(token, str)
        assert token

        wrong = make_sign("A", now, "not-K")
        status, answer = http_get(f"{base}?appid=A&create_time={now}&sign={wrong}")
        assert (status, answer["ret_code"]) == (200, "900003")
        assert "item" not in answer

        assert fake.terminate() == 0
    assert all(json_object(line) is not None for line in fake.stdout), fake.stdout
    assert token not in fake.output


def http_post(url: str, body: bytes) -> tuple[int, Any]:
    """POST JSON `body` to `url`: the status and the JSON answer."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with OPENER.open(request, timeout=HTTP_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def test_fake_sobot_serves_v6_with_the_credentials_it_is_given(tmp_path):
    arguments = ("--port", "0", "--v6-appid", "A6", "--v6-secret", "S6")
    with running("fake-sobot", *arguments, cwd=tmp_path) as fake:
        listening = fake.wait_for_event("listening")
        url = f"http://127.0.0.1:{listening['port']}/tokens/company"

        request = V6Credential("A6", "S6").token_request(time.time()).body
        assert request is not None
        status, answer = http_post(url, request)
        assert (status, answer["response_type"]) == (200, "token")
        assert answer["access_token"].count(".") == 2  # a JWT

        wrong = V6Credential("A6", "not-S6").token_request(time.time()).body
        assert wrong is not None
        status, answer = http_post(url, wrong)
        assert (status, answer["code"], answer["status"]) == (401, 401002, "Error")

        assert fake.terminate() == 0
    assert all(json_object(line) is not None for line in fake.stdout), fake.stdout


def test_fake_sobot_needs_both_v6_arguments(tmp_path):
    result = run_command("fake-sobot", "--v6-appid", "A6", cwd=tmp_path, env=command_env())
    assert result.returncode == 2
    assert "--v6-appid and --v6-secret go together" in result.stderr


# An option's line in --help: its flags (and metavar), then its help on the same line after two
# spaces or more, or on the lines below, indented further.
HELP_OPTION = re.compile(r"^  (-\S.*?)(?:  +(\S.*))?$")


@pytest.mark.parametrize("command", ["serve", "check", "fake-sobot"])
def test_every_option_of_every_command_says_what_it_is(tmp_path, command):
    result = run_command(command, "--help", cwd=tmp_path, env=command_env(COLUMNS="100"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("options:\n", 1)[1].splitlines()
    options: dict[str, str] = {}
    current = ""
    for line in lines:
        option = HELP_OPTION.match(line)
        if option is not None:
            current = option.group(1)
            options[current] = option.group(2) or ""
        elif line.startswith("    ") and current:
            options[current] += line.strip()
    assert "--log-format {json,console}" in options or "--log-format LOG_FORMAT" in options
    assert [name for name, text in options.items() if not text] == []


def test_listening_publicly_without_keys_needs_an_explicit_opt_out_and_warns(tmp_path):
    env = command_env(**CONFIGURED, SOBOT_PROXY_ALLOW_UNAUTHENTICATED="1")
    with running("--host", "0.0.0.0", "--port", "0", cwd=tmp_path, env=env) as proxy:
        warning = proxy.wait_for_event("unauthenticated")
        assert warning["level"] == "warning"
        assert warning["host"] == "0.0.0.0"
        proxy.wait_for_event("listening")
        assert proxy.terminate() == 0


def test_secrets_stay_out_of_the_process_title_and_its_output(tmp_path):
    key_file = tmp_path / "app_key"
    key_file.write_text("file-app-key-0123456789\n")
    env = command_env(
        SOBOT_APPID="A",
        SOBOT_APP_KEY_FILE=str(key_file),
        SOBOT_BASE_URL="http://127.0.0.1:9",  # nothing listens: every get_token fails
        SOBOT_PROXY_CLIENT_KEYS="client-key-0123456789",
    )
    with running("--port", "0", cwd=tmp_path, env=env) as proxy:
        proxy.wait_for_event("listening")
        with open(f"/proc/{proxy.process.pid}/cmdline", "rb") as cmdline:
            title = cmdline.read()
        assert proxy.terminate() == 0
    assert b"file-app-key" not in title
    assert b"client-key" not in title
    assert "file-app-key" not in proxy.output
    assert "client-key-0123456789" not in proxy.output
