"""Reloading, the configuration side (proxy/config/reload.py), on real files: secrets read
again from their files, what needs a restart, what a reload applies, and the file watch
(rewritten in place, renamed over, touched, swapped by Kubernetes through `..data`, deleted)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from proxy.config.reload import (
    FileWatch,
    applied,
    reread_secrets,
    restart_needed,
    watched_files,
)
from proxy.config.settings import ConfigError, Settings, load_settings

APP_KEY = "reload-test-app-key"
ACME_KEY = "reload-test-acme-app-key"
ACME_V6 = "reload-test-acme-v6-secret"
REDIS_PASSWORD = "reload-test-redis-password"
CLIENT_KEYS = ("reload-client-key-default-01", "reload-client-key-acme-0002")
SECRETS = (APP_KEY, ACME_KEY, ACME_V6, REDIS_PASSWORD, *CLIENT_KEYS)

TOML = """
appid = "main-appid"
app_key_file = "app.key"
region = "sg"
client_keys_file = "client.keys"
token_store = "redis://127.0.0.1:6379/0"
token_store_password_file = "redis.password"

[credentials.inline]
kind = "v6"
appid = "inline-v6-appid"
app_key = "reload-test-inline-v6-secret"

[tenants.acme]
appid = "acme-appid"
app_key_file = "acme.key"
region = "us"

[tenants.acme.credentials.callcenter]
kind = "v6"
appid = "acme-cc-appid"
app_key_file = "acme_v6.secret"

[[routes]]
prefix = "/callservice/"
upstream = "https://sg.sobot.io"
credentials = "callcenter"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A TOML file and its secret files in tmp_path; the one configuration these tests load."""
    files = {
        "sobot-proxy.toml": TOML,
        "app.key": f"{APP_KEY}\n",
        "acme.key": f"{ACME_KEY}\n",
        "acme_v6.secret": f"{ACME_V6}\n",
        "redis.password": f"{REDIS_PASSWORD}\n",
        "client.keys": f"{CLIENT_KEYS[0]}\n{CLIENT_KEYS[1]} acme\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path / "sobot-proxy.toml"


def load(config: Path, **flags: object) -> Settings:
    return load_settings({"config": str(config), **flags}, {})


def tenant(settings: Settings, name: str) -> dict[str, str]:
    """A tenant's sets: name -> secret."""
    [found] = [t for t in settings.all_tenants if t.name == name]
    return {config.name: config.secret for config in found.credential_sets}


def problems_of(settings: Settings) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        reread_secrets(settings)
    problems = caught.value.problems
    assert not any(secret in problem for problem in problems for secret in SECRETS)
    return problems


# --- reread_secrets ---------------------------------------------------------------------------


def test_a_rotated_key_of_a_named_tenants_v6_set_is_read_again(config):
    settings = load(config)
    (config.parent / "acme_v6.secret").write_text("reload-test-acme-v6-rotated\n")
    reread = reread_secrets(settings)
    assert tenant(reread, "acme") == {
        "default": ACME_KEY,
        "callcenter": "reload-test-acme-v6-rotated",
    }
    # Nothing else moved: only that secret.
    assert reread == dataclasses.replace(
        settings,
        tenants=(
            dataclasses.replace(
                settings.tenants[0],
                credentials=(
                    dataclasses.replace(
                        settings.tenants[0].credentials[0], secret="reload-test-acme-v6-rotated"
                    ),
                ),
            ),
        ),
    )


def test_every_file_is_read_again_and_inline_secrets_stay(config):
    settings = load(config)
    (config.parent / "app.key").write_text("rotated-app-key")
    (config.parent / "acme.key").write_text("rotated-acme-key")
    (config.parent / "redis.password").write_text("rotated-redis-password\n")
    reread = reread_secrets(settings)
    assert tenant(reread, "default") == {
        "default": "rotated-app-key",
        "inline": "reload-test-inline-v6-secret",
    }
    assert reread.app_key == "rotated-app-key"
    assert tenant(reread, "acme")["default"] == "rotated-acme-key"
    assert reread.token_store_password == "rotated-redis-password"


