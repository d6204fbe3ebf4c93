"""Making a tenant's served state from its settings: its credential sets (each with its token
source, store and manager) and its routes, bound to its main upstream and its sets.

    build(config)            a new tenant, its routes' tokens renewing from now on
    rekeyed(tenant, config)  the same tenant with new secrets: each set keeps its manager and
                             the token it holds; the next token call signs with the new secret
    retire(tenant)           a tenant a reload rebuilt or removed: no more renewing, while the
                             requests that hold it finish (its stores are closed later)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from proxy.config.routes import DEFAULT_CREDENTIALS, CredentialSettings, ResolvedRoute
from proxy.config.settings import Settings
from proxy.config.tenants import DEFAULT_TENANT, TenantSettings
from proxy.logs import Secrets
from proxy.server.credentials import CredentialSet, CredentialSets
from proxy.server.metrics import Metrics
from proxy.server.routing import Route, RouteTable
from proxy.server.tenants import Tenant
from proxy.sobot.credential import Credential
from proxy.sobot.kinds import KINDS
from proxy.tokens.manager import Backoff, TokenManager
from proxy.tokens.source import token_source
from proxy.tokens.store import TokenStores
from proxy.upstream import Client


def credential_of(config: CredentialSettings) -> Credential:
    return KINDS[config.kind](config.appid, config.secret, config.authorization_scheme)


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
        routed = {route.credentials for route in self.settings.route_table}
        sets = CredentialSets(
            [
                self._managed(config, tenant, config.name in routed)
                for config in tenant.credential_sets
            ]
        )
        for managed in sets:
            if managed.in_use:
                managed.tokens.start()
        if tenant.name != DEFAULT_TENANT:
            self.log.info("tenant_started", tenant=tenant.name)
        return Tenant(tenant.name, sets, self._routes(tenant, sets))

    def rekeyed(self, tenant: Tenant, config: TenantSettings, changed: frozenset[str]) -> Tenant:
        """`tenant` with the secrets of `config`, whose sets are the same but for the secrets of
        the sets named in `changed`."""
        configs = {each.name: each for each in config.credential_sets}
        sets = []
        for managed in tenant.sets:
            if managed.name in changed:
                credential = credential_of(configs[managed.name])
                managed.source.use(credential)
                managed = dataclasses.replace(managed, credential=credential)
            sets.append(managed)
        rekeyed = CredentialSets(sets)
        return Tenant(tenant.name, rekeyed, self._routes(config, rekeyed))

    def _routes(self, tenant: TenantSettings, sets: CredentialSets) -> RouteTable:
        return RouteTable(_bound(route, tenant, sets) for route in self.settings.route_table)

    def _managed(
        self, config: CredentialSettings, tenant: TenantSettings, in_use: bool
    ) -> CredentialSet:
        """One credential set of `tenant`, with its token source, store and manager (not
        started yet)."""
        settings = self.settings
        credential = credential_of(config)
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
        self.metrics.watch_token(tenant.name, config.name, tokens.expires_in)
        return CredentialSet(config.name, credential, tokens, source, store, in_use)


def retire(tenants: Iterable[Tenant]) -> list[CredentialSet]:
    """Stop the background renewal of `tenants`' sets for good; the sets, whose stores are
    to be closed once no request holds them."""
    retired = []
    for tenant in tenants:
        for managed in tenant.sets:
            managed.tokens.retire()
            retired.append(managed)
    return retired


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
