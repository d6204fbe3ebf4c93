"""Tenants in the configuration: the TOML file's [tenants.NAME] and their credential sets, the
tenant each client key is bound to, what `sobot-proxy check` shows, and every mistake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config.routes import CredentialSettings, ResolvedRoute
from proxy.config.settings import ConfigError, Settings, load_settings
from proxy.config.tenants import TenantSettings
from tests.processes import command_env, run_command

APP_KEY = "tenants-test-app-key"
ACME_KEY = "tenants-test-acme-app-key"
ACME_V6 = "tenants-test-acme-v6-secret"
CLIENT_KEYS = ("client-key-of-default-0123", "client-key-of-acme-4567", "client-key-of-beta-89ab")
ENV = {"SOBOT_APPID": "main-appid", "SOBOT_APP_KEY": APP_KEY, "SOBOT_REGION": "sg"}
MAIN = "https://sg.sobot.io"
CONFIG = "sobot-proxy.toml"  # as given on the command line: problems name it so
FILES = {
    "acme.key": f"{ACME_KEY}\n",
    "acme_v6.secret": f"{ACME_V6}\n",
    "empty.secret": " \n",
}
SECRETS = (APP_KEY, ACME_KEY, ACME_V6, *CLIENT_KEYS)

ACME = """
[tenants.acme]
appid = "acme-appid"
app_key_file = "acme.key"
region = "us"

[tenants.acme.credentials.callcenter]
kind = "v6"
appid = "acme-cc-appid"
app_key_file = "acme_v6.secret"
"""
BETA = f"""
[tenants.beta]
appid = "beta-appid"
app_key = "{ACME_KEY}-beta"
"""


def load(
    toml: str,
    env: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
    config: str = CONFIG,
) -> Settings:
    """The pure loader on `toml` as the file `config`, files read from FILES beside it (and
    `files`, by their full names)."""
    known = {
        config: toml,
        **{str(Path(config).parent / n): t for n, t in FILES.items()},
        **(files or {}),
    }

    def read_text(path: Path) -> str:
        if str(path) not in known:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return known[str(path)]

    return load_settings({"config": config}, {**ENV, **(env or {})}, read_text=read_text)


def problems_of(toml: str, env: dict[str, str] | None = None, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(toml, env, **kwargs)
    problems = caught.value.problems
    assert all(problem and "\n" not in problem for problem in problems)
    assert not any(secret in problem for problem in problems for secret in SECRETS)
    return problems


# --- what a valid file gives ------------------------------------------------------------------


def test_without_tenants_the_top_level_is_the_one_tenant_default():
    settings = load_settings({}, ENV)
    assert settings.tenants == ()
    assert settings.all_tenants == (TenantSettings("default", "main-appid", APP_KEY, MAIN),)
    assert settings.all_tenants[0].credential_sets == settings.credential_sets


def test_a_named_tenant_has_its_appid_key_upstream_and_sets():
    settings = load(ACME)
    (acme,) = settings.tenants
    assert acme == TenantSettings(
        "acme",
        "acme-appid",
        ACME_KEY,
        "https://us.sobot.com",
        (CredentialSettings("callcenter", "v6", "acme-cc-appid", ACME_V6),),
    )
    # Where each secret came from, for a reload to read it again.
    assert acme.app_key_file == "acme.key"
    assert acme.credentials[0].secret_file == "acme_v6.secret"
    assert [config.name for config in acme.credential_sets] == ["default", "callcenter"]
    assert acme.credential_sets[0] == CredentialSettings("default", "v5", "acme-appid", ACME_KEY)
    assert acme.credential_sets[0].secret_file == "acme.key"


def test_all_tenants_puts_default_first_with_the_top_level_sets_then_the_file_order():
    toml = '[credentials.chat-eu]\nkind = "v5"\nappid = "eu-appid"\napp_key = "k"\n' + BETA + ACME
    settings = load(
        toml,
        files={"/keys/app_key": f"{APP_KEY}\n"},
        env={"SOBOT_APP_KEY": "", "SOBOT_APP_KEY_FILE": "/keys/app_key"},
    )
    names = [tenant.name for tenant in settings.all_tenants]
    assert names == ["default", "beta", "acme"]
    default = settings.all_tenants[0]
    assert (default.appid, default.app_key, default.base_url) == ("main-appid", APP_KEY, MAIN)
    assert default.credentials == settings.credentials
    assert [config.name for config in default.credential_sets] == ["default", "chat-eu"]
    assert default.app_key_file == "/keys/app_key"
    assert settings.credential_sets[0].secret_file == "/keys/app_key"


def test_a_tenant_without_region_or_base_url_uses_the_top_level_main_upstream():
    """The top-level upstream, whichever way it was given; a set of the tenant with no upstream
    of its own fetches its token from the tenant's (base_url None, as for the top level)."""
    settings = load(BETA, env={"SOBOT_REGION": "", "SOBOT_BASE_URL": "https://gw.example/"})
    assert settings.tenants[0].base_url == "https://gw.example"
    assert load(ACME).tenants[0].credentials[0].base_url is None


