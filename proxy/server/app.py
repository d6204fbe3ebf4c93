"""The proxy's aiohttp application: routes, request handling, and resource lifetimes.

    make_app(settings) -> web.Application
        /healthz, /readyz          answered locally (health.py)
        /metrics                   Prometheus metrics (metrics.py), behind the client keys
        a token request            v5 /api/get_token, V6 /tokens/company: answered locally
                                   (local_token.py)
        a path a route serves      forwarded along the requesting tenant's route, with its
                                   credential set's token (tenants.py, routing.py, forward.py)
        anything else              404, never forwarded

The upstream clients (one for forwarding, a small one of the token calls' own) and the token
stores' one Redis client (tokens/store.py: TokenStores) are opened at start-up and closed at
shutdown through cleanup_ctx, and so is, for each credential set of each
tenant, its token store, token manager and background refresher: `default`'s at start-up, a
named tenant's when it is first used (tenants.py, building.py). A reload (reload.py) changes
tenants, secrets and client keys while the app runs. Request handlers reach them through typed
AppKeys.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.config.settings import Settings
from proxy.config.tenants import DEFAULT_TENANT
from proxy.errors import Forbidden, ProxyError, error_response, proxy_code
from proxy.logs import Secrets, get_logger
from proxy.server.access import AccessPolicy
from proxy.server.body import SpoolBudget
from proxy.server.building import TenantBuilder
from proxy.server.connections import ClientConnections
from proxy.server.forward import Forwarder
from proxy.server.handler import ApiHandler, write_whole
from proxy.server.health import healthz, readyz
from proxy.server.local_token import LocalTokenEndpoint
from proxy.server.metrics import CONTENT_TYPE, Metrics
from proxy.server.reload import WATCH_INTERVAL, Reloader, secrets_of
from proxy.server.tenants import Tenants
from proxy.tokens.manager import Backoff
from proxy.tokens.source import token_client
from proxy.tokens.store import StorePassword, TokenStores
from proxy.upstream import Client

# The tenants as they are now (a reload replaces `default`'s sets and routes: read them here).
TENANTS: Final = web.AppKey("tenants", Tenants)
RELOADER: Final = web.AppKey("reloader", Reloader)
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
    reload_with: Callable[[], Settings] | None = None,
    watch_interval: float = WATCH_INTERVAL,
) -> web.Application:
    """The proxy for `settings`; `secrets` is the logs' registry of values never to show;
    `workers_directory`, in a worker of several, where the workers share their token;
    `open_files_limit`, the descriptor limit its client connections are counted against;
    `reload_with`, the configuration loaded again as at start-up: given, the proxy reloads on
    SIGHUP and when a secret file changes (looked at every `watch_interval` s; server/reload.py).

    Its listening site takes the client connections' limits from `app[CONNECTIONS]`."""
    secrets = secrets if secrets is not None else Secrets()
    # All at once: the scrubber is built once, however many tenants and keys.
    secrets.add_lasting(secrets_of(settings))
    store_password = StorePassword.of(settings)
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
        stores = TokenStores(
            settings,
            log=log,
            workers_directory=workers_directory,
            on_error=metrics.store_errors.inc,
            password=store_password,
        )
        builder = TenantBuilder(
            settings,
            get_token_client,
            metrics,
            log,
            secrets,
            backoff or Backoff(),
            stores,
        )
        tenants = Tenants(settings.all_tenants, builder)
        app[TENANTS] = tenants
        api = app[API] = ApiHandler(
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
        reloader = app[RELOADER] = Reloader(
            settings,
            tenants=tenants,
            access=access,
            store_password=store_password,
            secrets=secrets,
            metrics=metrics,
            log=log,
            settled=api.settled,
        )
        if reload_with is not None:
            reloader.start(reload_with, interval=watch_interval)
        try:
            yield
        finally:
            try:
                await reloader.close()
                for tenant in tenants.started():
                    for managed in tenant.sets:
                        await managed.tokens.stop()
            finally:
                try:
                    for tenant in tenants.started():
                        for managed in tenant.sets:
                            await managed.store.close()
                    await stores.close()
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