def test_a_rewritten_client_keys_file_brings_new_keys_and_bindings(config):
    settings = load(config)
    assert settings.client_key_bindings == ((CLIENT_KEYS[0], "default"), (CLIENT_KEYS[1], "acme"))
    (config.parent / "client.keys").write_text(
        f"# rotated\n{CLIENT_KEYS[1]} acme\nreload-client-key-new-000003 acme\n"
    )
    assert reread_secrets(settings).client_key_bindings == (
        (CLIENT_KEYS[1], "acme"),
        ("reload-client-key-new-000003", "acme"),
    )


def test_client_keys_all_of_default_keep_no_tenants(config):
    settings = load(config)
    (config.parent / "client.keys").write_text("reload-client-key-only-default\n")
    reread = reread_secrets(settings)
    assert reread.client_key_tenants == ()
    assert reread == load(config)


def test_without_secret_files_nothing_is_read(tmp_path):
    settings = load_settings(
        {}, {"SOBOT_APPID": "a", "SOBOT_APP_KEY": APP_KEY, "SOBOT_REGION": "sg"}
    )
    assert watched_files(settings) == ()
    assert reread_secrets(settings) == settings


def test_problems_are_one_line_each_naming_the_setting_and_the_file(config):
    settings = load(config)
    folder = config.parent
    (folder / "app.key").unlink()
    (folder / "acme_v6.secret").write_text("  \n")
    (folder / "redis.password").write_bytes(b"\xff\xfe not UTF-8")
    (folder / "client.keys").write_text(f"{CLIENT_KEYS[0]} nobody\n")
    problems = problems_of(settings)
    expected = [
        f"app_key_file: cannot read {folder}/app.key (No such file or directory)",
        f"tenants.acme.credentials.callcenter.app_key_file: {folder}/acme_v6.secret is empty",
        f"token_store_password_file: cannot read {folder}/redis.password (not text)",
        f"client_keys_file: {folder}/client.keys line 1: names a tenant that is not configured "
        "(tenants: default, acme; names are case-sensitive)",
    ]
    assert problems == expected


def test_an_empty_client_keys_file_and_an_unreadable_key_file(config):
    settings = load(config)
    (config.parent / "client.keys").write_text("# all keys withdrawn\n\n")
    (config.parent / "acme.key").unlink()
    (config.parent / "acme.key").mkdir()  # there, but not a file
    assert problems_of(settings) == [
        f"tenants.acme.app_key_file: cannot read {config.parent}/acme.key (Is a directory)",
        f"client_keys_file: {config.parent}/client.keys is empty",
    ]


# --- restart_needed and applied ---------------------------------------------------------------


def test_tenant_key_and_password_changes_need_no_restart(config):
    old = load(config)
    folder = config.parent
    (folder / "client.keys").write_text(f"{CLIENT_KEYS[0]} beta\n")
    (folder / "redis.password").write_text("another-password")
    (folder / "app.key").write_text("another-app-key")
    config.write_text(
        TOML.replace('region = "sg"', 'region = "us"')
        .replace('appid = "main-appid"', 'appid = "main-appid-2"')
        .replace('appid = "acme-cc-appid"', 'appid = "acme-cc-appid-2"')
        + '\n[tenants.beta]\nappid = "beta-appid"\napp_key = "beta-key"\n'
    )
    new = load(config)
    assert new != old
    assert restart_needed(old, new) == []
    assert applied(old, new) == new


@pytest.mark.parametrize(
    ("flags", "toml", "names"),
    [
        ({"port": 9000}, TOML, ["port"]),
        ({"host": "127.0.0.2", "workers": 2}, TOML, ["host", "workers"]),
        ({}, TOML.replace('prefix = "/callservice/"', 'prefix = "/callservice/v6/"'), ["routes"]),
        ({"forward_prefixes": "/api/"}, TOML, ["forward_prefixes"]),
        ({}, TOML.replace("6379/0", "6379/1"), ["token_store"]),
        ({"upstream_timeout": 5, "log_level": "debug"}, TOML, ["upstream_timeout", "log_level"]),
        (
            {},
            TOML.replace('client_keys_file = "client.keys"', ""),
            ["client_keys"],
        ),
    ],
)
def test_other_changes_are_named_and_not_applied(config, flags, toml, names):
    old = load(config)
    config.write_text(toml)
    (config.parent / "acme.key").write_text("rotated-acme-key")
    new = load(config, **flags)
    assert restart_needed(old, new) == names
    result = applied(old, new)
    # What needs a restart stays as it was; the rotated key is taken.
    assert restart_needed(old, result) == []
    assert tenant(result, "acme")["default"] == "rotated-acme-key"
    assert result.client_keys == old.client_keys  # never switched off by a reload


