"""Configuration loading: precedence of its layers, upstream and app_key sources, every error."""

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.config.settings import ConfigError, Settings, load_settings

APP_KEY = "settings-test-app-key"
# Enough to start: every test changes only what it is about.
ENV = {"SOBOT_APPID": "env-appid", "SOBOT_APP_KEY": APP_KEY, "SOBOT_REGION": "sg"}


def write_toml(path: Path, **values: object) -> Path:
    # JSON spells strings, numbers and booleans the way TOML does.
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


def problems_of(flags: dict[str, Any], env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(flags, env)
    problems = caught.value.problems
    assert isinstance(problems, list)
    assert all(problem and "\n" not in problem for problem in problems)
    return problems


def test_defaults_apply_when_nothing_else_sets_them():
    settings = load_settings({}, ENV)
    assert settings == Settings(
        appid="env-appid",
        app_key=APP_KEY,
        base_url="https://sg.sobot.io",
        host="127.0.0.1",
        port=8080,
        upstream_timeout=30.0,
        refresh_margin=300.0,
        log_level="info",
        log_format="json",
    )


# (setting, environment variable, flag value, environment value, TOML value, parsed values in
# the same order and the default last)
LAYERED = [
    ("port", "SOBOT_PROXY_PORT", "1111", "2222", 3333, (1111, 2222, 3333, 8080)),
    (
        "log_level",
        "SOBOT_LOG_LEVEL",
        "debug",
        "warning",
        "error",
        ("debug", "warning", "error", "info"),
    ),
    ("upstream_timeout", "SOBOT_UPSTREAM_TIMEOUT", "1.5", "2.5", 3.5, (1.5, 2.5, 3.5, 30.0)),
]


@pytest.mark.parametrize(("name", "env_name", "flag", "env_value", "toml", "parsed"), LAYERED)
@pytest.mark.parametrize(
    ("layers", "winner"),
    [
        (("flag", "env", "toml"), 0),
        (("flag", "toml"), 0),
        (("env", "toml"), 1),
        (("toml",), 2),
        ((), 3),
    ],
)
def test_flag_beats_environment_beats_toml_beats_default(
    tmp_path, name, env_name, flag, env_value, toml, parsed, layers, winner
):
    config = write_toml(tmp_path / "proxy.toml", **({name: toml} if "toml" in layers else {}))
    flags = {name: flag if "flag" in layers else None, "config": str(config)}
    env = {**ENV, **({env_name: env_value} if "env" in layers else {})}
    assert getattr(load_settings(flags, env), name) == parsed[winner]


def test_flags_set_to_none_are_not_set():
    flags = {"port": None, "log_level": None, "appid": None, "config": None}
    settings = load_settings(flags, {**ENV, "SOBOT_PROXY_PORT": "9000"})
    assert (settings.port, settings.log_level, settings.appid) == (9000, "info", "env-appid")


def test_toml_file_named_by_the_environment(tmp_path):
    config = write_toml(tmp_path / "proxy.toml", port=9100, log_format="console")
    settings = load_settings({}, {**ENV, "SOBOT_PROXY_CONFIG": str(config)})
    assert (settings.port, settings.log_format) == (9100, "console")


def test_config_flag_beats_the_config_environment_variable(tmp_path):
    from_flag = write_toml(tmp_path / "flag.toml", port=9101)
    from_env = write_toml(tmp_path / "env.toml", port=9102)
    settings = load_settings(
        {"config": str(from_flag)}, {**ENV, "SOBOT_PROXY_CONFIG": str(from_env)}
    )
    assert settings.port == 9101


def test_toml_file_alone_can_configure_everything(tmp_path):
    config = write_toml(
        tmp_path / "proxy.toml",
        appid="toml-appid",
        app_key="toml-key",
        region="us",
        host="0.0.0.0",
        port=0,
        upstream_timeout=5,
        refresh_margin=60,
        log_level="warning",
        log_format="console",
        connect_timeout=2,
        max_body="1MiB",
        upstream_connections=7,
        max_queue=0,
        shutdown_grace=0,
        temp_dir=str(tmp_path),
        client_keys=["client-key-1", "client-key-2"],
        allow_paths=["/api/ws/5/ticket/", "/api/5/user/"],
        allow_methods=["get", "POST"],
    )
    assert load_settings({"config": str(config)}, {}) == Settings(
        appid="toml-appid",
        app_key="toml-key",
        base_url="https://us.sobot.com",
        host="0.0.0.0",
        port=0,
        upstream_timeout=5.0,
        refresh_margin=60.0,
        log_level="warning",
        log_format="console",
        connect_timeout=2.0,
        max_body=1024 * 1024,
        upstream_connections=7,
        max_queue=0,
        shutdown_grace=0.0,
        temp_dir=str(tmp_path),
        client_keys=("client-key-1", "client-key-2"),
        allow_paths=("/api/ws/5/ticket/", "/api/5/user/"),
        allow_methods=("GET", "POST"),
    )


def test_the_file_reader_is_the_one_given():
    files = {"/etc/sobot/proxy.toml": 'appid = "read-appid"\napp_key_file = "/run/key"\n'}
    files["/run/key"] = "read-key\n"
    settings = load_settings(
        {"config": "/etc/sobot/proxy.toml", "region": "sg"},
        {},
        read_text=lambda path: files[str(path)],
    )
    assert (settings.appid, settings.app_key) == ("read-appid", "read-key")


@pytest.mark.parametrize(
    ("region", "base_url"),
    [
        ("sg", "https://sg.sobot.io"),
        ("us", "https://us.sobot.com"),
        ("US", "https://us.sobot.com"),
        (" sg ", "https://sg.sobot.io"),
    ],
)
def test_region_names_its_base_url(region, base_url):
    assert load_settings({}, {**ENV, "SOBOT_REGION": region}).base_url == base_url


@pytest.mark.parametrize(
    ("given", "base_url"),
    [
        ("http://127.0.0.1:9000/", "http://127.0.0.1:9000"),
        ("https://sobot.example.com/gateway/", "https://sobot.example.com/gateway"),
        ("https://sobot.example.com", "https://sobot.example.com"),
        ("http://[::1]:8081//", "http://[::1]:8081"),
    ],
)
def test_base_url_overrides_the_region_and_loses_its_trailing_slash(given, base_url):
    assert load_settings({}, {**ENV, "SOBOT_BASE_URL": given}).base_url == base_url
    assert load_settings({"base_url": given, "region": "us"}, ENV).base_url == base_url


def test_base_url_alone_is_enough():
    env = {**ENV, "SOBOT_BASE_URL": "http://localhost:8081"}
    del env["SOBOT_REGION"]
    assert load_settings({}, env).base_url == "http://localhost:8081"


def test_app_key_from_the_environment_is_stripped():
    assert load_settings({}, {**ENV, "SOBOT_APP_KEY": "  spaced-key \n"}).app_key == "spaced-key"


def test_app_key_from_a_file_is_stripped(tmp_path):
    key_file = tmp_path / "app_key"
    key_file.write_text("file-key\n")
    env = {**ENV, "SOBOT_APP_KEY_FILE": str(key_file)}
    del env["SOBOT_APP_KEY"]
    assert load_settings({}, env).app_key == "file-key"


def test_app_key_and_app_key_file_together_are_an_error(tmp_path):
    key_file = tmp_path / "app_key"
    key_file.write_text("file-key")
    problems = problems_of({}, {**ENV, "SOBOT_APP_KEY_FILE": str(key_file)})
    assert problems == ["set only one of SOBOT_APP_KEY and SOBOT_APP_KEY_FILE"]


def test_app_key_in_the_toml_file(tmp_path):
    config = write_toml(tmp_path / "proxy.toml", app_key="toml-key")
    env = {k: v for k, v in ENV.items() if k != "SOBOT_APP_KEY"}
    assert load_settings({"config": str(config)}, env).app_key == "toml-key"


def test_app_key_file_in_the_toml_file(tmp_path):
    key_file = tmp_path / "app_key"
    key_file.write_text("\ntoml-file-key\n")
    config = write_toml(tmp_path / "proxy.toml", app_key_file=str(key_file))
    env = {k: v for k, v in ENV.items() if k != "SOBOT_APP_KEY"}
    assert load_settings({"config": str(config)}, env).app_key == "toml-file-key"


def test_app_key_in_the_environment_beats_the_toml_file(tmp_path):
    config = write_toml(tmp_path / "proxy.toml", app_key="toml-key")
    assert load_settings({"config": str(config)}, ENV).app_key == APP_KEY


def test_app_key_and_app_key_file_together_in_the_toml_file_are_an_error(tmp_path):
    config = write_toml(tmp_path / "proxy.toml", app_key="k", app_key_file="/run/key")
    env = {k: v for k, v in ENV.items() if k != "SOBOT_APP_KEY"}
    [problem] = problems_of({"config": str(config)}, env)
    assert f"{config}: app_key" in problem
    assert f"{config}: app_key_file" in problem


def test_repr_of_settings_never_shows_the_app_key():
    settings = load_settings({}, ENV)
    assert APP_KEY not in repr(settings)
    assert APP_KEY not in str(settings)
    assert "env-appid" in repr(settings)


# (flags, environment changes (None removes a variable), what the one problem line says)
VALUE_ERRORS = [
    ({}, {"SOBOT_APPID": None}, "appid is required: set SOBOT_APPID or --appid"),
    ({"appid": "   "}, {}, "--appid: must be a non-empty string"),
    ({}, {"SOBOT_APP_KEY": None}, "app_key is required: set SOBOT_APP_KEY or SOBOT_APP_KEY_FILE"),
    ({}, {"SOBOT_APP_KEY": "   "}, "SOBOT_APP_KEY: must be a non-empty string"),
    (
        {},
        {"SOBOT_REGION": None},
        "no upstream: set SOBOT_REGION (sg, us, cn, cn-soboten) or SOBOT_BASE_URL",
    ),
    ({}, {"SOBOT_REGION": "mars"}, "SOBOT_REGION: 'mars' is not one of sg, us, cn, cn-soboten"),
    ({"region": "eu"}, {}, "--region: 'eu' is not one of sg, us, cn, cn-soboten"),
    ({}, {"SOBOT_BASE_URL": "ftp://x"}, "SOBOT_BASE_URL: 'ftp://x' is not an http(s) URL"),
    ({}, {"SOBOT_BASE_URL": "http://"}, "SOBOT_BASE_URL: 'http://' is not an http(s) URL"),
    ({"base_url": "https://h/?q=1"}, {}, "--base-url: 'https://h/?q=1' must not carry a query"),
    ({"base_url": "https://h/?"}, {}, "--base-url: 'https://h/?' must not carry a query"),
    ({"base_url": "https://h/#top"}, {}, "--base-url: 'https://h/#top' must not carry a query"),
    ({"base_url": "https://u:p@h/"}, {}, "--base-url: the URL must not carry credentials"),
    ({"base_url": "https://h/#"}, {}, "--base-url: 'https://h/#' must not carry a query"),
    ({"base_url": "http://@h/"}, {}, "--base-url: the URL must not carry credentials"),
    ({"base_url": "http://h:99999"}, {}, "--base-url: 'http://h:99999' is not a valid URL"),
    ({"base_url": "https://exa mple.com"}, {}, "--base-url: 'https://exa mple.com' contains white"),
    ({"base_url": "sobot.io"}, {}, "--base-url: 'sobot.io' is not an http(s) URL"),
    ({"port": "abc"}, {}, "--port: 'abc' is not a port number"),
    ({"port": "70000"}, {}, "--port: '70000' is not a port number"),
    ({"port": "-1"}, {}, "--port: '-1' is not a port number"),
    ({}, {"SOBOT_PROXY_PORT": "80.5"}, "SOBOT_PROXY_PORT: '80.5' is not a port number"),
    ({"host": "not a host!"}, {}, "--host: 'not a host!' is not an IP address or host name"),
    ({"upstream_timeout": "0"}, {}, "--upstream-timeout: '0' is not a positive number of seconds"),
    ({}, {"SOBOT_UPSTREAM_TIMEOUT": "-5"}, "SOBOT_UPSTREAM_TIMEOUT: '-5' is not a positive"),
    ({}, {"SOBOT_UPSTREAM_TIMEOUT": "soon"}, "SOBOT_UPSTREAM_TIMEOUT: 'soon' is not a positive"),
    ({"refresh_margin": "0"}, {}, "--refresh-margin: '0' is not a positive number of seconds"),
    ({}, {"SOBOT_LOG_LEVEL": "verbose"}, "SOBOT_LOG_LEVEL: 'verbose' is not one of debug, info"),
    ({"log_format": "xml"}, {}, "--log-format: 'xml' is not one of json, console"),
    ({}, {"SOBOT_MAX_BODY": "lots"}, "SOBOT_MAX_BODY: 'lots' is not a size in bytes"),
    ({}, {"SOBOT_TOKEN_STORE": "ftp://h"}, "SOBOT_TOKEN_STORE: is not memory or a redis://"),
    ({}, {"SOBOT_TOKEN_STORE": "redis://:pw@h/x"}, "SOBOT_TOKEN_STORE: names a database that"),
    ({}, {"SOBOT_MAX_BODY": "12kb"}, "SOBOT_MAX_BODY: '12kb' is not a size in bytes"),
    ({}, {"SOBOT_MAX_BODY": "0"}, "SOBOT_MAX_BODY: '0' is not a size in bytes"),
    ({}, {"SOBOT_SPOOL_LIMIT": "lots"}, "SOBOT_SPOOL_LIMIT: 'lots' is not a size in bytes"),
    (
        {},
        {"SOBOT_SPOOL_LIMIT": "32MiB"},
        "max_body (67108864 bytes) is over spool_limit (33554432 bytes): a body that large",
    ),
    (
        {"max_body": "2MiB", "spool_limit": "1MiB"},
        {},
        "max_body (2097152 bytes) is over spool_limit (1048576 bytes): a body that large",
    ),
    (
        {"workers": "16"},
        {},
        "max_body (67108864 bytes) is over spool_limit (536870912 bytes / 16 workers)",
    ),
    ({}, {"SOBOT_CONNECT_TIMEOUT": "0"}, "SOBOT_CONNECT_TIMEOUT: '0' is not a positive"),
    ({}, {"SOBOT_UPSTREAM_CONNECTIONS": "0"}, "SOBOT_UPSTREAM_CONNECTIONS: '0' is not a whole"),
    ({}, {"SOBOT_MAX_QUEUE": "-1"}, "SOBOT_MAX_QUEUE: '-1' is not a whole number of at least 0"),
    ({}, {"SOBOT_SHUTDOWN_GRACE": "-1"}, "SOBOT_SHUTDOWN_GRACE: '-1' is not a number of seconds"),
    ({}, {"SOBOT_TEMP_DIR": "/no/such/dir"}, "SOBOT_TEMP_DIR: '/no/such/dir' is not a directory"),
    ({}, {"SOBOT_CA_BUNDLE": "/no/such.pem"}, "SOBOT_CA_BUNDLE: '/no/such.pem' is not a file"),
    ({}, {"SOBOT_ALLOW_PATHS": "/api/ok/,etc/"}, "SOBOT_ALLOW_PATHS: 'etc/' is not a path (it"),
    ({}, {"SOBOT_METRICS_ROUTES": "api/"}, "SOBOT_METRICS_ROUTES: 'api/' is not a path (it must"),
    ({}, {"SOBOT_ALLOW_METHODS": "GET,P T"}, "SOBOT_ALLOW_METHODS: 'P T' is not an HTTP method"),
    (
        {},
        {"SOBOT_PROXY_ALLOW_UNAUTHENTICATED": "maybe"},
        "SOBOT_PROXY_ALLOW_UNAUTHENTICATED: 'maybe' is not a yes/no value",
    ),
    (
        {"host": "0.0.0.0"},
        {},
        "listening on 0.0.0.0 lets anyone who reaches it act as your Sobot company",
    ),
    (
        {"base_url": "http://sobot.example.com"},
        {},
        "the upstream http://sobot.example.com is plain http and not on this host",
    ),
]


@pytest.mark.parametrize(("flags", "changes", "problem"), VALUE_ERRORS)
def test_each_configuration_error_is_one_line_naming_the_setting(flags, changes, problem):
    env = {**ENV, **changes}
    env = {name: value for name, value in env.items() if value is not None}
    [reported] = problems_of(flags, env)
    assert reported.startswith(problem)


def test_every_problem_is_reported_at_once():
    env = {"SOBOT_PROXY_PORT": "abc", "SOBOT_LOG_FORMAT": "xml"}
    problems = problems_of({"upstream_timeout": "0"}, env)
    assert len(problems) == 6
    for name in ("appid", "SOBOT_PROXY_PORT", "--upstream-timeout", "SOBOT_LOG_FORMAT"):
        assert sum(name in problem for problem in problems) == 1, name
    assert sum(problem.startswith("app_key is required") for problem in problems) == 1
    assert sum(problem.startswith("no upstream") for problem in problems) == 1


def test_the_error_message_is_the_problems_one_a_line():
    with pytest.raises(ConfigError) as caught:
        load_settings({"port": "abc"}, {})
    assert str(caught.value).splitlines() == caught.value.problems


def test_problems_never_show_the_app_key():
    problems = problems_of({"port": "abc", "region": "mars"}, ENV)
    assert len(problems) == 2
    assert not any(APP_KEY in problem for problem in problems)


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing.toml", lambda tmp: tmp])
def test_unreadable_toml_file(tmp_path, make):
    path = make(tmp_path)
    [problem] = problems_of({"config": str(path)}, ENV)
    assert problem.startswith(f"config file {path}: cannot be read (")


def test_unreadable_toml_file_named_by_the_environment(tmp_path):
    path = tmp_path / "missing.toml"
    [problem] = problems_of({}, {**ENV, "SOBOT_PROXY_CONFIG": str(path)})
    assert problem.startswith(f"config file {path}: cannot be read")


@pytest.mark.parametrize("content", [b"port = \n", b"port = 1\nport = 2\n", b"\xff\xfe = 1\n"])
def test_invalid_toml_file(tmp_path, content):
    path = tmp_path / "proxy.toml"
    path.write_bytes(content)
    [problem] = problems_of({"config": str(path)}, ENV)
    assert problem.startswith(f"config file {path}: not valid TOML (")


def test_unknown_key_in_the_toml_file_is_named(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text('colour = "blue"\nport = 9000\n[server]\nport = 1\n')
    problems = problems_of({"config": str(path)}, ENV)
    assert len(problems) == 2
    assert problems[0].startswith(f"config file {path}: unknown setting 'colour' (known: ")
    assert problems[1].startswith(f"config file {path}: unknown setting 'server' (known: ")


def test_bad_value_in_the_toml_file_names_the_file_and_key(tmp_path):
    path = write_toml(tmp_path / "proxy.toml", port="abc", region="mars")
    env = {k: v for k, v in ENV.items() if k != "SOBOT_REGION"}
    problems = problems_of({"config": str(path)}, env)
    assert sorted(problems) == [
        f"{path}: port: 'abc' is not a port number (0-65535; 0 picks a free port)",
        f"{path}: region: 'mars' is not one of sg, us, cn, cn-soboten",
    ]


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_unreadable_app_key_file(tmp_path, make):
    path = make(tmp_path)
    env = {k: v for k, v in ENV.items() if k != "SOBOT_APP_KEY"}
    [problem] = problems_of({}, {**env, "SOBOT_APP_KEY_FILE": str(path)})
    assert problem.startswith(f"SOBOT_APP_KEY_FILE: cannot read {path} (")


def test_app_key_file_that_is_not_text(tmp_path):
    path = tmp_path / "app_key"
    path.write_bytes(b"\xff\xfe\x00")
    env = {k: v for k, v in ENV.items() if k != "SOBOT_APP_KEY"}
    [problem] = problems_of({}, {**env, "SOBOT_APP_KEY_FILE": str(path)})
    assert problem == f"SOBOT_APP_KEY_FILE: cannot read {path} (not text)"


@pytest.mark.parametrize("content", ["", " \n\n"])
def test_empty_app_key_file(tmp_path, content):
    path = tmp_path / "app_key"
    path.write_text(content)
    env = {k: v for k, v in ENV.items() if k != "SOBOT_APP_KEY"}
    [problem] = problems_of({}, {**env, "SOBOT_APP_KEY_FILE": str(path)})
    assert problem == f"SOBOT_APP_KEY_FILE: {path} is empty"


def test_unreadable_app_key_file_named_in_the_toml_file(tmp_path):
    missing = tmp_path / "missing"
    config = write_toml(tmp_path / "proxy.toml", app_key_file=str(missing))
    env = {k: v for k, v in ENV.items() if k != "SOBOT_APP_KEY"}
    [problem] = problems_of({"config": str(config)}, env)
    assert problem.startswith(f"{config}: app_key_file: cannot read {missing} (")


def test_a_relative_app_key_file_in_the_toml_file_is_found_beside_it(tmp_path, monkeypatch):
    (tmp_path / "key.txt").write_text("beside-the-config\n")
    config = tmp_path / "sobot-proxy.toml"
    config.write_text('appid = "a"\nregion = "sg"\napp_key_file = "key.txt"\n')
    monkeypatch.chdir("/")
    assert load_settings({"config": str(config)}, {}).app_key == "beside-the-config"


def test_a_url_with_credentials_is_refused_without_repeating_it():
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {**ENV, "SOBOT_BASE_URL": "https://user:hunter2@h.example"})
    assert "hunter2" not in str(raised.value)
    assert "SOBOT_BASE_URL" in str(raised.value)


@pytest.mark.parametrize(
    ("given", "size"),
    [("1048576", 1 << 20), ("512KiB", 512 << 10), ("64MiB", 64 << 20), ("1g", 1 << 30)],
)
def test_sizes_take_binary_units(given, size):
    env = {**ENV, "SOBOT_MAX_BODY": given, "SOBOT_SPOOL_LIMIT": given}
    settings = load_settings({}, env)
    assert (settings.max_body, settings.spool_limit) == (size, size)


def test_a_body_kept_in_memory_needs_no_spool_room():
    """Bodies up to 1 MiB never touch the disk, so a spool limit below max_body is fine then."""
    env = {**ENV, "SOBOT_MAX_BODY": "1MiB", "SOBOT_SPOOL_LIMIT": "1KiB"}
    assert load_settings({}, env).spool_limit == 1024


def test_client_keys_come_comma_separated_or_one_a_line_from_a_file(tmp_path):
    listed = load_settings({}, {**ENV, "SOBOT_PROXY_CLIENT_KEYS": " client-key-1, client-key-2 ,,"})
    assert listed.client_keys == ("client-key-1", "client-key-2")
    keys = tmp_path / "keys"
    keys.write_text("client-key-3\n\n client-key-4 \n")
    filed = load_settings({}, {**ENV, "SOBOT_PROXY_CLIENT_KEYS_FILE": str(keys)})
    assert filed.client_keys == ("client-key-3", "client-key-4")
    assert "client-key-3" not in repr(filed)


def test_public_listening_is_fine_with_client_keys_or_an_explicit_opt_out():
    public = {**ENV, "SOBOT_PROXY_HOST": "0.0.0.0"}
    assert load_settings({}, {**public, "SOBOT_PROXY_CLIENT_KEYS": "client-key"}).host == "0.0.0.0"
    opted_out = load_settings({"allow_unauthenticated": True}, public)
    assert opted_out.allow_unauthenticated is True
    assert load_settings({}, {**ENV, "SOBOT_PROXY_HOST": "::1"}).host == "::1"  # loopback


def test_plain_http_is_fine_on_this_host_or_when_explicitly_allowed():
    local = load_settings({}, {**ENV, "SOBOT_BASE_URL": "http://localhost:8081"})
    assert local.base_url == "http://localhost:8081"
    remote = {**ENV, "SOBOT_BASE_URL": "http://gateway.internal"}
    allowed = load_settings({}, {**remote, "SOBOT_ALLOW_INSECURE_UPSTREAM": "true"})
    assert allowed.allow_insecure_upstream is True


def test_a_redis_store_url_and_password_never_show():
    settings = load_settings(
        {},
        {
            **ENV,
            "SOBOT_TOKEN_STORE": "rediss://:url-secret@redis.internal:6380/2",
            "SOBOT_TOKEN_STORE_PASSWORD": "password-secret",
        },
    )
    assert settings.token_store == "rediss://:url-secret@redis.internal:6380/2"
    assert settings.token_store_password == "password-secret"
    assert "secret" not in repr(settings)
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {**ENV, "SOBOT_TOKEN_STORE": "redis://:url-secret@h:99999/0"})
    assert "url-secret" not in str(raised.value)