def test_a_tenants_base_url_and_its_sets_upstream():
    toml = ACME.replace('region = "us"', 'base_url = "https://acme-gw.example/"')
    toml += 'region = "cn"\n'
    acme = load(toml).tenants[0]
    assert acme.base_url == "https://acme-gw.example"
    assert acme.credentials[0].base_url == "https://www.sobot.com"


def test_a_plain_http_tenant_upstream_on_this_host():
    toml = BETA + 'base_url = "http://127.0.0.1:8081"\n'
    assert load(toml).tenants[0].base_url == "http://127.0.0.1:8081"


def test_tenant_names_are_case_sensitive():
    toml = BETA + BETA.replace("tenants.beta", "tenants.Beta").replace("beta-appid", "Beta-id")
    assert [tenant.name for tenant in load(toml).tenants] == ["beta", "Beta"]


def test_a_route_may_name_a_set_only_some_tenants_have():
    """A tenant without it is refused that route when it asks (the server's business)."""
    toml = ACME + BETA + '[[routes]]\nprefix = "/callservice/"\ncredentials = "callcenter"\n'
    settings = load(toml)
    assert ResolvedRoute("/callservice/", None, "callcenter") in settings.route_table


def test_no_secret_shows_in_any_repr():
    settings = load(ACME + BETA, env={"SOBOT_PROXY_CLIENT_KEYS": ",".join(CLIENT_KEYS)})
    shown = repr(settings) + repr(settings.all_tenants) + repr(settings.tenants[0].credential_sets)
    assert "acme-appid" in shown
    for secret in SECRETS:
        assert secret not in shown


# --- client keys bound to tenants -------------------------------------------------------------

KEYS_FILE = "/run/secrets/client_keys"


def keyed(lines: str, toml: str = ACME + BETA) -> Settings:
    return load(toml, env={"SOBOT_PROXY_CLIENT_KEYS_FILE": KEYS_FILE}, files={KEYS_FILE: lines})


def test_a_key_file_binds_each_key_to_its_tenant_or_default():
    default, acme, beta = CLIENT_KEYS
    settings = keyed(f"# one client a line\n{default}\n\n  {acme}   acme\n{beta}\tbeta\r\n")
    assert settings.client_keys == CLIENT_KEYS
    assert settings.client_key_tenants == ("default", "acme", "beta")
    assert settings.client_key_bindings == (
        (default, "default"),
        (acme, "acme"),
        (beta, "beta"),
    )


def test_a_key_file_may_name_default():
    settings = keyed(f"{CLIENT_KEYS[0]} default\n{CLIENT_KEYS[1]}\n")
    assert [tenant for _, tenant in settings.client_key_bindings] == ["default", "default"]


def test_keys_given_as_values_are_defaults():
    """Every key in SOBOT_PROXY_CLIENT_KEYS or the TOML list `client_keys` is `default`'s; so
    is a file of only keys. Then client_key_tenants stays empty, as without tenants."""
    from_env = load(ACME, env={"SOBOT_PROXY_CLIENT_KEYS": ",".join(CLIENT_KEYS)})
    from_toml = load(f"client_keys = {list(CLIENT_KEYS)!r}\n" + ACME)
    only_keys = keyed("\n".join(CLIENT_KEYS))
    for settings in (from_env, from_toml, only_keys):
        assert settings.client_keys == CLIENT_KEYS
        assert settings.client_key_tenants == ()
        assert {tenant for _, tenant in settings.client_key_bindings} == {"default"}


def test_a_toml_client_keys_file_binds_too():
    settings = load(
        'client_keys_file = "keys"\n' + ACME,
        files={"/etc/keys": f"{CLIENT_KEYS[1]} acme\n"},
        config="/etc/sobot-proxy.toml",
    )
    assert settings.client_key_bindings == ((CLIENT_KEYS[1], "acme"),)


