"""Configuration: every setting declared once, loaded once into one immutable Settings object.

Precedence, highest first: command-line flag > environment > TOML file > default. The loader is
pure: it reads what it is given (flags, an environment mapping, files named there) and either
returns Settings or raises ConfigError listing every problem, one line each.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple
from urllib.parse import unquote, urlsplit

from proxy.config import secret_files
from proxy.config.routes import (
    DEFAULT_FORWARD_PREFIXES,
    CredentialSettings,
    ResolvedRoute,
    RouteSettings,
    resolve_routes,
)
from proxy.config.secret_files import read_secret, read_secret_lines
from proxy.config.tenants import (
    ALL_TABLES,
    DEFAULT_TENANT,
    TenantSettings,
    bind_client_keys,
    parse_tables,
)
from proxy.config.values import REGIONS as REGIONS  # re-exported: the CLI reads it here
from proxy.config.values import (
    REGIONS_HELP,
    base_url,
    choice,
    in_clear,
    items,
    path_prefixes,
    paths,
)
from proxy.config.values import is_loopback as is_loopback  # re-exported, as REGIONS
from proxy.config.values import text as _text
from proxy.logs import MIN_SECRET_LENGTH

MIB: Final = 1024 * 1024
# Request bodies up to this size are kept in memory for the replay; a larger one goes to disk
# whole (server/body.py), so it needs room in the spool budget.
BODY_IN_MEMORY: Final = MIB
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("json", "console")
CONFIG_ENV: Final = "SOBOT_PROXY_CONFIG"


@dataclass(frozen=True, slots=True)
class Settings:
    appid: str
    app_key: str = field(repr=False)
    base_url: str  # scheme://host[:port][/prefix], without a trailing slash
    host: str = "127.0.0.1"
    port: int = 8080
    upstream_timeout: float = 30.0
    connect_timeout: float = 5.0
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    refresh_margin: float = 300.0
    max_body: int = 64 * MIB
    spool_limit: int = 512 * MIB
    upstream_connections: int = 100
    max_queue: int = 1000
    shutdown_grace: float = 25.0
    temp_dir: str | None = None  # None: the system's ($TMPDIR, else /tmp)
    client_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: no inbound auth
    # The tenant each client key is bound to, in the order of client_keys; empty when every key
    # is `default`'s (as in every configuration without tenants). Read client_key_bindings.
    client_key_tenants: tuple[str, ...] = ()
    allow_unauthenticated: bool = False
    allow_paths: tuple[str, ...] = ()  # empty: every path a route forwards
    allow_methods: tuple[str, ...] = ()  # empty: every method
    metrics_routes: tuple[str, ...] = ()  # path prefixes that group requests in the metrics
    ca_bundle: str | None = None  # None: the system's trusted CAs
    allow_insecure_upstream: bool = False
    forwarded_headers: bool = False  # X-Forwarded-For / -Proto to Sobot
    token_store: str = field(default="memory", repr=False)  # "memory" or a redis(s):// URL
    token_store_password: str | None = field(default=None, repr=False)
    workers: int = 1
    log_level: str = "info"
    log_format: str = "json"
    forward_prefixes: tuple[str, ...] = DEFAULT_FORWARD_PREFIXES  # to the main upstream, `default`
    credentials: tuple[CredentialSettings, ...] = ()  # [credentials.NAME] sets, besides `default`
    routes: tuple[RouteSettings, ...] = ()  # [[routes]], as given
    tenants: tuple[TenantSettings, ...] = ()  # [tenants.NAME], besides `default`
    # The file the app_key was read from (None: given as a value), for a reload to read again.
    # Where the key came from, not what it is: left out of ==.
    app_key_file: str | None = field(default=None, compare=False)
    client_keys_file: str | None = field(default=None, compare=False)  # as app_key_file
    token_store_password_file: str | None = field(default=None, compare=False)  # as app_key_file

    def __post_init__(self) -> None:
        if self.client_key_tenants and len(self.client_key_tenants) != len(self.client_keys):
            raise ValueError("client_key_tenants: one tenant for each client key, or none")

    @property
    def credential_sets(self) -> tuple[CredentialSettings, ...]:
        """The `default` tenant's credential sets: `default` (SOBOT_APPID, SOBOT_APP_KEY, the
        main upstream) first."""
        return self.all_tenants[0].credential_sets

    @property
    def all_tenants(self) -> tuple[TenantSettings, ...]:
        """Every tenant: `default` (the top-level appid, app_key, main upstream and
        [credentials.*] sets) first, then the named ones as the file lists them."""
        default = TenantSettings(
            DEFAULT_TENANT,
            self.appid,
            self.app_key,
            self.base_url,
            self.credentials,
            self.app_key_file,
        )
        return (default, *self.tenants)

    @property
    def client_key_bindings(self) -> tuple[tuple[str, str], ...]:
        """(client key, its tenant's name) for every client key."""
        tenants = self.client_key_tenants or (DEFAULT_TENANT,) * len(self.client_keys)
        return tuple(zip(self.client_keys, tenants, strict=True))

    @property
    def route_table(self) -> tuple[ResolvedRoute, ...]:
        """The routes as they are matched: longest prefix first. A route's base_url None is
        the main upstream of the tenant that asks (ResolvedRoute.upstream)."""
        return resolve_routes(self.forward_prefixes, self.routes)

    @property
    def renewal_lease(self) -> float:
        """How long a replica may hold the shared renewal lock: as long as a get_token can
        take, and then some; a holder that dies holds it no longer."""
        return self.connect_timeout + self.upstream_timeout + 5


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _port(value: Any) -> int:
    try:
        port = int(str(value).strip()) if not isinstance(value, bool) else -1
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r} is not a port number (0-65535; 0 picks a free port)")
    return port