SHORT_SECRETS = [
    ({"SOBOT_PROXY_CLIENT_KEYS": "Short-1"}, "SOBOT_PROXY_CLIENT_KEYS: its key is shorter than 8"),
    (
        {"SOBOT_PROXY_CLIENT_KEYS": "client-key-1,Short-1,Short-2"},
        "SOBOT_PROXY_CLIENT_KEYS: 2 of its keys are shorter than 8 characters",
    ),
    (
        {"SOBOT_PROXY_CLIENT_KEYS_FILE": "keys"},
        "SOBOT_PROXY_CLIENT_KEYS_FILE: {tmp}/keys line 2: its key is shorter than 8 characters",
    ),
    (
        {"SOBOT_TOKEN_STORE": "redis://r/0", "SOBOT_TOKEN_STORE_PASSWORD": "Short-1"},
        "SOBOT_TOKEN_STORE_PASSWORD: the password is shorter than 8 characters",
    ),
    (
        {"SOBOT_TOKEN_STORE": "redis://r/0", "SOBOT_TOKEN_STORE_PASSWORD_FILE": "password"},
        "SOBOT_TOKEN_STORE_PASSWORD_FILE: the password is shorter than 8 characters",
    ),
    (
        {"SOBOT_TOKEN_STORE": "redis://:Short%2D1@r/0"},
        "SOBOT_TOKEN_STORE: the password is shorter than 8 characters",
    ),
]


@pytest.mark.parametrize(("changes", "problem"), SHORT_SECRETS)
def test_client_keys_and_redis_passwords_too_short_to_scrub_are_refused(tmp_path, changes, problem):
    """The logs' scrubber leaves values under 8 characters alone (they would mangle ordinary
    text): such a key or password could show in a line, so it is refused, in one line that
    does not show it."""
    (tmp_path / "keys").write_text("client-key-1\nShort-1\n")
    (tmp_path / "password").write_text("Short-1\n")
    env = {
        **ENV,
        **{
            name: str(tmp_path / value) if name.endswith("_FILE") else value
            for name, value in changes.items()
        },
    }
    [reported] = problems_of({}, env)
    assert reported.startswith(problem.format(tmp=tmp_path))
    assert "Short" not in reported


def test_client_keys_and_redis_passwords_of_8_characters_are_enough():
    settings = load_settings(
        {},
        {
            **ENV,
            "SOBOT_PROXY_CLIENT_KEYS": "8-chars!",
            "SOBOT_TOKEN_STORE": "redis://:8-chars!@r/0",
        },
    )
    assert settings.client_keys == ("8-chars!",)