def test_the_same_key_twice_for_one_tenant_is_harmless():
    settings = keyed(f"{CLIENT_KEYS[1]} acme\n{CLIENT_KEYS[1]} acme\n")
    assert settings.client_key_tenants == ("acme", "acme")


FILE_ERROR = f"SOBOT_PROXY_CLIENT_KEYS_FILE: {KEYS_FILE}"


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        pytest.param(
            f"{CLIENT_KEYS[0]}\n{CLIENT_KEYS[1]} acme2\n",
            f"{FILE_ERROR} line 2: names a tenant that is not configured (tenants: default, "
            "acme, beta; names are case-sensitive)",
            id="unknown-tenant",
        ),
        pytest.param(
            f"{CLIENT_KEYS[1]} Acme\n",
            f"{FILE_ERROR} line 1: names a tenant that is not configured (tenants: default, "
            "acme, beta; names are case-sensitive)",
            id="tenant-in-another-case",
        ),
        pytest.param(
            f"{CLIENT_KEYS[0]} {CLIENT_KEYS[1]}\n",
            f"{FILE_ERROR} line 1: names a tenant that is not configured (tenants: default, "
            "acme, beta; names are case-sensitive)",
            id="two-keys-on-a-line",
        ),
        pytest.param(
            f"\n{CLIENT_KEYS[1]} acme # the CRM\n",
            f"{FILE_ERROR} line 2: 5 words; a line is a key, or a key and a tenant's name",
            id="three-words",
        ),
        pytest.param(
            f"{CLIENT_KEYS[1]} acme\n{CLIENT_KEYS[2]} beta\n{CLIENT_KEYS[1]} beta\n",
            f"{FILE_ERROR} line 3: the same key as line 1, bound to another tenant",
            id="one-key-two-tenants",
        ),
        pytest.param(
            "# only a comment\n\n",
            f"SOBOT_PROXY_CLIENT_KEYS_FILE: {KEYS_FILE} is empty",
            id="only-comments",
        ),
    ],
)
def test_a_bad_key_file_line_is_one_problem_naming_the_line_never_the_key(lines, problem):
    env = {"SOBOT_PROXY_CLIENT_KEYS_FILE": KEYS_FILE}
    assert problems_of(ACME + BETA, env, files={KEYS_FILE: lines}) == [problem]


def test_an_unknown_tenant_among_many_is_one_short_line():
    """With more tenants than a line can list, the problem counts them instead."""
    many = "".join(
        f'[tenants.t{i}]\nappid = "appid-{i}"\napp_key = "key-{i}"\n' for i in range(1000)
    )
    env = {"SOBOT_PROXY_CLIENT_KEYS_FILE": KEYS_FILE}
    lines = f"{CLIENT_KEYS[0]} t1000\n"
    assert problems_of(many, env, files={KEYS_FILE: lines}) == [
        f"{FILE_ERROR} line 1: names a tenant that is not configured (1001 tenants are "
        "configured; names are case-sensitive)"
    ]


def test_a_key_bound_to_a_tenant_with_a_mistake_is_not_a_second_problem():
    toml = ACME.replace('app_key_file = "acme.key"\n', "")
    problems = problems_of(
        toml, {"SOBOT_PROXY_CLIENT_KEYS_FILE": KEYS_FILE}, files={KEYS_FILE: "client-key acme\n"}
    )
    assert problems == [f"{CONFIG}: tenants.acme: set app_key or app_key_file"]


# --- every mistake in [tenants.NAME] ------------------------------------------------------------

TENANT_KEYS = "appid, app_key, app_key_file, region, base_url, credentials"
SET_KEYS = "kind, appid, app_key, app_key_file, upstream, region, authorization_scheme"
IN_CLEAR = (
    "is plain http and not on this host: the token would cross the network in clear; use https, "
    "or set SOBOT_ALLOW_INSECURE_UPSTREAM=1 (--allow-insecure-upstream)"
)
WITH_KEY = '[tenants.acme]\nappid = "acme-appid"\napp_key = "k"\n'
V6_SET = f'[tenants.acme.credentials.cc]\nkind = "v6"\nappid = "acme-cc"\napp_key = "{ACME_V6}"\n'

