"""`sobot-proxy check --online`: proving each credential set's credentials.

Each credential set is proven in turn (`default` first), without disturbing a running proxy
wherever possible:

- With a Redis token store holding a token for the set, that shared token is used, never the
  token endpoint. It is sent to Sobot once, on a read-only call the operator names
  (`--probe-path`, proven with the set of the route it goes along): the protocol documents no
  read-only API besides the token call itself, so there is no call this command could safely
  assume exists in every company's edition.
- Otherwise only the token call can prove the credentials, and every v5 get_token issues a new
  token and invalidates the one before (V6 may too: its pages do not say): every running proxy
  of the appid then meets a rejected token once and renews, and any other client of the appid
  that does not renew by itself breaks. So `--online` calls it only when told so with
  `--rotate-token`; without, it explains and exits 2, having done nothing. (A confirmation flag
  rather than a prompt: the command runs in CI, with no terminal.) With a Redis store that is
  empty, the new token is fetched under the replicas' renewal lock and stored, so running
  replicas adopt it rather than meet a rejection.

Every tenant's sets are proven, `default`'s first. Lines about a set of the tenant `default`
other than its set `default` begin with the set's name in brackets (`[callcenter]`); lines about
a named tenant's set begin with the tenant's and the set's names (`[acme/default]`,
`[acme/callcenter]`), and each such set says all it has to say in one line (and, if it warns,
one warning line): with a thousand tenants, one line per set.

Exit status: 0 every set valid and proven; 1 some credentials or token were refused, or Sobot
or the token store cannot be reached; 2 (with nothing refused) a set could not be proven without
--rotate-token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Final, TextIO
from urllib.parse import urlsplit

import orjson
import structlog
from multidict import CIMultiDict
from yarl import URL

from proxy import upstream
from proxy.config.routes import DEFAULT_CREDENTIALS, CredentialSettings
from proxy.config.settings import MIB, Settings
from proxy.config.tenants import DEFAULT_TENANT
from proxy.logs import Secrets
from proxy.server.paths import split_target
from proxy.sobot import v5
from proxy.sobot.credential import Credential
from proxy.tokens.source import GetTokenFailed, token_client, token_source
from proxy.tokens.store import (
    RenewalBusy,
    StoredToken,
    StoreUnavailable,
    TokenStore,
    TokenStores,
    describe_store,
)

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
# The most of a probe's answer read: enough for any return code, bounded whatever comes.
PROBE_READ_LIMIT: Final = MIB


@dataclass(frozen=True, slots=True)
class _Report:
    out: TextIO
    err: TextIO
    prefix: str = ""  # "[set] " or "[tenant/set] ": see the module docstring
    # Said by end(), joined: one line (and one warning line) for the set.
    one_line: bool = False
    _lines: list[str] = field(default_factory=list)
    _warnings: list[str] = field(default_factory=list)

    def line(self, text: str) -> None:
        if self.one_line:
            self._lines.append(text)
        else:
            print(f"online: {self.prefix}{text}", file=self.out, flush=True)

    def warning(self, text: str) -> None:
        if self.one_line:
            self._warnings.append(text)
        else:
            print(f"sobot-proxy: warning: {self.prefix}{text}", file=self.err, flush=True)

    def end(self) -> None:
        if self._warnings:
            warned = "; ".join(self._warnings)
            print(f"sobot-proxy: warning: {self.prefix}{warned}", file=self.err, flush=True)
        if self._lines:
            print(f"online: {self.prefix}{'; '.join(self._lines)}", file=self.out, flush=True)


def prove(
    settings: Settings,
    *,
    rotate_token: bool,
    probe: str | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Prove every set's credentials work, as the module docstring says; the exit status."""
    return asyncio.run(
        _prove_all(settings, rotate_token=rotate_token, probe=probe, out=out, err=err)
    )


