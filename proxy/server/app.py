"""The proxy's aiohttp application: routes, request handling, and resource lifetimes.

    make_app(settings) -> web.Application
        /healthz, /readyz          answered locally (health.py)
        /metrics                   Prometheus metrics (metrics.py), behind the client keys
        a token request            v5 /api/get_token, V6 /tokens/company: answered locally
                                   (local_token.py)
        a path a route serves      forwarded along the requesting tenant's route, with its
                                   credential set's token (tenants.py, routing.py, forward.py)
        anything else              404, never forwarded

The upstream clients (one for forwarding, a small one of the token calls' own) are opened at
start-up and closed at shutdown through cleanup_ctx, and so is, for each credential set of each
tenant, its token store, token manager and background refresher: `default`'s at start-up, a
named tenant's when it is first used (tenants.py). Request handlers reach them through typed
AppKeys.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.config.routes import DEFAULT_CREDENTIALS, CredentialSettings, ResolvedRoute
from proxy.config.settings import Settings
from proxy.config.tenants import DEFAULT_TENANT, TenantSettings
from proxy.errors import Forbidden, ProxyError, error_response, proxy_code
from proxy.logs import Secrets, get_logger
from proxy.server.access import AccessPolicy
from proxy.server.body import SpoolBudget
from proxy.server.connections import ClientConnections
from proxy.server.credentials import CredentialSet, CredentialSets
from proxy.server.forward import Forwarder
from proxy.server.handler import ApiHandler, write_whole
from proxy.server.health import healthz, readyz
from proxy.server.local_token import LocalTokenEndpoint
from proxy.server.metrics import CONTENT_TYPE, Metrics
from proxy.server.routing import Route, RouteTable
from proxy.server.tenants import Tenant, Tenants
from proxy.sobot.kinds import KINDS
from proxy.tokens.manager import Backoff, TokenManager
from proxy.tokens.source import token_client, token_source
from proxy.tokens.store import TokenStore, make_store
from proxy.upstream import Client

TENANTS: Final = web.AppKey("tenants", Tenants)
CREDENTIALS: Final = web.AppKey("credentials", CredentialSets)  # `default`'s
ROUTES: Final = web.AppKey("routes", RouteTable)  # `default`'s
API: Final = web.AppKey("api", ApiHandler)
ACCESS: Final = web.AppKey("access", AccessPolicy)
METRICS: Final = web.AppKey("metrics", Metrics)
CONNECTIONS: Final = web.AppKey("connections", ClientConnections)


@web.middleware
async def _json_http_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (a target no route matches, such as `OPTIONS *`) in Sobot's shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, proxy_code(exc.status), exc.reason)


async def _api(request: web.Request) -> web.StreamResponse:
    return await request.app[API].handle(request)


async def _expect(request: web.Request) -> web.StreamResponse | None:
    return await request.app[API].expect(request)


def upstream_client(settings: Settings, tls: ssl.SSLContext) -> Client:
    """The forwarding path's client: lean, pooled keep-alive connections (proxy.upstream). It never
    resends a request, adds no header and leaves bodies as they are."""
    return Client(
        tls,
        connections=settings.upstream_connections,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.upstream_timeout,
    )


def make_app(
    settings: Settings,
    *,
    secrets: Secrets | None = None,
    backoff: Backoff | None = None,
    workers_directory: str | None = None,
    open_files_limit: int | None = None,
) -> web.Application:
    """The proxy for `settings`; `secrets` is the logs' registry of values never to show;
    `workers_directory`, in a worker of several, where the workers share their token;
    `open_files_limit`, the descriptor limit its client connections are counted against.

    Its listening site takes the client connections' limits from `app[CONNECTIONS]`."""
    secrets = secrets if secrets is not None else Secrets()
    store_password = urlsplit(settings.token_store).password or settings.token_store_password
    tenant_secrets = (c.secret for tenant in settings.all_tenants for c in tenant.credential_sets)
    # All at once: the scrubber is built once, however many tenants and keys.
    secrets.add_lasting((*tenant_secrets, *settings.client_keys, store_password or ""))
    app = web.Application(middlewares=[_json_http_errors])
    log = get_logger()
    access = AccessPolicy(settings)
    metrics = Metrics(routes=settings.metrics_routes)
    app[ACCESS] = access
    app[METRICS] = metrics
    metrics.spool_limit.set(settings.spool_limit)
    app[CONNECTIONS] = ClientConnections(
        header_timeout=settings.header_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        # The read timeout, both ways: the longest wait for the client to take the next bytes.
        send_timeout=settings.upstream_timeout,
        log=log,
        metrics=metrics,
        open_files_limit=open_files_limit,
    )

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        tls = ssl.create_default_context(cafile=settings.ca_bundle)
        client = upstream_client(settings, tls)
        # Token calls have connections of their own: a pool full of slow requests must never
        # keep a token from being renewed.
        get_token_client = token_client(settings, tls)
        stores: list[TokenStore] = []
        route_table = settings.route_table
        routed = {route.credentials for route in route_table}

        def build(tenant: TenantSettings) -> Tenant:
            """A tenant's sets and routes, its routes' tokens renewing from now on."""
            sets = CredentialSets(
                [
                    _managed(
                        config,
                        tenant,
                        settings,
                        get_token_client,
                        metrics=metrics,
                        log=log,
                        secrets=secrets,
                        backoff=backoff or Backoff(),
                        workers_directory=workers_directory,
                        stores=stores,
                        in_use=config.name in routed,
                    )
                    for config in tenant.credential_sets
                ]
            )
            routes = RouteTable(_bound(route, tenant, sets) for route in route_table)
            for managed in sets:
                if managed.in_use:
                    managed.tokens.start()
            if tenant.name != DEFAULT_TENANT:
                log.info("tenant_started", tenant=tenant.name)
            return Tenant(tenant.name, sets, routes)

        tenants = Tenants(settings.all_tenants, build)
        app[TENANTS] = tenants
        app[CREDENTIALS] = tenants.default.sets
        app[ROUTES] = tenants.default.routes
        app[API] = ApiHandler(
            access=access,
            forwarder=Forwarder(
                settings,
                client=client,
                log=log,
                spool=SpoolBudget(
                    settings.spool_limit,
                    max_body=settings.max_body,
                    on_change=metrics.spool_reserved.set,
                ),
            ),
            tenants=tenants,
            prefixes=[route.prefix for route in tenants.default.routes],
            local_token=LocalTokenEndpoint(tenants, read_timeout=settings.upstream_timeout),
            metrics=metrics,
            log=log,
        )
        try:
            yield
        finally:
            try:
                for tenant in tenants.started():
                    for managed in tenant.sets:
                        await managed.tokens.stop()
            finally:
                try:
                    for store in stores:
                        await store.close()
                finally:
                    await client.close()
                    await get_token_client.close()

    app.cleanup_ctx.append(lifetime)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    # Every path, a decoded newline in it too (`.` would stop at one, and aiohttp's own 404
    # would answer without the proxy's checks): the handler refuses what it must.
    app.router.add_route("*", r"/{tail:[\s\S]*}", _api, expect_handler=_expect)
    return app