# (the TOML file, the one problem line it gives, without the leading "sobot-proxy.toml: ")
MISTAKES = [
    pytest.param(
        WITH_KEY + 'colour = "red"\n',
        f"tenants.acme.colour: unknown key (known: {TENANT_KEYS})",
        id="unknown-key",
    ),
    pytest.param(
        '[tenants.acme]\napp_key = "k"\n',
        "tenants.acme.appid: is required",
        id="without-appid",
    ),
    pytest.param(
        WITH_KEY.replace('"acme-appid"', '" "'),
        "tenants.acme.appid: must be a non-empty string",
        id="empty-appid",
    ),
    pytest.param(
        '[tenants.acme]\nappid = "acme-appid"\n',
        "tenants.acme: set app_key or app_key_file",
        id="without-app-key",
    ),
    pytest.param(
        WITH_KEY + 'app_key_file = "acme.key"\n',
        "tenants.acme: set only one of app_key and app_key_file",
        id="both-app-keys",
    ),
    pytest.param(
        '[tenants.acme]\nappid = "acme-appid"\napp_key_file = "missing.key"\n',
        "tenants.acme.app_key_file: cannot read missing.key (No such file or directory)",
        id="app-key-file-missing",
    ),
    pytest.param(
        '[tenants.acme]\nappid = "acme-appid"\napp_key_file = "empty.secret"\n',
        "tenants.acme.app_key_file: empty.secret is empty",
        id="app-key-file-empty",
    ),
    pytest.param(
        WITH_KEY + 'region = "us"\nbase_url = "https://a.example"\n',
        "tenants.acme: set only one of base_url and region",
        id="region-and-base-url",
    ),
    pytest.param(
        WITH_KEY + 'region = "mars"\n',
        "tenants.acme.region: 'mars' is not one of sg, us, cn, cn-soboten",
        id="unknown-region",
    ),
    pytest.param(
        WITH_KEY + 'base_url = "ftp://a.example"\n',
        "tenants.acme.base_url: 'ftp://a.example' is not an http(s) URL with a host",
        id="bad-base-url",
    ),
    pytest.param(
        WITH_KEY + 'base_url = "http://acme.example"\n',
        f"tenants.acme.base_url: http://acme.example {IN_CLEAR}",
        id="plain-http-base-url",
    ),
    pytest.param(
        WITH_KEY.replace("tenants.acme", 'tenants."ac me"'),
        'tenants."ac me": a tenant\'s name is letters, digits, _ and - only',
        id="bad-name",
    ),
    pytest.param(
        WITH_KEY.replace("tenants.acme", "tenants.default"),
        "tenants.default: the name 'default' is reserved (the tenant of the top-level appid and "
        "app_key): choose another",
        id="named-default",
    ),
    pytest.param(
        WITH_KEY.replace("tenants.acme", "tenants.Default"),
        "tenants.Default: the name 'Default' is reserved (the tenant of the top-level appid and "
        "app_key): choose another",
        id="named-default-in-another-case",
    ),
    pytest.param(
        'tenants = "acme"\n',
        "tenants: must be tables of tenants ([tenants.NAME])",
        id="tenants-not-a-table",
    ),
    pytest.param(
        '[tenants]\nacme = "acme-appid"\n',
        "tenants.acme: must be a table ([tenants.acme] with appid, app_key_file, ...)",
        id="tenant-not-a-table",
    ),
    pytest.param(
        WITH_KEY.replace("acme-appid", "main-appid"),
        "tenants.acme.appid: the same v5 appid as the default set (SOBOT_APPID): a client's own "
        "get_token could not tell the two apart",
        id="appid-of-default",
    ),
    pytest.param(
        WITH_KEY + WITH_KEY.replace("tenants.acme", "tenants.beta"),
        "tenants.beta.appid: the same v5 appid as tenants.acme: a client's own get_token could "
        "not tell the two apart",
        id="two-tenants-one-appid",
    ),
    pytest.param(
        WITH_KEY
        + V6_SET
        + WITH_KEY.replace("acme", "beta")
        + V6_SET.replace("tenants.acme", "tenants.beta"),
        "tenants.beta.credentials.cc.appid: the same v6 appid as tenants.acme.credentials.cc: "
        "two sets of one appid would rotate each other's token",
        id="v6-appid-in-two-tenants",
    ),
    pytest.param(
        f'[credentials.cc]\nkind = "v6"\nappid = "acme-cc"\napp_key = "{ACME_V6}"\n'
        + WITH_KEY
        + V6_SET,
        "tenants.acme.credentials.cc.appid: the same v6 appid as credentials.cc: two sets of one "
        "appid would rotate each other's token",
        id="v6-appid-of-a-default-set",
    ),
    pytest.param(
        WITH_KEY + '[tenants.acme.credentials.chat]\nkind = "v5"\nappid = "acme-appid"\n'
        'app_key = "k"\n',
        "tenants.acme.credentials.chat.appid: the same v5 appid as tenants.acme: two sets of one "
        "appid would rotate each other's token",
        id="v5-set-of-the-tenants-appid",
    ),
    pytest.param(
        WITH_KEY + V6_SET.replace(".cc]", ".default]"),
        "tenants.acme.credentials.default: the name 'default' is reserved (the tenant's own "
        "appid and app_key): choose another",
        id="set-named-default",
    ),
    pytest.param(
        WITH_KEY + V6_SET.replace(".cc]", ".none]"),
        "tenants.acme.credentials.none: the name 'none' is reserved (a route that injects no "
        "credential): choose another",
        id="set-named-none",
    ),
    pytest.param(
        WITH_KEY + V6_SET + 'app_secret = "x"\n',
        f"tenants.acme.credentials.cc.app_secret: unknown key (known: {SET_KEYS})",
        id="set-unknown-key",
    ),
    pytest.param(
        WITH_KEY + V6_SET.replace('kind = "v6"\n', ""),
        "tenants.acme.credentials.cc.kind: is required",
        id="set-without-kind",
    ),
    pytest.param(
        WITH_KEY + V6_SET + 'upstream = "http://v6.example"\n',
        f"tenants.acme.credentials.cc.upstream: http://v6.example {IN_CLEAR}",
        id="set-plain-http-upstream",
    ),
    pytest.param(
        WITH_KEY + "[tenants.acme.credentials]\ncc = 1\n",
        "tenants.acme.credentials.cc: must be a table ([tenants.acme.credentials.cc] with kind, "
        "appid, ...)",
        id="set-not-a-table",
    ),
    pytest.param(
        WITH_KEY.replace('app_key = "k"\n', 'credentials = "cc"\napp_key = "k"\n'),
        "tenants.acme.credentials: must be tables of credential sets "
        "([tenants.acme.credentials.NAME])",
        id="credentials-not-a-table",
    ),
    pytest.param(
        f'[credentials.cc]\nkind = "v6"\nappid = "main-cc"\napp_key = "{ACME_V6}"\n'
        + WITH_KEY
        + V6_SET.replace('kind = "v6"', 'kind = "v5"'),
        "tenants.acme.credentials.cc.kind: 'v5', but credentials.cc is 'v6': a credential set's "
        "name has one kind in every tenant",
        id="one-set-name-two-kinds",
    ),
    pytest.param(
        WITH_KEY
        + V6_SET
        + WITH_KEY.replace("acme", "beta")
        + V6_SET.replace("tenants.acme", "tenants.beta")
        .replace('"acme-cc"', '"beta-cc"')
        .replace('kind = "v6"', 'kind = "v5"'),
        "tenants.beta.credentials.cc.kind: 'v5', but tenants.acme.credentials.cc is 'v6': a "
        "credential set's name has one kind in every tenant",
        id="one-set-name-two-kinds-in-two-tenants",
    ),
    pytest.param(
        WITH_KEY + V6_SET + '[[routes]]\nprefix = "/x/"\ncredentials = "callcenter"\n',
        "routes[1].credentials: 'callcenter' is not a credential set (known: default, none, cc)",
        id="route-naming-a-set-no-tenant-has",
    ),
]


