"""`sobot-proxy check`: what a configuration will do, and with `--online`, whether it works.

Offline, one line per setting: its name, the value the proxy would use, and where that value
came from (flag, environment, config file or default; a lower layer it overrides is named too).
Secrets are never shown: a secret is only "set", with the file it was read from; a password in
a Redis URL is masked.

Online, the credentials are proven without disturbing a running proxy wherever possible:

- With a Redis token store holding a token for the appid, that shared token is used, never
  get_token. It is sent to Sobot once, on a read-only call the operator names (`--probe-path`):
  the protocol documents no read-only API besides get_token itself, so there is no call this
  command could safely assume exists in every company's edition.
- Otherwise only get_token can prove the credentials, and every get_token issues a new token and
  invalidates the one before: every running proxy of the appid then meets 900002 once and renews,
  and any other client of the appid that does not renew by itself breaks. So `--online` calls it
  only when told so with `--rotate-token`; without, it explains and exits 2, having done nothing.
  (A confirmation flag rather than a prompt: the command runs in CI, with no terminal.) With a
  Redis store that is empty, the new token is fetched under the replicas' renewal lock and stored,
  so running replicas adopt it rather than meet 900002.

Exit status: 0 valid (and, online, proven); 1 the credentials or the token were refused, or
Sobot or the token store cannot be reached; 2 a configuration or usage problem.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
import tempfile
import time
from dataclasses import dataclass
from typing import Final, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import structlog
from multidict import CIMultiDict
from yarl import URL

from proxy import upstream
from proxy.config.settings import MIB, OPTIONS, REGIONS, Origin, Provenance, Settings, is_loopback
from proxy.errors import BadRequest, NotProxied
from proxy.logs import Secrets
from proxy.server.paths import is_get_token, split_target
from proxy.sobot import v5
from proxy.tokens.source import GetTokenFailed, token_client, token_source
from proxy.tokens.store import (
    RenewalBusy,
    StoredToken,
    StoreUnavailable,
    TokenStore,
    describe_store,
    make_store,
)

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
PRECEDENCE: Final = "flag > env > config file > default"
MASK: Final = "***"
# The most of a probe's answer read: enough for any return code, bounded whatever comes.
PROBE_READ_LIMIT: Final = MIB
_VALUE_WIDTH: Final = 34


# --- offline: what will be used, and where it came from ---------------------------------------


def describe(settings: Settings, provenance: Provenance) -> list[str]:
    """One line per setting: name, the value that will be used, and where it came from."""
    rows = _rows(settings, provenance)
    name_width = max(len(name) for name, _, _ in rows)
    return [
        f"  {name:<{name_width}}  {value:<{_VALUE_WIDTH}}  {where}" for name, value, where in rows
    ]


def _where(origin: Origin, *, via: str = "") -> str:
    where = f"{origin} ({via})" if via else str(origin)
    if origin.shadowed:
        where += f" (overrides {', '.join(origin.shadowed)})"
    return where


def warnings(settings: Settings, provenance: Provenance) -> list[str]:
    """Settings that are allowed but probably not meant, one line each."""
    found = []
    if (
        settings.allow_unauthenticated
        and not settings.client_keys
        and not is_loopback(settings.host)
    ):
        found.append(
            f"listening on {settings.host} without client keys: anyone who reaches this address "
            "acts as your Sobot company"
        )
    if urlsplit(settings.token_store).password and settings.token_store_password:
        found.append(
            "the token store URL carries a password, so the one set by "
            f"{provenance.origins['token_store_password']} is not used"
        )
    if provenance.region and provenance.origins["base_url"] != provenance.origins["region"]:
        found.append(
            f"the region ({provenance.origins['region']}) is not used: the base URL "
            f"({provenance.origins['base_url']}) overrides it"
        )
    return found


def _rows(settings: Settings, provenance: Provenance) -> list[tuple[str, str, str]]:
    """(name, value as shown, where it came from) for the file, every option and every secret;
    each secret next to the option it serves."""
    origins = provenance.origins
    rows = [("config", provenance.config_file or "none", _where(origins["config"]))]
    for option in OPTIONS:
        name = option.name
        if name == "allow_unauthenticated":
            keys = "client_keys"
            rows.append((keys, _client_keys(settings, provenance), _where(origins[keys])))
        if name == "region":
            rows.append((name, _region(provenance), _where(origins[name])))
        elif name == "base_url" and provenance.region and origins[name] == origins["region"]:
            rows.append((name, settings.base_url, _where(origins[name], via="the region's URL")))
        else:
            rows.append((name, _format(name, getattr(settings, name)), _where(origins[name])))
        if name == "appid":
            rows.append(("app_key", _secret(origins["app_key"]), _where(origins["app_key"])))
        if name == "token_store":
            password = "token_store_password"
            if urlsplit(settings.token_store).password:
                rows.append((password, "in the URL (masked)", _where(origins[name])))
            else:
                rows.append((password, _secret(origins[password]), _where(origins[password])))
    return rows


_EMPTY_MEANS: Final = {
    "temp_dir": f"{tempfile.gettempdir()} (the system's)",
    "ca_bundle": "the system's CAs",
    "allow_paths": "every path under /api/",
    "allow_methods": "every method",
}


def _format(name: str, value: object) -> str:
    if name == "token_store":
        return mask_store_url(str(value))
    if name in ("max_body", "spool_limit") and isinstance(value, int):
        return _size(value)
    if value is None or value == ():
        return _EMPTY_MEANS.get(name, "not set")
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g} s"
    return str(value)


def _size(size: int) -> str:
    for unit, factor in (("GiB", 1024 * MIB), ("MiB", MIB), ("KiB", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit} ({size} bytes)"
    return f"{size} bytes"


def _region(provenance: Provenance) -> str:
    if provenance.region is None:
        return "not set"
    used = provenance.origins["base_url"] == provenance.origins["region"]
    url = REGIONS[provenance.region]
    return f"{provenance.region} ({url})" if used else f"{provenance.region} (not used)"


def _secret(origin: Origin) -> str:
    if origin.layer == "default":
        return "not set"
    return f"set (read from {origin.file})" if origin.file else "set"


def _client_keys(settings: Settings, provenance: Provenance) -> str:
    if not settings.client_keys:
        return "none: no inbound authentication"
    origin = provenance.origins["client_keys"]
    count = len(settings.client_keys)
    keys = f"{count} key{'s' if count > 1 else ''} set"
    return f"{keys} (read from {origin.file})" if origin.file else keys


def mask_store_url(url: str) -> str:
    """The token store URL with its password, if any, replaced by ***: in the user part, or
    as redis-py also takes it, a `password` parameter of the query."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:{MASK}@{host}")
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        masked = [(k, MASK if k.lower() == "password" else v) for k, v in query]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)


