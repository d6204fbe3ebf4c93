"""Routes and credential sets in the configuration: SOBOT_FORWARD_PREFIXES, the TOML file's
[credentials.NAME] and [[routes]], the route table they make, and every mistake in them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config.routes import (
    DEFAULT_FORWARD_PREFIXES,
    CredentialSettings,
    ResolvedRoute,
    RouteSettings,
)
from proxy.config.settings import ConfigError, Settings, load_settings
from tests.processes import command_env, run_command

APP_KEY = "routes-test-app-key"
V6_SECRET = "routes-test-v6-secret"
ENV = {"SOBOT_APPID": "main-appid", "SOBOT_APP_KEY": APP_KEY, "SOBOT_REGION": "sg"}
MAIN = "https://sg.sobot.io"
CONFIG = "sobot-proxy.toml"  # as given on the command line: problems name it so
FILES = {"v6.secret": f"{V6_SECRET}\n", "empty.secret": " \n"}

CALLCENTER = """
[credentials.callcenter]
kind = "v6"
appid = "cc-appid"
app_key_file = "v6.secret"
"""


def load(
    toml: str,
    env: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
    config: str = CONFIG,
) -> Settings:
    """The pure loader on `toml` as the file `config`, files read from FILES beside it."""
    files = {config: toml, **{str(Path(config).parent / n): t for n, t in FILES.items()}}

    def read_text(path: Path) -> str:
        if str(path) not in files:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return files[str(path)]

    return load_settings({"config": config, **(flags or {})}, env or ENV, read_text=read_text)


def problems_of(toml: str, env: dict[str, str] | None = None, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(toml, env, **kwargs)
    problems = caught.value.problems
    assert all(problem and "\n" not in problem for problem in problems)
    assert not any(APP_KEY in problem or V6_SECRET in problem for problem in problems)
    return problems


# --- what a valid file gives ------------------------------------------------------------------


def test_without_routes_the_forwarded_prefixes_go_to_the_main_upstream_with_default():
    settings = load_settings({}, ENV)
    assert settings.forward_prefixes == DEFAULT_FORWARD_PREFIXES
    assert (settings.credentials, settings.routes) == ((), ())
    assert settings.credential_sets == (CredentialSettings("default", "v5", "main-appid", APP_KEY),)
    assert settings.route_table == (
        ResolvedRoute("/chat-facebook/api/", None, "default"),
        ResolvedRoute("/chat-third/api/", None, "default"),
        ResolvedRoute("/comm-open/api/", None, "default"),
        ResolvedRoute("/api/", None, "default"),
    )


def test_the_worked_example_gives_its_sets_and_routes():
    settings = load(
        CALLCENTER
        + """
upstream = "https://openapi.soboten.com"
authorization_scheme = ""

[credentials.chat-eu]
kind = "v5"
appid = "eu-appid"
app_key = " eu-key "
region = "us"

[[routes]]
prefix = "/callservice/"
credentials = "callcenter"

[[routes]]
prefix = "/text/ai-agent-open/"
upstream = "https://api-c.soboten.com/"

[[routes]]
prefix = "/open/"
region = "cn-soboten"
credentials = "none"
"""
    )
    assert settings.credentials == (
        CredentialSettings(
            "callcenter", "v6", "cc-appid", V6_SECRET, "https://openapi.soboten.com", ""
        ),
        CredentialSettings("chat-eu", "v5", "eu-appid", "eu-key", "https://us.sobot.com"),
    )
    assert [s.name for s in settings.credential_sets] == ["default", "callcenter", "chat-eu"]
    assert settings.routes == (
        RouteSettings("/callservice/", None, "callcenter"),
        RouteSettings("/text/ai-agent-open/", "https://api-c.soboten.com", "default"),
        RouteSettings("/open/", "https://www.soboten.com", None),
    )
    table = {route.prefix: route for route in settings.route_table}
    assert table["/callservice/"] == ResolvedRoute("/callservice/", None, "callcenter")
    assert table["/open/"] == ResolvedRoute("/open/", "https://www.soboten.com", None)
    assert len(table) == len(DEFAULT_FORWARD_PREFIXES) + 3


def test_no_secret_of_any_set_shows_in_the_settings_repr():
    settings = load(CALLCENTER)
    assert settings.credentials[0].secret == V6_SECRET
    assert V6_SECRET not in repr(settings)
    assert V6_SECRET not in repr(settings.credential_sets)
    assert "cc-appid" in repr(settings)


def test_a_route_of_a_forwarded_prefix_replaces_it_and_the_longest_prefix_comes_first():
    settings = load(
        """
