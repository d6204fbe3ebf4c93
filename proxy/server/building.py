"""Making a tenant's served state from its settings: its credential sets (each with its token
source, store and manager) and its routes, bound to its main upstream and its sets.

    build(config)                    a new tenant, its routes' tokens renewing from now on
    rebuild(tenant, before, config)  a started tenant as a reload has it, worked out: each set
                                     whose kind, appid and token upstream are the same keeps
                                     its manager and the token it holds (a new secret signs
                                     the next token call), the others are made anew
    commit(rebuilt)                  put that in force: sources switched, new sets started
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import structlog

from proxy.config.routes import DEFAULT_CREDENTIALS, CredentialSettings, ResolvedRoute
from proxy.config.settings import Settings
from proxy.config.tenants import DEFAULT_TENANT, TenantSettings
from proxy.logs import Secrets
from proxy.server.credentials import CredentialSet, CredentialSets
from proxy.server.metrics import Metrics
from proxy.server.routing import Route, RouteTable
from proxy.server.tenants import Rebuilt, SetChanges, Tenant
from proxy.tokens.manager import Backoff, TokenManager
from proxy.tokens.source import token_source
from proxy.tokens.store import TokenStores
from proxy.upstream import Client


@dataclass(frozen=True, slots=True)
class TenantBuilder:
    """What every tenant's sets are made with: the settings a reload does not change (the
    routes, the store, the timeouts), the token calls' client, and the logs and metrics."""

    settings: Settings
    client: Client
    metrics: Metrics
    log: structlog.typing.FilteringBoundLogger
    secrets: Secrets
    backoff: Backoff
    stores: TokenStores

    def build(self, tenant: TenantSettings) -> Tenant:
        """A tenant's sets and routes, its routes' tokens renewing from now on."""
        sets = CredentialSets([self._managed(config, tenant) for config in tenant.credential_sets])
        for managed in sets:
            self._start(tenant.name, managed, at_once=True)
        if tenant.name != DEFAULT_TENANT:
            self.log.info("tenant_started", tenant=tenant.name)
        return Tenant(tenant.name, sets, self._routes(tenant, sets))

    def rebuild(self, tenant: Tenant, config: TenantSettings, changes: SetChanges) -> Rebuilt:
        """`tenant` (started) as `config` has it, `changes` its sets' changes, set by set: a set
        whose kind, appid and token upstream are the same keeps its manager, source and store
        (with the new credential if that changed), the others are made anew; its routes are
        bound again. Nothing is started or switched here (`commit` does that)."""
        sets, fresh, rekeyed = [], [], []
        for set_config in config.credential_sets:
            managed = tenant.sets.find(set_config.name)
            if managed is not None and set_config.name in changes.kept:
                if set_config.name in changes.rekeyed:
                    managed = dataclasses.replace(managed, credential=set_config.credential())
                    rekeyed.append(managed)
            else:
                managed = self._managed(set_config, config)
                fresh.append(managed)
            sets.append(managed)
        kept = {id(managed.tokens) for managed in sets}
        retired = tuple(managed for managed in tenant.sets if id(managed.tokens) not in kept)
        bound = CredentialSets(sets)
        return Rebuilt(
            Tenant(config.name, bound, self._routes(config, bound)),
            tuple(fresh),
            tuple(rekeyed),
            retired,
        )

    def commit(self, rebuilt: Rebuilt) -> None:
        """The kept sets' sources sign with their new credentials from now on; the new sets
        start: `default`'s at once, a named tenant's on its next use (like a tenant not started
        yet: a reload costs an idle tenant no token call)."""
        for managed in rebuilt.rekeyed:
            managed.source.use(managed.credential)
        for managed in rebuilt.fresh:
            self._start(rebuilt.tenant.name, managed, at_once=rebuilt.tenant.name == DEFAULT_TENANT)

    def _start(self, tenant: str, managed: CredentialSet, *, at_once: bool) -> None:
        self.metrics.watch_token(tenant, managed.name, managed.tokens.expires_in)
        if not managed.in_use:
            return
        if at_once:
            managed.tokens.start()
        else:
            managed.tokens.start_when_used()

    def _routes(self, tenant: TenantSettings, sets: CredentialSets) -> RouteTable:
        return RouteTable(_bound(route, tenant, sets) for route in self.settings.route_table)

    def _managed(self, config: CredentialSettings, tenant: TenantSettings) -> CredentialSet:
        """One credential set of `tenant`, with its token source, store and manager (not
        started yet, nothing else told of it)."""
        settings = self.settings
        credential = config.credential()
        named_tenant = tenant.name != DEFAULT_TENANT
        set_log = self.log.bind(credentials=config.name)
        if named_tenant:  # `default`'s lines stay as they were before there were tenants
            set_log = set_log.bind(tenant=tenant.name)
        get_token_calls = self.metrics.token_calls(tenant.name, config.name)
        source = token_source(
            credential,
            config.base_url or tenant.base_url,
            settings,
            self.client,
            log=set_log,
            secrets=self.secrets,
            on_result=lambda result: get_token_calls[result].inc(),
        )
        store = self.stores.make(
            namespace=credential.store_namespace, appid=config.appid, log=set_log
        )
        tokens = TokenManager(
            source,
            store=store,
            refresh_margin=settings.refresh_margin if credential.uses_refresh_margin else math.inf,
            latest_renewal_fraction=credential.renewal_fraction,
            log=set_log,
            backoff=self.backoff,
            secrets=self.secrets,
            check_hint=_check_hint(tenant.name, config.name),
            # A named tenant unused for a token's life stops renewing; `default` never does.
            pauses_when_idle=named_tenant,
        )
        in_use = any(route.credentials == config.name for route in self.settings.route_table)
        return CredentialSet(config.name, credential, tokens, source, store, in_use)


def _bound(route: ResolvedRoute, tenant: TenantSettings, sets: CredentialSets) -> Route:
    """A shared route as `tenant` takes it: to its main upstream unless the route names its
    own, injecting its set of the route's name (marked lacking if it has none)."""
    base_url = route.upstream(tenant.base_url)
    if route.credentials is None:
        return Route.to(route.prefix, base_url, None)
    managed = sets.find(route.credentials)
    lacking = route.credentials if managed is None else None
    return Route.to(route.prefix, base_url, managed, lacking=lacking)


def _check_hint(tenant: str, name: str) -> str:
    """What to check when Sobot refuses the set `name` of `tenant`."""
    if tenant != DEFAULT_TENANT:
        if name == DEFAULT_CREDENTIALS:
            return f"check appid, app_key and region / base_url of [tenants.{tenant}]"
        return (
            f"check appid, app_key and upstream / region of "
            f"[tenants.{tenant}.credentials.{name}] in the config file"
        )
    if name == DEFAULT_CREDENTIALS:
        return "check SOBOT_APPID, SOBOT_APP_KEY and the region / base URL"
    return f"check appid, app_key and upstream / region of [credentials.{name}] in the config file"