@pytest.mark.parametrize(("toml", "problem"), MISTAKES)
def test_each_mistake_is_one_line_naming_the_file_and_the_key(toml, problem):
    assert problems_of(toml) == [f"{CONFIG}: {problem}"]


def test_tenants_is_a_known_table():
    problems = problems_of('colour = "blue"\n')
    assert "tenants" in problems[0]


@pytest.mark.parametrize(
    ("top_level", "flags", "env", "named"),
    [
        ("", {}, {}, "SOBOT_APPID"),
        ("", {"appid": "main-appid"}, {"SOBOT_APPID": "env-appid"}, "--appid"),
        ('appid = "main-appid"\n', {}, {"SOBOT_APPID": None}, "the file's top-level appid"),
    ],
    ids=["env", "flag", "file"],
)
def test_a_tenant_repeating_the_default_appid_names_where_that_appid_was_given(
    top_level, flags, env, named
):
    toml = top_level + WITH_KEY.replace("acme-appid", "main-appid")
    given = {name: value for name, value in {**ENV, **env}.items() if value is not None}
    with pytest.raises(ConfigError) as caught:
        load_settings({"config": CONFIG, **flags}, given, read_text=lambda _path: toml)
    assert caught.value.problems == [
        f"{CONFIG}: tenants.acme.appid: the same v5 appid as the default set ({named}): a "
        "client's own get_token could not tell the two apart"
    ]