def test_client_keys_switched_on_need_a_restart(tmp_path):
    env = {"SOBOT_APPID": "a", "SOBOT_APP_KEY": APP_KEY, "SOBOT_REGION": "sg"}
    without = load_settings({}, env)
    with_keys = load_settings({}, {**env, "SOBOT_PROXY_CLIENT_KEYS": CLIENT_KEYS[0]})
    assert restart_needed(without, with_keys) == ["client_keys"]
    assert applied(without, with_keys) == without


def test_kept_routes_naming_a_set_no_tenant_has_any_more_fail_the_reload(config):
    """The routes need a restart, so they stay; the sets are applied: a route left naming a set
    no tenant has would be a start-up error, so the reload is one too."""
    old = load(config)
    without_acme = TOML.split("[tenants.acme]")[0]  # acme and its callcenter gone, routes too
    config.write_text(without_acme)
    (config.parent / "client.keys").write_text(f"{CLIENT_KEYS[0]}\n")
    new = load(config)
    assert restart_needed(old, new) == ["routes"]
    with pytest.raises(ConfigError) as raised:
        applied(old, new)
    [problem] = raised.value.problems
    assert problem.startswith("routes (prefix '/callservice/').credentials: 'callcenter' is not")
    assert "until a restart" in problem


def test_a_plain_http_tenant_needs_the_running_proxy_to_allow_it(config):
    """allow_insecure_upstream changes only at a restart: a reload turning it on must not bring
    in a tenant on plain http off this host under the running proxy, which refuses those."""
    old = load(config)
    insecure = TOML.replace('region = "us"', 'base_url = "http://sobot.example.com"')
    config.write_text("allow_insecure_upstream = true\n" + insecure)
    new = load(config)
    assert restart_needed(old, new) == ["allow_insecure_upstream"]
    with pytest.raises(ConfigError) as raised:
        applied(old, new)
    assert raised.value.problems == [
        "acme/default: the upstream http://sobot.example.com is plain http and not on this "
        "host, and allow_insecure_upstream is off in the running proxy (it changes only at a "
        "restart)",
        "acme/callcenter: the upstream http://sobot.example.com is plain http and not on this "
        "host, and allow_insecure_upstream is off in the running proxy (it changes only at a "
        "restart)",
    ]


def test_a_redis_password_file_rewritten_too_short_is_refused(config):
    """As the loader refuses it: the logs could not hide so short a password."""
    running = load(config)
    (config.parent / "redis.password").write_text("short\n")
    with pytest.raises(ConfigError) as raised:
        reread_secrets(running)
    assert raised.value.problems == [
        "token_store_password_file: the password is shorter than 8 characters, too short for "
        "the logs to hide; use a long random one"
    ]


def test_applied_takes_a_file_that_moved(config):
    old = load(config)
    (config.parent / "moved.key").write_text("moved-acme-key")
    config.write_text(TOML.replace('app_key_file = "acme.key"', 'app_key_file = "moved.key"'))
    new = load(config)
    assert restart_needed(old, new) == []
    assert str(config.parent / "moved.key") in watched_files(applied(old, new))


# --- watched_files ----------------------------------------------------------------------------


def test_watched_files_are_every_secret_file_once_in_order(config):
    folder = config.parent
    config.write_text(TOML + '\n[tenants.beta]\nappid = "beta-appid"\napp_key_file = "acme.key"\n')
    assert watched_files(load(config)) == tuple(
        str(folder / name)
        for name in ("app.key", "acme.key", "acme_v6.secret", "client.keys", "redis.password")
    )


