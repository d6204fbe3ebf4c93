"""The real `sobot-proxy` command in a subprocess: configuration errors, serving, logs, signals."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.protocol import make_sign

DEMO_APP_KEY = "demo-app-key"
PREFIX = "sobot-proxy: configuration error: "
START_TIMEOUT = 10.0  # for the command to start listening
EXIT_TIMEOUT = 10.0  # for the command to exit, by itself or after SIGTERM
HTTP_TIMEOUT = 5.0
# What a process needs to run; nothing else, and never a SOBOT_* variable, leaks in.
KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "SYSTEMROOT", "PYTHONPATH")
# A fake Sobot token (uuid4().hex) or a sign (md5 hex) would show as 32 hex digits.
HEX32 = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
# No proxy from the environment between the tests and 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def command_env(**variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name in KEPT_ENV}
    env = {name: value for name, value in env.items() if not name.startswith("SOBOT_")}
    return {**env, **variables}


def run_command(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=EXIT_TIMEOUT,
        check=False,
    )


def http_get(url: str) -> tuple[int, Any]:
    """GET `url`: the status and the JSON body."""
    try:
        with OPENER.open(url, timeout=HTTP_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def json_object(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Running:
    """A started command whose stdout and stderr are drained by threads, line by line."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._fresh: queue.Queue[str | None] = queue.Queue()
        self._drains = [
            threading.Thread(target=self._drain, args=(self.process.stdout, self.stdout, True)),
            threading.Thread(target=self._drain, args=(self.process.stderr, self.stderr, False)),
        ]
        for drain in self._drains:
            drain.start()

    def _drain(self, stream: Any, lines: list[str], announce: bool) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if announce:
                self._fresh.put(line)
        if announce:
            self._fresh.put(None)

    def wait_for_line(self, matches: Callable[[str], bool], timeout: float = START_TIMEOUT) -> str:
        """The next stdout line that matches; fails after `timeout` or if stdout ends first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._fresh.get(timeout=max(remaining, 0))
            except queue.Empty:
                pytest.fail(f"no matching line within {timeout} s; stdout: {self.stdout}")
            if line is None:
                pytest.fail(f"stdout ended first; stdout: {self.stdout}; stderr: {self.stderr}")
            if matches(line):
                return line

    def wait_for_event(self, name: str) -> dict[str, Any]:
        line = self.wait_for_line(lambda line: (json_object(line) or {}).get("event") == name)
        event = json_object(line)
        assert event is not None
        return event

    def terminate(self) -> int:
        """Send SIGTERM and return the exit status, once the process and its output ended."""
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=EXIT_TIMEOUT)
        self._join()
        return status

    @property
    def output(self) -> str:
        return "\n".join([*self.stdout, *self.stderr])

    def _join(self) -> None:
        for drain in self._drains:
            drain.join(timeout=EXIT_TIMEOUT)
            assert not drain.is_alive()

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=EXIT_TIMEOUT)
            self._join()
        finally:
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()


@contextmanager
def running(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Iterator[Running]:
    command = Running(*args, cwd=cwd, env=command_env() if env is None else env)
    try:
        yield command
    finally:
        command.close()


def wait_until_ready(base: str) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        status, body = http_get(f"{base}/readyz")
        if status == 200:
            return body
        assert status == 503, body
        if time.monotonic() > deadline:
            pytest.fail(f"/readyz still {status} after {START_TIMEOUT} s: {body}")
        time.sleep(0.05)


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
            "no upstream: set SOBOT_REGION (sg or us) or SOBOT_BASE_URL (--region / --base-url)",
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
        ["--region: 'mars' is not one of sg, us"],
        id="unknown-region-flag",
    ),
    pytest.param(
        [],
        {**CONFIGURED, "SOBOT_REGION": "eu"},
        ["SOBOT_REGION: 'eu' is not one of sg, us"],
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
            "--region: 'mars' is not one of sg, us",
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

    events = [json_object(line) for line in proxy.stdout]
    assert all(event is not None for event in events), proxy.stdout
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