async def _prove_all(
    settings: Settings, *, rotate_token: bool, probe: str | None, out: TextIO, err: TextIO
) -> int:
    results = []
    if probe is not None:
        probe = "".join(split_target(probe))  # as the proxy forwards it: `//api/x` is `/api/x`
    for tenant in settings.all_tenants:
        # The probe proves the tenant's set of the route it goes along (if that route injects
        # one, and the tenant has it), at the route's upstream or the tenant's main one.
        probe_route = None if probe is None else _route_of(settings, probe, tenant.base_url)
        for config in tenant.credential_sets:
            report = _report_for(tenant.name, config.name, out, err)
            probed = probe if probe_route is not None and probe_route[1] == config.name else None
            base = probe_route[0] if probed is not None and probe_route is not None else None
            results.append(
                await _prove(
                    settings,
                    config,
                    tenant.base_url,
                    rotate_token=rotate_token,
                    probe=probed,
                    probe_base=base,
                    report=report,
                )
            )
            report.end()
    if EXIT_REFUSED in results:
        return EXIT_REFUSED
    return max(results)


def _report_for(tenant: str, credential_set: str, out: TextIO, err: TextIO) -> _Report:
    if tenant != DEFAULT_TENANT:
        return _Report(out, err, f"[{tenant}/{credential_set}] ", one_line=True)
    return _Report(
        out, err, "" if credential_set == DEFAULT_CREDENTIALS else f"[{credential_set}] "
    )


def probe_problem(settings: Settings, probe: str) -> str | None:
    """Why `probe` cannot prove a credential set under `settings`, if it cannot."""
    route = _route_of(settings, probe, settings.base_url)
    if route is None:
        return "no route serves it"
    if route[1] is None:
        return 'its route injects no credential (credentials = "none")'
    return None


def _route_of(settings: Settings, path: str, main_base_url: str) -> tuple[str, str | None] | None:
    """(base URL, credential set) of the route `path` goes along for a tenant whose main
    upstream is `main_base_url`; None: no route serves it."""
    path = split_target(path)[0]  # as the proxy takes it: `//api/x` is `/api/x`
    for route in settings.route_table:
        if path.startswith(route.prefix):
            return route.upstream(main_base_url), route.credentials
    return None