def probe_path(value: str) -> str:
    """argparse type of --probe-path: a GET target under /api/ that is not get_token."""
    try:
        path, _query = split_target(value)
    except (BadRequest, NotProxied) as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc.message}") from None
    if is_get_token(path):
        raise argparse.ArgumentTypeError(
            f"{value!r} is get_token, which would rotate the token: name a read-only API"
        )
    return value


# --- online: proving the credentials ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Report:
    out: TextIO
    err: TextIO

    def line(self, text: str) -> None:
        print(f"online: {text}", file=self.out, flush=True)

    def warning(self, text: str) -> None:
        print(f"sobot-proxy: warning: {text}", file=self.err, flush=True)


def prove(
    settings: Settings,
    *,
    rotate_token: bool,
    probe: str | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Prove the credentials work, as the module docstring says; returns the exit status."""
    report = _Report(out, err)
    return asyncio.run(_prove(settings, rotate_token=rotate_token, probe=probe, report=report))


async def _prove(
    settings: Settings, *, rotate_token: bool, probe: str | None, report: _Report
) -> int:
    # The components log through structlog; their lines are not this command's output.
    log = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
    )
    tls = ssl.create_default_context(cafile=settings.ca_bundle)
    async with contextlib.AsyncExitStack() as resources:
        client = token_client(settings, tls)
        resources.push_async_callback(client.close)
        store: TokenStore | None = None
        if settings.token_store != "memory":
            store = make_store(settings, log=log)
            resources.push_async_callback(store.close)
        prover = _Prover(settings, client, store, log, report, probe)
        try:
            if store is not None:
                found = await prover.shared_token()
                if found is not None:
                    if rotate_token:
                        report.line("--rotate-token not needed: get_token was not called")
                    return await prover.use(found, "the shared token")
            report.warning(_rotation_warning(settings.appid, shared=store is not None))
            if not rotate_token:
                report.warning(
                    "nothing was tested: add --rotate-token to call get_token all the same"
                    if store is not None
                    else "nothing was tested: add --rotate-token to call get_token all the same, "
                    "or check with the Redis token store your proxies share (SOBOT_TOKEN_STORE): "
                    "then the shared token is proven instead"
                )
                return EXIT_USAGE
            return await prover.rotate()
        except StoreUnavailable as exc:
            report.line(
                f"the token store {describe_store(settings.token_store)} cannot be reached ({exc})"
            )
            return EXIT_REFUSED
        except (GetTokenFailed, RenewalBusy) as exc:
            report.line(str(exc))
            return EXIT_REFUSED


def _rotation_warning(appid: str, *, shared: bool) -> str:
    consequence = (
        "it is stored for the replicas sharing the store to adopt, but any other holder of "
        "the old token"
        if shared
        else "every running proxy of the appid will meet 900002 once and renew, and any "
        "other client of the appid"
    )
    return (
        "proving the credentials takes a get_token call, which issues a NEW token and "
        f"invalidates the one in use for appid {appid}: {consequence} that does not renew by "
        "itself will fail"
    )


class _Prover:
    def __init__(
        self,
        settings: Settings,
        client: upstream.Client,
        store: TokenStore | None,
        log: structlog.typing.FilteringBoundLogger,
        report: _Report,
        probe: str | None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._store = store
        self._log = log
        self._report = report
        self._probe = probe

    async def shared_token(self) -> StoredToken | None:
        """The live token the store holds for the appid, or None (said so)."""
        assert self._store is not None
        found = await self._store.load()
        where = describe_store(self._settings.token_store)
        if found is None or found.expires_at <= time.time():
            self._report.line(f"the token store {where} holds no token for the appid")
            return None
        self._report.line(
            f"the token store {where} holds a token for the appid, issued "
            f"{time.time() - found.issued_at:.0f} s ago, valid {found.expires_at - time.time():.0f}"
            " s more; get_token not called (it would rotate the token every replica holds)"
        )
        return found

    async def rotate(self) -> int:
        """Call get_token (under the replicas' renewal lock when there is a store)."""
        if self._store is None:
            issued = await self._fetch()
            return await self.use(issued, "the new token")
        async with self._store.renewal_lock():
            # A replica may have stored one while we waited for the lock: no need to rotate it.
            found = await self._store.load()
            if found is not None and found.expires_at > time.time():
                self._report.line("a replica stored a token meanwhile: using it, not get_token")
                return await self.use(found, "the shared token")
            issued = await self._fetch()
            try:
                await self._store.save(issued)
            except StoreUnavailable as exc:
                self._report.line(
                    f"the new token could not be stored ({exc}): running replicas will meet "
                    "900002 once and renew"
                )
                return EXIT_REFUSED
        self._report.line("the new token was stored: running replicas adopt it")
        return await self.use(issued, "the new token")

    async def _fetch(self) -> StoredToken:
        settings = self._settings
        source = token_source(settings, self._client, log=self._log, secrets=Secrets())
        issued_at = time.time()
        token = await source.fetch()  # GetTokenFailed says what Sobot answered, if it did
        self._report.line(
            f"get_token succeeded at {settings.base_url} for appid {settings.appid}: a token "
            f"valid for {token.lifetime:g} s was issued (not shown)"
        )
        return StoredToken(token.value, issued_at, token.lifetime)

    async def use(self, token: StoredToken, what: str) -> int:
        """Send `token` on the read-only probe call, if one was named."""
        if self._probe is None:
            self._report.line(
                f"{what} was not sent to Sobot: the protocol documents no read-only API to "
                "prove it with; name one your application calls with --probe-path"
                if what == "the shared token"
                else "the credentials work"
            )
            return EXIT_OK
        settings = self._settings
        try:
            # As get_token: the client's timeouts bound each wait, and this the whole call.
            async with asyncio.timeout(settings.connect_timeout + settings.upstream_timeout):
                status, body = await self._probe_exchange(token)
        except (TimeoutError, upstream.ClientError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            self._report.line(f"GET {self._probe} could not reach Sobot ({reason})")
            return EXIT_REFUSED
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        ret_code = v5.ret_code_of(answer)
        if ret_code is None:
            self._report.line(
                f"GET {self._probe} answered HTTP {status} without a Sobot return code: "
                f"{what} is not proven (is it an API of {settings.base_url}?)"
            )
            return EXIT_REFUSED
        said = v5.describe(ret_code)
        if ret_code in v5.TOKEN_REJECTED:
            self._report.line(f"Sobot rejected {what} on GET {self._probe}: {said}")
            return EXIT_REFUSED
        self._report.line(f"Sobot accepted {what}: GET {self._probe} answered {said}")
        return EXIT_OK

    async def _probe_exchange(self, token: StoredToken) -> tuple[int, bytes]:
        """GET the probe path with `token`: the status, and up to PROBE_READ_LIMIT bytes."""
        assert self._probe is not None
        base_url = self._settings.base_url
        response = await self._client.request(
            "GET",
            upstream.Origin.of(base_url),
            # Encoded as a URL, as aiohttp would: the flag may be typed with raw characters.
            urlsplit(base_url).path + URL(self._probe).raw_path_qs,
            CIMultiDict({v5.TOKEN_HEADER: token.value}),
        )
        try:
            return response.status, await response.read_up_to(PROBE_READ_LIMIT)
        finally:
            response.release()
