"""The README, the example configuration and the settings code list the same settings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from proxy.config.settings import CONFIG_ENV, OPTIONS, SECRETS, TOML_KEYS

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