def test_every_mistake_of_every_tenant_is_listed_in_one_run():
    toml = (
        '[tenants.acme]\nappid = "main-appid"\n'  # no key, and default's appid
        '[tenants.beta]\nappid = "b"\napp_key = "k"\nregion = "eu"\n'
        '[[routes]]\nprefix = "/x/"\ncredentials = "cc"\n'
    )
    assert problems_of(toml) == [
        f"{CONFIG}: tenants.acme: set app_key or app_key_file",
        f"{CONFIG}: tenants.acme.appid: the same v5 appid as the default set (SOBOT_APPID): a "
        "client's own get_token could not tell the two apart",
        f"{CONFIG}: tenants.beta.region: 'eu' is not one of sg, us, cn, cn-soboten",
        f"{CONFIG}: routes[1].credentials: 'cc' is not a credential set (known: default, none)",
    ]


# --- on a real process ------------------------------------------------------------------------

GOOD_FILE = f"""
[tenants.acme]
appid = "acme-appid"
app_key_file = "acme.key"
region = "us"

[tenants.acme.credentials.callcenter]
kind = "v6"
appid = "acme-cc-appid"
app_key = "{ACME_V6}"

[tenants.beta]
appid = "beta-appid"
app_key = "{ACME_KEY}-beta"

[[routes]]
prefix = "/callservice/"
credentials = "callcenter"
"""

BAD_FILE = f"""
[tenants.acme]
appid = "main-appid"
app_key = "{ACME_KEY}"
colour = "red"

[tenants.acme.credentials.none]
kind = "v6"

[tenants.default]
appid = "x"
"""


def test_check_prints_the_tenants_and_never_a_secret(tmp_path):
    (tmp_path / "acme.key").write_text(f"{ACME_KEY}\n")
    (tmp_path / "tenants.toml").write_text(GOOD_FILE)
    default, acme, beta = CLIENT_KEYS
    (tmp_path / "keys").write_text(f"{default}\n{acme} acme\n{beta} acme\n")
    env = command_env(
        SOBOT_APPID="main-appid",
        SOBOT_APP_KEY=APP_KEY,
        SOBOT_REGION="sg",
        SOBOT_PROXY_CLIENT_KEYS_FILE="keys",
    )
    result = run_command("check", "--config", "tenants.toml", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("tenants:")
    assert lines[start : start + 4] == [
        "tenants:",
        f"  default  appid main-appid, upstream {MAIN}, credential sets: default; 1 client key",
        "  acme     appid acme-appid, upstream https://us.sobot.com, credential sets: default, "
        "callcenter; 2 client keys",
        f"  beta     appid beta-appid, upstream {MAIN}, credential sets: default; 0 client keys",
    ]
    assert lines[start + 4] == "routes (longest prefix first):"
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr


def test_serve_refuses_a_bad_tenants_file_with_one_line_per_problem(tmp_path):
    (tmp_path / "bad.toml").write_text(BAD_FILE)
    (tmp_path / "keys").write_text(f"{CLIENT_KEYS[0]} nobody\n")
    env = command_env(
        SOBOT_APPID="main-appid",
        SOBOT_APP_KEY=APP_KEY,
        SOBOT_REGION="sg",
        SOBOT_PROXY_CLIENT_KEYS_FILE="keys",
    )
    result = run_command("serve", "--config", "bad.toml", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    error = "sobot-proxy: configuration error: "
    assert result.stderr.splitlines() == [
        f"{error}bad.toml: tenants.acme.colour: unknown key (known: {TENANT_KEYS})",
        f"{error}bad.toml: tenants.acme.appid: the same v5 appid as the default set "
        "(SOBOT_APPID): a client's own get_token could not tell the two apart",
        f"{error}bad.toml: tenants.acme.credentials.none: the name 'none' is reserved (a route "
        "that injects no credential): choose another",
        f"{error}bad.toml: tenants.default: the name 'default' is reserved (the tenant of the "
        "top-level appid and app_key): choose another",
        f"{error}SOBOT_PROXY_CLIENT_KEYS_FILE: keys line 1: names a tenant that is not "
        "configured (tenants: default, acme; names are case-sensitive)",
    ]
    for secret in SECRETS:
        assert secret not in result.stderr