def _seconds(*, zero_allowed: bool) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            seconds = float(str(value).strip()) if not isinstance(value, bool) else -1.0
        except ValueError:
            seconds = -1.0
        above_the_floor = seconds >= 0 if zero_allowed else seconds > 0
        if not (above_the_floor and seconds < 1e9):
            what = (
                "a number of seconds (0 or more)"
                if zero_allowed
                else "a positive number of seconds"
            )
            raise ValueError(f"{value!r} is not {what}")
        return seconds

    return parse


_positive_seconds: Final = _seconds(zero_allowed=False)
_non_negative_seconds: Final = _seconds(zero_allowed=True)


def _count(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            count = int(str(value).strip()) if not isinstance(value, bool) else minimum - 1
        except ValueError:
            count = minimum - 1
        if count < minimum:
            raise ValueError(f"{value!r} is not a whole number of at least {minimum}")
        return count

    return parse


_SIZE_UNITS: Final = {
    "": 1,
    "k": 1024,
    "kib": 1024,
    "m": MIB,
    "mib": MIB,
    "g": 1024 * MIB,
    "gib": 1024 * MIB,
}


def _size(value: Any) -> int:
    """Bytes, as a number or with a binary unit: 1048576, 1024KiB, 64MiB, 1G."""
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmgib")
    unit = text[len(number) :]
    try:
        size = int(number) * _SIZE_UNITS[unit] if not isinstance(value, bool) else 0
    except (ValueError, KeyError):
        size = 0
    if size <= 0:
        raise ValueError(f"{value!r} is not a size in bytes (such as 1048576, 512KiB or 64MiB)")
    return size


def _directory(value: Any) -> str:
    path = _text(value)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{value!r} is not a directory the proxy can write to")
    return path


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a yes/no value (1, true, yes, on / 0, false, no, off)")


_TOKEN_CHARS: Final = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _methods(value: Any) -> tuple[str, ...]:
    methods = tuple(method.upper() for method in items(value))
    for method in methods:
        if not set(method) <= _TOKEN_CHARS:
            raise ValueError(f"{method!r} is not an HTTP method")
    return methods


def _readable_file(value: Any) -> str:
    path = _text(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"{value!r} is not a file the proxy can read")
    return path


def _token_store(value: Any) -> str:
    text = _text(value)
    if text == "memory":
        return text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise ValueError("is not memory or a valid redis:// or rediss:// URL") from None
    # The value is not repeated in messages: the URL may carry a password.
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("is not memory or a redis://host:port/db or rediss:// URL")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError("names a database that is not a number (redis://host:port/0)")
    if parts.password is not None and len(unquote(parts.password)) < MIN_SECRET_LENGTH:
        raise ValueError(f"the password {TOO_SHORT}")
    return text


# The logs' scrubber leaves shorter values alone (they would mangle ordinary text): a secret
# that short could show in a line, so it is refused.
TOO_SHORT: Final = (
    f"is shorter than {MIN_SECRET_LENGTH} characters, too short for the logs to hide; use a "
    "long random one"
)


def short_password(label: str, password: str | None) -> str | None:
    """The problem with a Redis password (from `label`) too short for the logs to hide, if it
    is: at start-up and when its file is read again."""
    if password and len(password) < MIN_SECRET_LENGTH:
        return f"{label}: the password {TOO_SHORT}"
    return None


def _host(value: Any) -> str:
    host = _text(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost" and not all(
            part and len(part) < 64 and part.replace("-", "").isalnum() for part in host.split(".")
        ):
            raise ValueError(f"{value!r} is not an IP address or host name") from None
    return host


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: where it can come from, how it is parsed, and what it is for."""

    name: str  # the Settings field and the TOML key
    env: str
    flag: str | None
    parse: Callable[[Any], Any]
    default: Any
    help: str
    switch: bool = False  # a flag that takes no value and means "yes"


REQUIRED: Final = object()

OPTIONS: Final = (
    Option("appid", "SOBOT_APPID", "--appid", _text, REQUIRED, "Sobot appid (public id)"),
    Option(
        "region",
        "SOBOT_REGION",
        "--region",
        choice(REGIONS),
        None,
        f"Sobot region: {REGIONS_HELP}",
    ),
    Option(
        "base_url",
        "SOBOT_BASE_URL",
        "--base-url",
        base_url,
        None,
        "upstream base URL, any http(s) URL; overrides the region",
    ),
    Option(
        "forward_prefixes",
        "SOBOT_FORWARD_PREFIXES",
        "--forward-prefixes",
        path_prefixes,
        DEFAULT_FORWARD_PREFIXES,
        "comma-separated path prefixes forwarded to the upstream with the default credentials "
        f"(each starts and ends with /) [default: {','.join(DEFAULT_FORWARD_PREFIXES)}]",
    ),
    Option("host", "SOBOT_PROXY_HOST", "--host", _host, "127.0.0.1", "address to listen on"),
    Option("port", "SOBOT_PROXY_PORT", "--port", _port, 8080, "port to listen on"),
    Option(
        "upstream_timeout",
        "SOBOT_UPSTREAM_TIMEOUT",
        "--upstream-timeout",
        _positive_seconds,
        30.0,
        "read timeout: the longest wait on Sobot, or on a client's body, for the next bytes",
    ),
    Option(
        "connect_timeout",
        "SOBOT_CONNECT_TIMEOUT",
        "--connect-timeout",
        _positive_seconds,
        5.0,
        "seconds to wait for a connection to Sobot",
    ),
    Option(
        "header_timeout",
        "SOBOT_HEADER_TIMEOUT",
        "--header-timeout",
        _positive_seconds,
        10.0,
        "seconds a client has to send a request's head (request line and headers); "
        "then its connection is closed",
    ),
    Option(
        "keepalive_timeout",
        "SOBOT_KEEPALIVE_TIMEOUT",
        "--keepalive-timeout",
        _positive_seconds,
        75.0,
        "seconds a kept-alive client connection may sit idle between requests; then it is closed",
    ),
    Option(
        "refresh_margin",
        "SOBOT_REFRESH_MARGIN",
        "--refresh-margin",
        _positive_seconds,
        300.0,
        "renew the token this many seconds before it expires (at most 10%% of its life)",
    ),
    Option(
        "max_body",
        "SOBOT_MAX_BODY",
        "--max-body",
        _size,
        64 * MIB,
        "largest request body accepted (kept for the replay), e.g. 64MiB",
    ),
    Option(
        "spool_limit",
        "SOBOT_SPOOL_LIMIT",
        "--spool-limit",
        _size,
        512 * MIB,
        "room on disk for the request bodies being kept at once (each over 1 MiB, whole); "
        "past it, 503 before the body is read",
    ),
    Option(
        "upstream_connections",
        "SOBOT_UPSTREAM_CONNECTIONS",
        "--upstream-connections",
        _count(1),
        100,
        "connections to Sobot at most (the keep-alive pool)",
    ),
    Option(
        "max_queue",
        "SOBOT_MAX_QUEUE",
        "--max-queue",
        _count(0),
        1000,
        "requests that may wait for a connection; beyond, 503",
    ),
    Option(
        "shutdown_grace",
        "SOBOT_SHUTDOWN_GRACE",
        "--shutdown-grace",
        _non_negative_seconds,
        25.0,
        "seconds in-flight requests get to finish after SIGTERM / SIGINT",
    ),
    Option(
        "temp_dir",
        "SOBOT_TEMP_DIR",
        "--temp-dir",
        _directory,
        None,
        "directory for request bodies over 1 MiB, kept for the replay (default: $TMPDIR)",
    ),
    Option(
        "allow_unauthenticated",
        "SOBOT_PROXY_ALLOW_UNAUTHENTICATED",
        "--allow-unauthenticated",
        _boolean,
        False,
        "listen on a non-loopback address without client keys (logged as a warning)",
        switch=True,
    ),
    Option(
        "allow_paths",
        "SOBOT_ALLOW_PATHS",
        "--allow-paths",
        paths,
        (),
        "comma-separated path prefixes that may be called, e.g. /api/ws/5/ticket/; others 403",
    ),
    Option(
        "allow_methods",
        "SOBOT_ALLOW_METHODS",
        "--allow-methods",
        _methods,
        (),
        "comma-separated HTTP methods that may be used, e.g. GET,POST; others 403",
    ),
    Option(
        "metrics_routes",
        "SOBOT_METRICS_ROUTES",
        "--metrics-routes",
        paths,
        (),
        "comma-separated path prefixes that group requests in /metrics (the `route` label); "
        "other paths count under their route's prefix",
    ),
    Option(
        "ca_bundle",
        "SOBOT_CA_BUNDLE",
        "--ca-bundle",
        _readable_file,
        None,
        "PEM file of CAs to trust for the upstream's TLS certificate, instead of the system's",
    ),
    Option(
        "allow_insecure_upstream",
        "SOBOT_ALLOW_INSECURE_UPSTREAM",
        "--allow-insecure-upstream",
        _boolean,
        False,
        "allow a plain-http base URL that is not on this host",
        switch=True,
    ),
    Option(
        "forwarded_headers",
        "SOBOT_FORWARDED_HEADERS",
        "--forwarded-headers",
        _boolean,
        False,
        "send Sobot X-Forwarded-For (the caller's address) and X-Forwarded-Proto; "
        "off: those and any Forwarded, X-Forwarded-* or X-Real-IP a client sent are dropped",
        switch=True,
    ),
    Option(
        "workers",
        "SOBOT_PROXY_WORKERS",
        "--workers",
        _count(1),
        1,
        "processes serving the one port (SO_REUSEPORT), sharing one token; a dead one restarts",
    ),
    Option(
        "token_store",
        "SOBOT_TOKEN_STORE",
        "--token-store",
        _token_store,
        "memory",
        "memory (one process) or redis://host:port/db / rediss://... to share the token",
    ),
    Option(
        "log_level",
        "SOBOT_LOG_LEVEL",
        "--log-level",
        choice(LOG_LEVELS),
        "info",
        "debug, info, warning or error",
    ),
    Option(
        "log_format",
        "SOBOT_LOG_FORMAT",
        "--log-format",
        choice(LOG_FORMATS),
        "json",
        "json (one object a line, for log shippers) or console (for people)",
    ),
)


@dataclass(frozen=True, slots=True)
class SecretSetting:
    """A secret: no flag (it would show in `ps`), and two spellings: a value or a file."""

    name: str  # the Settings field and the TOML key; `<name>_file` names a file
    env: str
    file_env: str
    required: bool
    many: bool  # a list of secrets: comma-separated in a value, one a line in a file
    help: str


SECRETS: Final = (
    SecretSetting(
        "app_key", "SOBOT_APP_KEY", "SOBOT_APP_KEY_FILE", True, False, "the Sobot app_key"
    ),
    SecretSetting(
        "client_keys",
        "SOBOT_PROXY_CLIENT_KEYS",
        "SOBOT_PROXY_CLIENT_KEYS_FILE",
        False,
        True,
        "keys clients present as `Authorization: Bearer <key>`",
    ),
    SecretSetting(
        "token_store_password",
        "SOBOT_TOKEN_STORE_PASSWORD",
        "SOBOT_TOKEN_STORE_PASSWORD_FILE",
        False,
        False,
        "the Redis password, if not in the URL",
    ),
)
APP_KEY_ENV: Final = "SOBOT_APP_KEY"
APP_KEY_FILE_ENV: Final = "SOBOT_APP_KEY_FILE"
TOML_KEYS: Final = frozenset(o.name for o in OPTIONS) | {
    key for secret in SECRETS for key in (secret.name, f"{secret.name}_file")
}


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a setting's value came from, and the lower layers that also set it and lost."""

    layer: str  # "flag", "env", "config file" or "default"
    name: str = ""  # "--port", "SOBOT_PROXY_PORT", "/etc/proxy.toml: port"; "" for a default
    shadowed: tuple[str, ...] = ()  # e.g. ("env SOBOT_PROXY_PORT",): overridden by this one
    file: str | None = None  # the file a secret was read from

    def __str__(self) -> str:
        return f"{self.layer} {self.name}" if self.name else self.layer


DEFAULT: Final = Origin("default")


@dataclass(frozen=True, slots=True)
class Provenance:
    """How the loader arrived at a Settings object, for `sobot-proxy check` to explain."""

    # Every option's and secret's name, and "config" (the TOML file): where its value came from.
    origins: Mapping[str, Origin]
    region: str | None  # as given: Settings keeps only the base URL it stands for
    config_file: str | None


@dataclass(frozen=True, slots=True)
class _Source:
    """One layer of configuration: its values, and how to name a key of it in a message."""

    layer: str
    values: Mapping[str, Any]
    label: Callable[[Option | str], str]

    def origin(self, option: Option, shadowed: tuple[str, ...] = ()) -> Origin:
        return Origin(self.layer, self.label(option), shadowed)


def load_settings(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    read_text: Callable[[Path], str] = secret_files.read_text,
) -> Settings:
    """Build Settings from flags (option name -> value or None), an environment and files.

    `flags` may carry "config", the TOML file to read (else SOBOT_PROXY_CONFIG names it).
    """
    return load_with_provenance(flags, env, read_text=read_text)[0]


def load_with_provenance(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    read_text: Callable[[Path], str] = secret_files.read_text,
) -> tuple[Settings, Provenance]:
    """load_settings, and where each value came from (see Provenance)."""
    problems: list[str] = []
    toml_values, toml_label = _read_toml(flags, env, read_text, problems)
    if toml_values is None:
        # The file is the one problem: whatever it would have set ("appid is required", "no
        # upstream") follows from it, and would only bury it.
        raise ConfigError(problems)
    sources = (
        _Source(
            "flag",
            {k: v for k, v in flags.items() if v is not None},
            lambda o: o.flag or o.env if isinstance(o, Option) else o,
        ),
        _Source(
            "env",
            {o.name: env[o.env] for o in OPTIONS if env.get(o.env)},
            lambda o: o.env if isinstance(o, Option) else o,
        ),
        _Source(
            "config file",
            toml_values,
            lambda o: f"{toml_label}: {o.name if isinstance(o, Option) else o}",
        ),
    )

    values: dict[str, Any] = {}
    origins: dict[str, Origin] = {"config": _config_origin(flags, env)}
    for option in OPTIONS:
        setting = [source for source in sources if option.name in source.values]
        if setting:
            source, *losers = setting
            origins[option.name] = source.origin(
                option, tuple(str(s.origin(option)) for s in losers)
            )
            try:
                values[option.name] = option.parse(source.values[option.name])
            except ValueError as exc:
                problems.append(f"{source.label(option)}: {exc}")
                values[option.name] = None
        else:
            origins[option.name] = DEFAULT
            if option.default is REQUIRED:
                problems.append(f"{option.name} is required: set {option.env} or {option.flag}")
            values[option.name] = None if option.default is REQUIRED else option.default

    secrets: dict[str, tuple[str, ...]] = {}
    for secret in SECRETS:
        secrets[secret.name], origins[secret.name] = _read_secret(
            secret, env, toml_values, toml_label, read_text, problems
        )
    password = secrets["token_store_password"]
    short = short_password(origins["token_store_password"].name, password[0] if password else None)
    if short is not None:
        problems.append(short)
    region = values["region"]
    tables = parse_tables(
        toml_values,
        file_label=toml_label,
        read_text=read_text,
        default_appid=values["appid"],
        default_appid_source=_appid_source(origins["appid"]),
        main_base_url=values["base_url"] or (REGIONS[region] if region else None),
        allow_insecure_upstream=bool(values["allow_insecure_upstream"]),
        problems=problems,
    )
    client_keys = bind_client_keys(
        secrets["client_keys"],
        file=origins["client_keys"].file,
        label=origins["client_keys"].name,
        tenant_names=tables.tenant_names,
        problems=problems,
    )

    if (
        values["base_url"] is None
        and values["region"] is None
        and not _mentioned(sources, ("region", "base_url"))
    ):
        problems.append(
            f"no upstream: set SOBOT_REGION ({', '.join(REGIONS)}) or SOBOT_BASE_URL "
            "(--region / --base-url)"
        )
    if problems:
        raise ConfigError(problems)
    region = values.pop("region")
    if values["base_url"] is None:
        values["base_url"] = REGIONS[region]
        origins["base_url"] = origins["region"]  # the region chose it
    settings = Settings(
        app_key=secrets["app_key"][0],
        app_key_file=origins["app_key"].file,
        client_keys=client_keys.keys,
        client_key_tenants=client_keys.named_tenants,
        client_keys_file=origins["client_keys"].file,
        token_store_password=password[0] if password else None,
        token_store_password_file=origins["token_store_password"].file,
        credentials=tables.credentials,
        routes=tables.routes,
        tenants=tables.tenants,
        **values,
    )
    problems = (
        _unsafe_combinations(settings)
        + _limits_that_conflict(settings)
        + _nothing_routed(settings, origins["forward_prefixes"])
    )
    if problems:
        raise ConfigError(problems)
    config_file = flags.get("config") or env.get(CONFIG_ENV)
    return settings, Provenance(origins, region, str(config_file) if config_file else None)


def _appid_source(origin: Origin) -> str:
    """Where the top-level appid was given, as a message about a repeat of it names it: the
    line already names the file, so the file's own key is named by its place in it."""
    return "the file's top-level appid" if origin.layer == "config file" else origin.name


def _config_origin(flags: Mapping[str, Any], env: Mapping[str, str]) -> Origin:
    if flags.get("config"):
        shadowed = (f"env {CONFIG_ENV}",) if env.get(CONFIG_ENV) else ()
        return Origin("flag", "--config", shadowed)
    return Origin("env", CONFIG_ENV) if env.get(CONFIG_ENV) else DEFAULT


def _unsafe_combinations(settings: Settings) -> list[str]:
    """Settings that are each valid but together would expose the credentials."""
    problems = []
    exposed = not is_loopback(settings.host) and not settings.client_keys
    if exposed and not settings.allow_unauthenticated:
        problems.append(
            f"listening on {settings.host} lets anyone who reaches it act as your Sobot "
            "company: set client keys (SOBOT_PROXY_CLIENT_KEYS or "
            "SOBOT_PROXY_CLIENT_KEYS_FILE), or opt out with --allow-unauthenticated / "
            "SOBOT_PROXY_ALLOW_UNAUTHENTICATED=1"
        )
    if in_clear(settings.base_url) and not settings.allow_insecure_upstream:
        problems.append(
            f"the upstream {settings.base_url} is plain http and not on this host: the "
            "token would cross the network in clear; use https, or set "
            "SOBOT_ALLOW_INSECURE_UPSTREAM=1 (--allow-insecure-upstream)"
        )
    return problems


def _nothing_routed(settings: Settings, forward_prefixes: Origin) -> list[str]:
    """An empty route table: the proxy would answer every request 404."""
    if settings.route_table:
        return []
    return [
        f"{forward_prefixes.name}: no path would be forwarded: list a prefix, or add [[routes]]"
    ]


def spool_need(size: int) -> int:
    """The spool room a body of `size` bytes takes: all of it on disk, or none in memory."""
    return size if size > BODY_IN_MEMORY else 0


def _limits_that_conflict(settings: Settings) -> list[str]:
    """Limits that are each valid but together would refuse some request every time."""
    # Each worker keeps its share of the budget (cli/workers.py passes it on as --spool-limit).
    share = settings.spool_limit // settings.workers
    if spool_need(settings.max_body) <= share:
        return []
    per_worker = f" / {settings.workers} workers" if settings.workers > 1 else ""
    return [
        f"max_body ({settings.max_body} bytes) is over spool_limit ({settings.spool_limit} "
        f"bytes{per_worker}): a body that large, or any chunked body, could never be admitted; "
        "raise SOBOT_SPOOL_LIMIT (--spool-limit) or lower SOBOT_MAX_BODY (--max-body)"
    ]


def _mentioned(sources: tuple[_Source, ...], names: tuple[str, ...]) -> bool:
    return any(name in source.values for source in sources for name in names)


def _read_toml(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    read_text: Callable[[Path], str],
    problems: list[str],
) -> tuple[dict[str, Any] | None, str]:
    """The TOML file's known values and its name for messages; None for the values if it
    cannot be read or parsed (the problem added to `problems`)."""
    name = flags.get("config") or env.get(CONFIG_ENV)
    if not name:
        return {}, ""
    label = str(name)
    try:
        values = tomllib.loads(read_text(Path(name)))
    except OSError as exc:
        problems.append(f"config file {label}: cannot be read ({exc.strerror or exc})")
        return None, label
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"config file {label}: not valid TOML ({exc})")
        return None, label
    known = TOML_KEYS | ALL_TABLES
    for key in sorted(set(values) - known):
        problems.append(
            f"config file {label}: unknown setting {key!r} (known: {', '.join(sorted(known))})"
        )
    return {k: v for k, v in values.items() if k in known}, label