forward_prefixes = "/api/,/comm-open/api/"

[[routes]]
prefix = "/api/"
upstream = "https://gateway.example"
credentials = "none"

[[routes]]
prefix = "/api/ws/5/ticket/"

[[routes]]
prefix = "/x/"
"""
    )
    assert settings.route_table == (
        ResolvedRoute("/api/ws/5/ticket/", None, "default"),
        ResolvedRoute("/comm-open/api/", None, "default"),
        ResolvedRoute("/api/", "https://gateway.example", None),
        ResolvedRoute("/x/", None, "default"),
    )


def test_a_relative_app_key_file_is_found_beside_the_toml_file():
    settings = load(CALLCENTER, config="/etc/sobot-proxy/proxy.toml")
    assert settings.credentials[0].secret == V6_SECRET


def test_a_relative_app_key_file_is_found_beside_a_real_toml_file(tmp_path, monkeypatch):
    (tmp_path / "v6.secret").write_text(f"{V6_SECRET}\n")
    config = tmp_path / "sobot-proxy.toml"
    config.write_text(CALLCENTER)
    monkeypatch.chdir("/")
    settings = load_settings({"config": str(config)}, ENV)
    assert settings.credentials[0].secret == V6_SECRET


def test_a_v6_set_may_share_the_default_sets_appid():
    """Kinds differ, so do their tokens and token requests: no clash."""
    settings = load('[credentials.cc]\nkind = "v6"\nappid = "main-appid"\napp_key = "k"\n')
    assert [(s.kind, s.appid) for s in settings.credential_sets] == [
        ("v5", "main-appid"),
        ("v6", "main-appid"),
    ]


def test_a_set_no_route_uses_is_allowed():
    """It is still proven by `sobot-proxy check`; a route may come later."""
    assert load(CALLCENTER).credentials[0].name == "callcenter"


def test_forward_prefixes_may_be_emptied_when_routes_remain():
    settings = load('forward_prefixes = []\n[[routes]]\nprefix = "/callservice/"\n')
    assert settings.route_table == (ResolvedRoute("/callservice/", None, "default"),)


@pytest.mark.parametrize(
    ("region", "base_url"),
    [("cn", "https://www.sobot.com"), ("cn-soboten", "https://www.soboten.com")],
)
def test_the_china_regions(region, base_url):
    assert load_settings({}, {**ENV, "SOBOT_REGION": region}).base_url == base_url
    route = load(f'[[routes]]\nprefix = "/x/"\nregion = "{region}"\n').routes[0]
    assert route.base_url == base_url


def test_plain_http_upstreams_on_this_host_or_when_allowed():
    toml = CALLCENTER + 'upstream = "http://v6.internal"\n'
    toml += '[[routes]]\nprefix = "/x/"\nupstream = "http://gateway.internal"\n'
    allowed = load(toml, flags={"allow_insecure_upstream": True})
    assert allowed.credentials[0].base_url == "http://v6.internal"
    local = load('[[routes]]\nprefix = "/x/"\nupstream = "http://127.0.0.1:8081"\n')
    assert local.routes[0].base_url == "http://127.0.0.1:8081"


# --- SOBOT_FORWARD_PREFIXES -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "winner"),
    [
        (("flag", "env", "toml"), ("/flag/",)),
        (("flag", "toml"), ("/flag/",)),
        (("env", "toml"), ("/env/", "/env2/")),
        (("toml",), ("/toml/",)),
        ((), DEFAULT_FORWARD_PREFIXES),
    ],
)
def test_forward_prefixes_flag_beats_environment_beats_toml_beats_default(layers, winner):
    toml = 'forward_prefixes = ["/toml/"]\n' if "toml" in layers else ""
    env = {**ENV, "SOBOT_FORWARD_PREFIXES": "/env/, /env2/"} if "env" in layers else ENV
    flags = {"forward_prefixes": "/flag/"} if "flag" in layers else {}
    assert load(toml, env, flags=flags).forward_prefixes == winner


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        ("/api/,/api/,/x/", ("/api/", "/x/")),
        (" /api/ , ,/x/y/ ", ("/api/", "/x/y/")),
        ("/", ("/",)),
    ],
)
def test_forward_prefixes_are_comma_separated_with_repeats_folded(given, parsed):
    settings = load_settings({}, {**ENV, "SOBOT_FORWARD_PREFIXES": given})
    assert settings.forward_prefixes == parsed


def test_forward_prefixes_as_a_toml_list_or_string():
    assert load('forward_prefixes = ["/a/", "/b/", "/a/"]\n').forward_prefixes == ("/a/", "/b/")
    assert load('forward_prefixes = "/a/,/b/"\n').forward_prefixes == ("/a/", "/b/")


SHOULD_START_AND_END = "must start and end with / (such as /callservice/)"
NOT_A_PREFIX = (
    "is not a path prefix: its segments must be letters, digits and -._~, none of them empty or "
    "only dots"
)


@pytest.mark.parametrize(
    ("flags", "env", "toml", "problem"),
    [
        (
            {},
            {"SOBOT_FORWARD_PREFIXES": "api/"},
            "",
            f"SOBOT_FORWARD_PREFIXES: 'api/' {SHOULD_START_AND_END}",
        ),
        (
            {"forward_prefixes": "/api"},
            {},
            "",
            f"--forward-prefixes: '/api' {SHOULD_START_AND_END}",
        ),
        (
            {},
            {},
            'forward_prefixes = ["/a//b/"]',
            f"{CONFIG}: forward_prefixes: '/a//b/' {NOT_A_PREFIX}",
        ),
        (
            {},
            {"SOBOT_FORWARD_PREFIXES": "/../"},
            "",
            f"SOBOT_FORWARD_PREFIXES: '/../' {NOT_A_PREFIX}",
        ),
        (
            {},
            {"SOBOT_FORWARD_PREFIXES": "/a%2f/"},
            "",
            f"SOBOT_FORWARD_PREFIXES: '/a%2f/' {NOT_A_PREFIX}",
        ),
        (
            {},
            {"SOBOT_FORWARD_PREFIXES": "/a b/"},
            "",
            f"SOBOT_FORWARD_PREFIXES: '/a b/' {NOT_A_PREFIX}",
        ),
        (
            {},
            {},
            "forward_prefixes = []",
            f"{CONFIG}: forward_prefixes: no path would be forwarded: list a prefix, or add "
            "[[routes]]",
        ),
        (
            {"forward_prefixes": ","},
            {},
            'forward_prefixes = ["/api/"]',
            "--forward-prefixes: no path would be forwarded: list a prefix, or add [[routes]]",
        ),
    ],
    ids=[
        "env",
        "flag",
        "toml-empty-segment",
        "dot-segment",
        "encoded",
        "space",
        "none-in-toml",
        "none-by-flag",
    ],
)
def test_a_bad_forward_prefix_is_one_line(flags, env, toml, problem):
    assert problems_of(toml, {**ENV, **env}, flags=flags) == [problem]


# --- every mistake in [credentials.NAME] and [[routes]] -----------------------------------------

V6 = '[credentials.cc]\nkind = "v6"\nappid = "cc-appid"\n'
WITH_KEY = V6 + f'app_key = "{V6_SECRET}"\n'
IN_CLEAR = (
    "is plain http and not on this host: the token would cross the network in clear; use https, "
    "or set SOBOT_ALLOW_INSECURE_UPSTREAM=1 (--allow-insecure-upstream)"
)
SET_KEYS = "kind, appid, app_key, app_key_file, upstream, region, authorization_scheme"
REGIONS = "sg, us, cn, cn-soboten"

# (the TOML file, the one problem line it gives, without the leading "sobot-proxy.toml: ")
MISTAKES = [
    pytest.param(
        f'[credentials.cc]\nappid = "a"\napp_key = "{V6_SECRET}"\n',
        "credentials.cc.kind: is required",
        id="set-without-kind",
    ),
    pytest.param(
        WITH_KEY.replace('"v6"', '"v7"'),
        "credentials.cc.kind: 'v7' is not one of v5, v6",
        id="set-unknown-kind",
    ),
    pytest.param(
        f'[credentials.cc]\nkind = "v6"\napp_key = "{V6_SECRET}"\n',
        "credentials.cc.appid: is required",
        id="set-without-appid",
    ),
    pytest.param(
        WITH_KEY.replace('"cc-appid"', '" "'),
        "credentials.cc.appid: must be a non-empty string",
        id="set-empty-appid",
    ),
    pytest.param(
        V6,
        "credentials.cc: set app_key or app_key_file (for v6: the app_secret)",
        id="v6-set-without-secret",
    ),
    pytest.param(
        WITH_KEY + 'app_key_file = "v6.secret"\n',
        "credentials.cc: set only one of app_key and app_key_file",
        id="set-with-both-secrets",
    ),
    pytest.param(
        V6 + 'app_key = "  "\n',
        "credentials.cc.app_key: must be a non-empty string",
        id="set-empty-secret",
    ),
    pytest.param(
        V6 + 'app_key_file = "missing.secret"\n',
        "credentials.cc.app_key_file: cannot read missing.secret (No such file or directory)",
        id="set-secret-file-missing",
    ),
    pytest.param(
        V6 + 'app_key_file = "empty.secret"\n',
        "credentials.cc.app_key_file: empty.secret is empty",
        id="set-secret-file-empty",
    ),
    pytest.param(
        WITH_KEY + 'upstream = "https://a.example"\nregion = "sg"\n',
        "credentials.cc: set only one of upstream and region",
        id="set-upstream-and-region",
    ),
    pytest.param(
        WITH_KEY + 'upstream = "ftp://a.example"\n',
        "credentials.cc.upstream: 'ftp://a.example' is not an http(s) URL with a host",
        id="set-bad-upstream",
    ),
    pytest.param(
        WITH_KEY + 'upstream = "https://user:pw@a.example"\n',
        "credentials.cc.upstream: the URL must not carry credentials",
        id="set-upstream-with-credentials",
    ),
    pytest.param(
        WITH_KEY + 'upstream = "http://v6.example.com/"\n',
        f"credentials.cc.upstream: http://v6.example.com {IN_CLEAR}",
        id="set-plain-http-upstream",
    ),
    pytest.param(
        WITH_KEY + 'region = "mars"\n',
        f"credentials.cc.region: 'mars' is not one of {REGIONS}",
        id="set-unknown-region",
    ),
    pytest.param(
        WITH_KEY.replace('"v6"', '"v5"') + 'authorization_scheme = "Bearer"\n',
        "credentials.cc.authorization_scheme: only a v6 set takes it (a v5 token goes in the "
        "`token` header)",
        id="v5-set-with-authorization-scheme",
    ),
    pytest.param(
        WITH_KEY + 'authorization_scheme = "Bear er"\n',
        "credentials.cc.authorization_scheme: 'Bear er' is not an authorization scheme (a word "
        'such as Bearer, or "" to send the bare token)',
        id="bad-authorization-scheme",
    ),
    pytest.param(
        WITH_KEY + "authorization_scheme = 1\n",
        "credentials.cc.authorization_scheme: 1 is not an authorization scheme (a word such as "
        'Bearer, or "" to send the bare token)',
        id="authorization-scheme-not-a-string",
    ),
    pytest.param(
        WITH_KEY + f'app_secret = "{V6_SECRET}"\n',
        f"credentials.cc.app_secret: unknown key (known: {SET_KEYS})",
        id="set-unknown-key",
    ),
    pytest.param(
        WITH_KEY.replace("credentials.cc", 'credentials."call centre"'),
        'credentials."call centre": a credential set\'s name is letters, digits, _ and - only',
        id="set-bad-name",
    ),
    pytest.param(
        WITH_KEY.replace("credentials.cc", "credentials.default"),
        "credentials.default: the name 'default' is reserved (the set of SOBOT_APPID and "
        "SOBOT_APP_KEY): choose another",
        id="set-named-default",
    ),
    pytest.param(
        WITH_KEY.replace("credentials.cc", "credentials.None"),
        "credentials.None: the name 'None' is reserved (a route that injects no credential): "
        "choose another",
        id="set-named-none",
    ),
    pytest.param(
        'credentials = "cc"\n',
        "credentials: must be tables of credential sets ([credentials.NAME])",
        id="credentials-not-a-table",
    ),
    pytest.param(
        '[credentials]\ncc = "v6"\n',
        "credentials.cc: must be a table ([credentials.cc] with kind, appid, ...)",
        id="set-not-a-table",
    ),
    pytest.param(
        '[credentials.cc]\nkind = "v5"\nappid = "main-appid"\napp_key = "k"\n',
        "credentials.cc.appid: the same v5 appid as the default set (SOBOT_APPID): two sets of "
        "one appid would rotate each other's token",
        id="v5-set-of-the-default-appid",
    ),
    pytest.param(
        WITH_KEY + WITH_KEY.replace("credentials.cc", "credentials.cc2"),
        "credentials.cc2.appid: the same v6 appid as credentials.cc: two sets of one appid "
        "would rotate each other's token",
        id="two-v6-sets-of-one-appid",
    ),
    pytest.param(
        '[[routes]]\ncredentials = "none"\n',
        "routes[1].prefix: is required",
        id="route-without-prefix",
    ),
    pytest.param(
        '[[routes]]\nprefix = "callservice/"\n',
        f"routes[1].prefix: 'callservice/' {SHOULD_START_AND_END}",
        id="route-prefix-without-leading-slash",
    ),
    pytest.param(
        '[[routes]]\nprefix = "/a/"\n[[routes]]\nprefix = "/callservice"\n',
        f"routes[2].prefix: '/callservice' {SHOULD_START_AND_END}",
        id="route-prefix-without-trailing-slash",
    ),
    pytest.param(
        '[[routes]]\nprefix = "/a/./b/"\n',
        f"routes[1].prefix: '/a/./b/' {NOT_A_PREFIX}",
        id="route-prefix-dot-segment",
    ),
    pytest.param(
        "[[routes]]\nprefix = 5\n",
        "routes[1].prefix: 5 is not a path prefix (a string such as /callservice/)",
        id="route-prefix-not-a-string",
    ),
    pytest.param(
        '[[routes]]\nprefix = "/x/"\n[[routes]]\nprefix = "/y/"\n[[routes]]\nprefix = "/x/"\n',
        "routes[3].prefix: '/x/' is also the prefix of routes[1]",
        id="same-prefix-twice",
    ),
    pytest.param(
        '[[routes]]\nprefix = "/x/"\ncredentials = "callcentre"\n',
        "routes[1].credentials: 'callcentre' is not a credential set (known: default, none)",
        id="route-unknown-credentials",
    ),
    pytest.param(
        WITH_KEY + '[[routes]]\nprefix = "/x/"\ncredentials = "None"\n',
        "routes[1].credentials: 'None' is not a credential set (known: default, none, cc)",
        id="route-credentials-wrong-case",
    ),
    pytest.param(
        '[[routes]]\nprefix = "/x/"\ncredentials = 1\n',
        "routes[1].credentials: 1 is not a credential set (known: default, none)",
        id="route-credentials-not-a-string",
    ),
    pytest.param(
        '[[routes]]\nprefix = "/x/"\nupstream = "https://a.example"\nregion = "us"\n',
        "routes[1]: set only one of upstream and region",
        id="route-upstream-and-region",
    ),
    pytest.param(
        '[[routes]]\nprefix = "/x/"\nupstream = "https://a.example/?q"\n',
        "routes[1].upstream: 'https://a.example/?q' must not carry a query or fragment",
        id="route-bad-upstream",
    ),
    pytest.param(
        '[[routes]]\nprefix = "/x/"\nupstream = "http://gateway.example"\n',
        f"routes[1].upstream: http://gateway.example {IN_CLEAR}",
        id="route-plain-http-upstream",
    ),
    pytest.param(
        '[[routes]]\nprefix = "/x/"\nregion = "eu"\n',
        f"routes[1].region: 'eu' is not one of {REGIONS}",
        id="route-unknown-region",
    ),
    pytest.param(
        '[[routes]]\nprefix = "/x/"\npath = "/y/"\n',
        "routes[1].path: unknown key (known: prefix, upstream, region, credentials)",
        id="route-unknown-key",
    ),
    pytest.param(
        '[routes]\nprefix = "/x/"\n',
        "routes: must be an array of tables ([[routes]])",
        id="routes-not-an-array",
    ),
    pytest.param(
        'routes = ["/x/"]\n',
        "routes[1]: must be a table ([[routes]] with a prefix)",
        id="route-not-a-table",
    ),
]


@pytest.mark.parametrize(("toml", "problem"), MISTAKES)
def test_each_mistake_is_one_line_naming_the_file_and_the_key(toml, problem):
    assert problems_of(toml) == [f"{CONFIG}: {problem}"]


def test_a_route_naming_a_set_with_a_mistake_is_not_a_second_problem():
    problems = problems_of(V6 + '[[routes]]\nprefix = "/x/"\ncredentials = "cc"\n')
    assert problems == [
        f"{CONFIG}: credentials.cc: set app_key or app_key_file (for v6: the app_secret)"
    ]


def test_every_mistake_is_listed_together_with_the_other_settings():
    toml = (
        'port = "abc"\n'
        f'[credentials.cc]\nkind = "v9"\napp_key = "{V6_SECRET}"\nsecret = "{V6_SECRET}"\n'
        '[[routes]]\nprefix = "x"\n[[routes]]\nprefix = "/y/"\ncredentials = "nobody"\n'
    )
    problems = problems_of(toml, {**ENV, "SOBOT_FORWARD_PREFIXES": "api"})
    assert problems == [
        f"SOBOT_FORWARD_PREFIXES: 'api' {SHOULD_START_AND_END}",
        f"{CONFIG}: port: 'abc' is not a port number (0-65535; 0 picks a free port)",
        f"{CONFIG}: credentials.cc.secret: unknown key (known: {SET_KEYS})",
        f"{CONFIG}: credentials.cc.kind: 'v9' is not one of v5, v6",
        f"{CONFIG}: credentials.cc.appid: is required",
        f"{CONFIG}: routes[1].prefix: 'x' {SHOULD_START_AND_END}",
        f"{CONFIG}: routes[2].credentials: 'nobody' is not a credential set (known: default, "
        "none, cc)",
    ]


def test_tables_are_known_to_the_unknown_key_check():
    problems = problems_of('colour = "blue"\n')
    assert problems[0].startswith(f"config file {CONFIG}: unknown setting 'colour' (known: ")
    assert "credentials" in problems[0]
    assert "routes" in problems[0]


# --- on a real process ------------------------------------------------------------------------

BAD_FILE = f"""
[credentials.callcenter]
kind = "v6"
appid = "cc-appid"
app_key = "{V6_SECRET}"
authorization_scheme = "Bear er"