async def _prove(
    settings: Settings,
    config: CredentialSettings,
    main_base_url: str,
    *,
    rotate_token: bool,
    probe: str | None,
    probe_base: str | None,
    report: _Report,
) -> int:
    # The components log through structlog; their lines are not this command's output.
    log = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
    )
    credential = config.credential()
    tls = ssl.create_default_context(cafile=settings.ca_bundle)
    async with contextlib.AsyncExitStack() as resources:
        client = token_client(settings, tls)
        resources.push_async_callback(client.close)
        store: TokenStore | None = None
        if settings.token_store != "memory":
            stores = TokenStores(settings, log=log)
            resources.push_async_callback(stores.close)
            store = stores.make(namespace=credential.store_namespace, appid=config.appid, log=log)
            resources.push_async_callback(store.close)
        prover = _Prover(
            settings,
            config,
            credential,
            client,
            store,
            log,
            report,
            base_url=config.base_url or main_base_url,
            probe=probe,
            probe_base=probe_base or main_base_url,
        )
        call = _call_name(credential)
        try:
            if store is not None:
                found = await prover.shared_token()
                if found is not None:
                    if rotate_token:
                        report.line(f"--rotate-token not needed: {call} was not called")
                    return await prover.use(found, "the shared token")
            report.warning(_rotation_warning(credential, call, shared=store is not None))
            if not rotate_token:
                report.warning(
                    f"nothing was tested: add --rotate-token to call {call} all the same"
                    if store is not None
                    else f"nothing was tested: add --rotate-token to call {call} all the same, "
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


def _call_name(credential: Credential) -> str:
    """The token call as lines name it: get_token, /tokens/company."""
    return "get_token" if credential.kind == "v5" else credential.token_path


def _rotation_warning(credential: Credential, call: str, *, shared: bool) -> str:
    rejection = "900002" if credential.kind == "v5" else "a rejected token"
    consequence = (
        "it is stored for the replicas sharing the store to adopt, but any other holder of "
        "the old token"
        if shared
        else f"every running proxy of the appid will meet {rejection} once and renew, and any "
        "other client of the appid"
    )
    return (
        f"proving the credentials takes a {call} call, which issues a NEW token and "
        f"invalidates the one in use for appid {credential.appid}: {consequence} that does "
        "not renew by itself will fail"
    )


class _Prover:
    def __init__(
        self,
        settings: Settings,
        config: CredentialSettings,
        credential: Credential,
        client: upstream.Client,
        store: TokenStore | None,
        log: structlog.typing.FilteringBoundLogger,
        report: _Report,
        *,
        base_url: str,
        probe: str | None,
        probe_base: str,
    ) -> None:
        """`base_url`: where the set's token comes from; `probe_base`: where the probe goes."""
        self._settings = settings
        self._config = config
        self._credential = credential
        self._base_url = base_url
        self._client = client
        self._store = store
        self._log = log
        self._report = report
        self._probe = probe
        self._probe_base = probe_base

    async def shared_token(self) -> StoredToken | None:
        """The live token the store holds for the set, or None (said so)."""
        assert self._store is not None
        found = await self._store.load()
        where = describe_store(self._settings.token_store)
        call = _call_name(self._credential)
        if found is None or found.expires_at <= time.time():
            self._report.line(f"the token store {where} holds no token for the appid")
            return None
        self._report.line(
            f"the token store {where} holds a token for the appid, issued "
            f"{time.time() - found.issued_at:.0f} s ago, valid {found.expires_at - time.time():.0f}"
            f" s more; {call} not called (it would rotate the token every replica holds)"
        )
        return found

    async def rotate(self) -> int:
        """Call the token endpoint (under the replicas' renewal lock when there is a store)."""
        if self._store is None:
            issued = await self._fetch()
            return await self.use(issued, "the new token")
        async with self._store.renewal_lock():
            # A replica may have stored one while we waited for the lock: no need to rotate it.
            found = await self._store.load()
            if found is not None and found.expires_at > time.time():
                call = _call_name(self._credential)
                self._report.line(f"a replica stored a token meanwhile: using it, not {call}")
                return await self.use(found, "the shared token")
            issued = await self._fetch()
            try:
                await self._store.save(issued)
            except StoreUnavailable as exc:
                self._report.line(
                    f"the new token could not be stored ({exc}): running replicas will meet "
                    "a rejected token once and renew"
                )
                return EXIT_REFUSED
        self._report.line("the new token was stored: running replicas adopt it")
        return await self.use(issued, "the new token")

    async def _fetch(self) -> StoredToken:
        source = token_source(
            self._credential,
            self._base_url,
            self._settings,
            self._client,
            log=self._log,
            secrets=Secrets(),
        )
        issued_at = time.time()
        token = await source.fetch()  # GetTokenFailed says what Sobot answered, if it did
        self._report.line(
            f"{_call_name(self._credential)} succeeded at {self._base_url} for appid "
            f"{self._config.appid}: a token valid for {token.lifetime:g} s was issued (not shown)"
        )
        return StoredToken(token.value, issued_at, token.lifetime)

    async def use(self, token: StoredToken, what: str) -> int:
        """Send `token` on the read-only probe call, if one was named for this set."""
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
            # As the token call: the client's timeouts bound each wait, and this the whole call.
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
        if self._credential.rejected(status, ret_code):
            said = v5.describe(ret_code) if ret_code is not None else f"HTTP {status}"
            self._report.line(f"Sobot rejected {what} on GET {self._probe}: {said}")
            return EXIT_REFUSED
        if self._credential.kind == "v5" and ret_code is None:
            self._report.line(
                f"GET {self._probe} answered HTTP {status} without a Sobot return code: "
                f"{what} is not proven (is it an API of {self._probe_base}?)"
            )
            return EXIT_REFUSED
        if ret_code is None and status >= 400:
            self._report.line(
                f"GET {self._probe} answered HTTP {status}: {what} is not proven "
                f"(is it an API of {self._probe_base}?)"
            )
            return EXIT_REFUSED
        said = v5.describe(ret_code) if ret_code is not None else f"HTTP {status}"
        self._report.line(f"Sobot accepted {what}: GET {self._probe} answered {said}")
        return EXIT_OK

    async def _probe_exchange(self, token: StoredToken) -> tuple[int, bytes]:
        """GET the probe path with `token`: the status, and up to PROBE_READ_LIMIT bytes."""
        assert self._probe is not None
        base_url = self._probe_base
        headers: CIMultiDict[str] = CIMultiDict()
        self._credential.inject(headers, token.value)
        response = await self._client.request(
            "GET",
            upstream.Origin.of(base_url),
            # Encoded as a URL, as aiohttp would: the flag may be typed with raw characters.
            urlsplit(base_url).path + URL(self._probe).raw_path_qs,
            headers,
        )
        try:
            return response.status, await response.read_up_to(PROBE_READ_LIMIT)
        finally:
            response.release()