class _SecretLayer(NamedTuple):
    layer: str
    value: Any
    file_name: Any
    value_label: str
    file_label: str
    base_dir: Path  # where a relative file name is found

    @property
    def label(self) -> str:
        """The name that sets the secret in this layer, if it does."""
        return f"{self.layer} {self.value_label if self.value else self.file_label}"


def _read_secret(
    secret: SecretSetting,
    env: Mapping[str, str],
    toml_values: Mapping[str, Any],
    toml_label: str,
    read_text: Callable[[Path], str],
    problems: list[str],
) -> tuple[tuple[str, ...], Origin]:
    """A secret from the highest layer that sets it, as a value or as a file to read, and
    where it came from.

    A single secret comes back as one item. A list (`many`) is comma-separated in a value, one
    an item in a TOML list; from a file it comes back as the file's lines, each as it is (the
    origin names the file). Never part of a message: only names are.
    """
    layers = (
        _SecretLayer(
            "env",
            env.get(secret.env),
            env.get(secret.file_env),
            secret.env,
            secret.file_env,
            Path(),
        ),
        _SecretLayer(
            "config file",
            toml_values.get(secret.name),
            toml_values.get(f"{secret.name}_file"),
            f"{toml_label}: {secret.name}",
            f"{toml_label}: {secret.name}_file",
            # A relative file named in a TOML file is found beside that file.
            Path(toml_label).parent,
        ),
    )
    for index, layer in enumerate(layers):
        shadowed = tuple(low.label for low in layers[index + 1 :] if low.value or low.file_name)
        if layer.value and layer.file_name:
            problems.append(f"set only one of {layer.value_label} and {layer.file_label}")
            return (), Origin(layer.layer, layer.value_label, shadowed)
        if layer.value:
            origin = Origin(layer.layer, layer.value_label, shadowed)
            items = _secret_items(layer.value, separator="," if secret.many else None)
            if items is None:
                problems.append(f"{layer.value_label}: must be a non-empty string")
                return (), origin
            return items, origin
        if layer.file_name:
            path = layer.base_dir / str(layer.file_name)
            origin = Origin(layer.layer, layer.file_label, shadowed, file=str(path))
            shown = str(layer.file_name)
            try:
                # A list's lines as they are: the caller reads each (tenants.bind_client_keys).
                if secret.many:
                    return read_secret_lines(path, shown, read_text), origin
                return (read_secret(path, shown, read_text),), origin
            except ValueError as exc:
                problems.append(f"{layer.file_label}: {exc}")
                return (), origin
    if secret.required:
        problems.append(f"{secret.name} is required: set {secret.env} or {secret.file_env}")
    return (), DEFAULT


def _secret_items(value: Any, *, separator: str | None) -> tuple[str, ...] | None:
    if isinstance(value, list) and separator is not None:
        parts = [str(item) for item in value]
    elif isinstance(value, str):
        parts = value.split(separator) if separator is not None else [value]
    else:
        return None
    items = tuple(part.strip() for part in parts if part.strip())
    return items or None