# --- FileWatch --------------------------------------------------------------------------------


def long_ago(path: Path) -> None:
    """Date the file an hour back: its signature alone is then trusted (not "racy")."""
    old = path.stat().st_mtime - 3600
    os.utime(path, (old, old))


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "app.key"
    path.write_text("first-key")
    long_ago(path)
    return path


def test_nothing_changed_is_nothing(key):
    watch = FileWatch([str(key)])
    assert watch.changed() == ()
    assert watch.changed() == ()


def test_a_rewrite_in_place_of_the_same_size(key):
    watch = FileWatch([str(key)])
    inode = key.stat().st_ino
    with key.open("r+") as file:  # in place: the same inode
        file.write("other-key")
    long_ago(key)  # even with an old mtime: the ctime moved
    assert key.stat().st_ino == inode
    assert watch.changed() == (str(key),)
    assert watch.changed() == ()  # reported once


def test_a_file_renamed_over_it(key):
    watch = FileWatch([str(key)])
    new = key.with_name("app.key.new")
    new.write_text("new-key-1")
    new.replace(key)
    assert watch.changed() == (str(key),)
    assert watch.changed() == ()


def test_touched_without_a_change_is_no_change(key):
    watch = FileWatch([str(key)])
    os.utime(key)  # now: a new mtime and ctime, the same content
    assert watch.changed() == ()
    key.write_text("first-key")  # written again with the same words
    assert watch.changed() == ()


def kubernetes_secret(mount: Path, version: str, value: str) -> None:
    """What the kubelet does to a mounted Secret: write the new files in a new directory, point
    `..data` at it by an atomic rename of a new symlink, remove the old directory."""
    directory = mount / f"..2026_12_07_{version}"
    directory.mkdir()
    (directory / "app_key").write_text(value)
    previous = (mount / "..data").resolve() if (mount / "..data").exists() else None
    (mount / "..data_tmp").symlink_to(directory.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    if not (mount / "app_key").is_symlink():
        (mount / "app_key").symlink_to("..data/app_key")
    if previous is not None:
        for file in previous.iterdir():
            file.unlink()
        previous.rmdir()


def test_a_kubernetes_secret_swapped_through_its_data_symlink(tmp_path):
    mount = tmp_path / "secrets"
    mount.mkdir()
    kubernetes_secret(mount, "01_00_00.1", "k8s-key-1")
    path = str(mount / "app_key")
    for link in (mount / "app_key", mount / "..data"):  # all old: none is read for being new
        os.utime(link, (1e9, 1e9), follow_symlinks=False)
    long_ago(mount / "app_key")
    watch = FileWatch([path])
    kubernetes_secret(mount, "02_00_00.2", "k8s-key-2")
    assert Path(path).read_text() == "k8s-key-2"
    assert watch.changed() == (path,)
    assert watch.changed() == ()
    # The same content swapped in again (a Secret re-applied unchanged): no change.
    kubernetes_secret(mount, "03_00_00.3", "k8s-key-2")
    assert watch.changed() == ()


def test_a_deleted_file_is_a_change_once_and_its_return_another(key, tmp_path):
    other = tmp_path / "other.key"
    other.write_text("other-key")
    watch = FileWatch([str(key), str(other)])
    key.unlink()
    assert watch.changed() == (str(key),)
    assert watch.changed() == ()  # still missing: said once
    key.write_text("first-key")
    assert watch.changed() == (str(key),)


def test_an_unreadable_file_is_a_change(key):
    watch = FileWatch([str(key)])
    key.unlink()
    key.mkdir()  # there, but it cannot be read (unlike a mode, which does not stop root)
    assert watch.changed() == (str(key),)
    assert watch.changed() == ()


def test_watch_keeps_what_was_seen_and_looks_at_new_paths(key, tmp_path):
    watch = FileWatch([str(key)])
    key.write_text("changed-key")
    other = tmp_path / "new.key"
    other.write_text("new-key")
    watch.watch([str(key), str(other)])
    assert watch.paths == (str(key), str(other))
    assert watch.changed() == (str(key),)  # the change from before is still reported