[credentials.default]
kind = "v5"

[[routes]]
prefix = "/callservice/"
credentials = "callcenter"

[[routes]]
prefix = "/callservice/"

[[routes]]
prefix = "text/ai-agent-open/"
upstream = "http://sobot.example.com"
credentials = "agent"
"""


def test_serve_refuses_a_bad_routes_file_with_one_line_per_problem(tmp_path):
    (tmp_path / "bad.toml").write_text(BAD_FILE)
    env = command_env(SOBOT_APPID="main-appid", SOBOT_APP_KEY=APP_KEY, SOBOT_REGION="sg")
    result = run_command("serve", "--config", "bad.toml", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    error = "sobot-proxy: configuration error: bad.toml: "
    assert result.stderr.splitlines() == [
        f"{error}credentials.callcenter.authorization_scheme: 'Bear er' is not an authorization "
        'scheme (a word such as Bearer, or "" to send the bare token)',
        f"{error}credentials.default: the name 'default' is reserved (the set of SOBOT_APPID and "
        "SOBOT_APP_KEY): choose another",
        f"{error}routes[2].prefix: '/callservice/' is also the prefix of routes[1]",
        f"{error}routes[3].prefix: 'text/ai-agent-open/' {SHOULD_START_AND_END}",
        f"{error}routes[3].upstream: http://sobot.example.com {IN_CLEAR}",
        f"{error}routes[3].credentials: 'agent' is not a credential set (known: default, none, "
        "callcenter)",
    ]
    assert V6_SECRET not in result.stderr


def test_allow_paths_and_metrics_routes_apply_under_every_route():
    env = {
        **ENV,
        "SOBOT_ALLOW_PATHS": "/callservice/v6/,/api/5/user/",
        "SOBOT_METRICS_ROUTES": "/text/ai-agent-open/ask/",
    }
    settings = load_settings({}, env)
    assert settings.allow_paths == ("/callservice/v6/", "/api/5/user/")
    assert settings.metrics_routes == ("/text/ai-agent-open/ask/",)


def test_repeats_are_found_among_sets_and_routes_with_other_mistakes_too():
    """One run lists every problem: a set or a route with a mistake is still compared."""
    toml = (
        '[credentials.cc]\nkind = "v6"\nappid = "same"\n'  # no secret
        f'[credentials.cc3]\nkind = "v6"\nappid = "same"\napp_key = "{V6_SECRET}"\n'
        '[[routes]]\nprefix = "/a/"\n'
        '[[routes]]\nprefix = "/b/"\nupstream = "http://sobot.example"\n'  # plain http
        '[[routes]]\nprefix = "/b/"\n'
    )
    problems = problems_of(toml)
    assert (
        f"{CONFIG}: credentials.cc3.appid: the same v6 appid as credentials.cc: two sets of "
        "one appid would rotate each other's token" in problems
    )
    assert f"{CONFIG}: routes[3].prefix: '/b/' is also the prefix of routes[2]" in problems
    assert len(problems) == 4, problems  # and the missing secret, and the plain http


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("x = [\n", "not valid TOML (Invalid value (at end of document))"),
        (None, "cannot be read (No such file or directory)"),
    ],
    ids=["not-toml", "missing"],
)
def test_check_reports_a_file_it_cannot_parse_in_one_line_and_nothing_it_would_have_set(
    tmp_path, content, problem
):
    """The appid, app_key and upstream the file would have set are not follow-on problems."""
    if content is not None:
        (tmp_path / "broken.toml").write_text(content)
    result = run_command("check", "--config", "broken.toml", cwd=tmp_path, env=command_env())
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"sobot-proxy: configuration error: config file broken.toml: {problem}")
