"""The README, the example configuration and the settings code list the same settings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from proxy.config.routes import DEFAULT_FORWARD_PREFIXES, ResolvedRoute
from proxy.config.settings import CONFIG_ENV, OPTIONS, SECRETS, TOML_KEYS, load_settings
from proxy.config.tenants import TENANT_KEYS
from proxy.config.toml_routes import CREDENTIAL_KEYS, ROUTE_KEYS
from proxy.config.values import REGIONS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLE_ENV = (ROOT / "config" / "example.env").read_text()
EXAMPLE_TOML = (ROOT / "config" / "sobot-proxy.example.toml").read_text()
ENV_NAMES = sorted(
    {o.env for o in OPTIONS} | {n for s in SECRETS for n in (s.env, s.file_env)} | {CONFIG_ENV}
)


@pytest.mark.parametrize("name", ENV_NAMES)
def test_every_environment_variable_is_documented(name):
    assert re.search(rf"`{name}[`=]", README), name
    assert re.search(rf"^#? ?{name}=", EXAMPLE_ENV, re.MULTILINE), name


def test_example_env_names_nothing_unknown():
    names = set(re.findall(r"^#? ?(SOBOT_[A-Z_]+)=", EXAMPLE_ENV, re.MULTILINE))
    assert names == set(ENV_NAMES)


@pytest.mark.parametrize("key", sorted(TOML_KEYS))
def test_every_toml_key_is_in_the_example_file(key):
    assert re.search(rf"^#? ?{key} = ", EXAMPLE_TOML, re.MULTILINE), key
    assert f"`{key}`" in README


def test_the_example_toml_parses_and_uses_only_known_keys():
    assert set(tomllib.loads(EXAMPLE_TOML)) <= TOML_KEYS


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.flag], ids=lambda o: o.name)
def test_every_flag_is_in_the_readme_table(option):
    assert f"`{option.flag}`" in README


@pytest.mark.parametrize("region", sorted(REGIONS))
def test_every_region_is_documented_with_its_url(region):
    for text in (README, EXAMPLE_ENV, EXAMPLE_TOML):
        assert re.search(rf"\b{region}\b`? = {REGIONS[region]}\b", text.replace('"', "")), region


ROUTES_EXAMPLE = "# --- Routes and credentials"
TENANTS_EXAMPLE = "# --- Tenants"


def uncommented(example: str) -> list[str]:
    """The example's lines as an operator would uncomment them: lines commented once are the
    example; twice, alternatives to it."""
    return [
        line.removeprefix("# ") for line in example.splitlines() if re.match(r"# (\[|\w+ = )", line)
    ]


@pytest.mark.parametrize("key", sorted({*CREDENTIAL_KEYS, *ROUTE_KEYS}))
def test_every_key_of_a_credential_set_or_route_is_in_the_example_file(key):
    example = EXAMPLE_TOML.split(ROUTES_EXAMPLE, 1)[1].split(TENANTS_EXAMPLE, 1)[0]
    assert re.search(rf"^#( #)? {key} = ", example, re.MULTILINE), key


def test_the_example_routes_load_as_an_operator_would_uncomment_them():
    settings_part, routes_part = EXAMPLE_TOML.split(ROUTES_EXAMPLE, 1)
    routes_part = routes_part.split(TENANTS_EXAMPLE, 1)[0]
    files = {
        "/etc/sobot-proxy/sobot-proxy.toml": settings_part + "\n".join(uncommented(routes_part)),
        "/run/secrets/sobot_app_key": "app-key\n",
        "/run/secrets/sobot_v6_app_secret": "v6-app-secret\n",
    }
    settings = load_settings(
        {"config": "/etc/sobot-proxy/sobot-proxy.toml"}, {}, read_text=lambda p: files[str(p)]
    )
    (callcenter,) = settings.credentials
    assert (callcenter.name, callcenter.kind, callcenter.secret) == (
        "callcenter",
        "v6",
        "v6-app-secret",
    )
    routes = {route.prefix: route for route in settings.route_table}
    # None: the main upstream of the tenant that asks
    assert routes["/callservice/"] == ResolvedRoute("/callservice/", None, "callcenter")
    assert routes["/text/ai-agent-open/"] == ResolvedRoute(
        "/text/ai-agent-open/", "https://api-c.soboten.com", "default"
    )
    assert set(routes) == {*DEFAULT_FORWARD_PREFIXES, "/callservice/", "/text/ai-agent-open/"}


def readme_section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


@pytest.mark.parametrize("key", sorted({*CREDENTIAL_KEYS, *ROUTE_KEYS}))
def test_every_key_of_a_credential_set_or_route_is_in_the_readme(key):
    assert re.search(rf"^#? ?{key} = ", readme_section("Routes and credentials"), re.MULTILINE), key


def test_the_readmes_routes_example_loads(tmp_path):
    """The worked example in "Routes and credentials" is a configuration the loader takes."""
    section = readme_section("Routes and credentials")
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    for name in ("sobot_app_key", "sobot_v6_secret"):
        (tmp_path / name).write_text("a-secret-0123456789\n")
    example = example.replace("/run/secrets/", f"{tmp_path}/")
    (tmp_path / "sobot-proxy.toml").write_text(example)
    settings = load_settings({"config": str(tmp_path / "sobot-proxy.toml")}, {})
    assert [config.name for config in settings.credential_sets] == ["default", "callcenter"]
    table = {
        route.prefix: (route.upstream(settings.base_url), route.credentials)
        for route in settings.route_table
    }
    assert table["/callservice/"] == ("https://sg.sobot.io", "callcenter")
    assert table["/text/ai-agent-open/"] == ("https://api-c.soboten.com", "default")
    assert set(DEFAULT_FORWARD_PREFIXES) < set(table)


@pytest.mark.parametrize("key", TENANT_KEYS)
def test_every_key_of_a_tenant_is_in_the_example_file_and_the_readme(key):
    example = EXAMPLE_TOML.split(TENANTS_EXAMPLE, 1)[1]
    assert re.search(rf"^#( #)? (\[tenants\.acme\.)?{key}( = |\.)", example, re.MULTILINE), key
    assert f"`{key}`" in readme_section("Tenants"), key


def test_the_example_tenant_loads_as_an_operator_would_uncomment_it():
    settings_part, tenants_part = EXAMPLE_TOML.split(TENANTS_EXAMPLE, 1)
    files = {
        "/etc/sobot-proxy/sobot-proxy.toml": settings_part + "\n".join(uncommented(tenants_part)),
        "/run/secrets/sobot_app_key": "app-key\n",
        "/run/secrets/acme_app_key": "acme-app-key\n",
        "/run/secrets/acme_v6_app_secret": "acme-v6-app-secret\n",
    }
    settings = load_settings(
        {"config": "/etc/sobot-proxy/sobot-proxy.toml"}, {}, read_text=lambda p: files[str(p)]
    )
    (acme,) = settings.tenants
    assert (acme.name, acme.appid, acme.app_key, acme.base_url) == (
        "acme",
        "acme-appid",
        "acme-app-key",
        REGIONS["us"],
    )
    assert [(s.name, s.kind, s.secret) for s in acme.credentials] == [
        ("callcenter", "v6", "acme-v6-app-secret")
    ]


def test_the_readmes_tenants_example_loads(tmp_path):
    section = readme_section("Tenants")
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    for name in ("acme_app_key", "acme_v6_secret"):
        (tmp_path / name).write_text("a-secret-0123456789\n")
    (tmp_path / "sobot-proxy.toml").write_text(example.replace("/run/secrets/", f"{tmp_path}/"))
    env = {"SOBOT_APPID": "main-appid", "SOBOT_APP_KEY": "k", "SOBOT_REGION": "sg"}
    settings = load_settings({"config": str(tmp_path / "sobot-proxy.toml")}, env)
    assert [tenant.name for tenant in settings.all_tenants] == ["default", "acme"]
    assert [config.name for config in settings.all_tenants[1].credential_sets] == [
        "default",
        "callcenter",
    ]