async def _readyz(request: web.Request) -> web.Response:
    """Open to probes: ready or not, and counts. With client keys, which tenants there are is an
    operator's business (a key bound to `default`): only such a key sees the tenants' names and
    may ask about any tenant; a tenant's key may ask about its own, whatever else it names
    refused alike, so no caller learns which names are configured."""
    access, tenants = request.app[ACCESS], request.app[TENANTS]
    tenant = request.query.get("tenant")
    if not access.authenticates:  # on loopback: whoever calls may pick any tenant anyway
        return readyz(tenants, tenant)
    try:
        key_tenant = access.authenticate(request.headers)
    except ProxyError as exc:
        if tenant is None:
            return readyz(tenants, names_tenants=False)
        return exc.to_response()
    if tenant is None:
        return readyz(tenants, names_tenants=key_tenant == DEFAULT_TENANT)
    if key_tenant not in (DEFAULT_TENANT, tenant):
        return Forbidden("the client key may ask about its own tenant only").to_response()
    return readyz(tenants, tenant)


async def _metrics(request: web.Request) -> web.Response:
    """The metrics, for whoever may use the API: the same client keys, bound to `default` (an
    operator's): the series name every tenant."""
    try:
        key_tenant = request.app[ACCESS].authenticate(request.headers)
        if key_tenant not in (None, DEFAULT_TENANT):
            raise Forbidden("only a client key of the `default` tenant may read the metrics")
    except ProxyError as exc:
        return exc.to_response()
    page = web.Response(body=request.app[METRICS].page(), headers={"Content-Type": CONTENT_TYPE})
    await write_whole(request, page)  # a scraper's kept-alive connection keeps no page
    return page


def _bound(route: ResolvedRoute, tenant: TenantSettings, sets: CredentialSets) -> Route:
    """A shared route as `tenant` takes it: to its main upstream unless the route names its
    own, injecting its set of the route's name (marked lacking if it has none)."""
    base_url = route.upstream(tenant.base_url)
    if route.credentials is None:
        return Route.to(route.prefix, base_url, None)
    managed = sets.find(route.credentials)
    lacking = route.credentials if managed is None else None
    return Route.to(route.prefix, base_url, managed, lacking=lacking)


def _managed(
    config: CredentialSettings,
    tenant: TenantSettings,
    settings: Settings,
    client: Client,
    *,
    metrics: Metrics,
    log: structlog.typing.FilteringBoundLogger,
    secrets: Secrets,
    backoff: Backoff,
    workers_directory: str | None,
    stores: list[TokenStore],
    in_use: bool,
) -> CredentialSet:
    """One credential set of `tenant`, with its token source, store (added to `stores`, for
    closing) and manager (not started yet)."""
    credential = KINDS[config.kind](config.appid, config.secret, config.authorization_scheme)
    named_tenant = tenant.name != DEFAULT_TENANT
    set_log = log.bind(credentials=config.name)
    if named_tenant:  # `default`'s lines stay as they were before there were tenants
        set_log = set_log.bind(tenant=tenant.name)
    get_token_calls = metrics.token_calls(tenant.name, config.name)
    source = token_source(
        credential,
        config.base_url or tenant.base_url,
        settings,
        client,
        log=set_log,
        secrets=secrets,
        on_result=lambda result: get_token_calls[result].inc(),
    )
    store = make_store(
        settings,
        namespace=credential.store_namespace,
        appid=config.appid,
        log=set_log,
        workers_directory=workers_directory,
        on_error=metrics.store_errors.inc,
    )
    stores.append(store)
    tokens = TokenManager(
        source,
        store=store,
        refresh_margin=settings.refresh_margin if credential.uses_refresh_margin else math.inf,
        latest_renewal_fraction=credential.renewal_fraction,
        log=set_log,
        backoff=backoff,
        secrets=secrets,
        check_hint=_check_hint(tenant.name, config.name),
        # A named tenant unused for a token's life stops renewing; `default` never does.
        pauses_when_idle=named_tenant,
    )
    metrics.watch_token(tenant.name, config.name, tokens.expires_in)
    return CredentialSet(config.name, credential, tokens, in_use)


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
