"""The proxy's aiohttp application: routes, request handling, and resource lifetimes.

    make_app(settings) -> web.Application
        /healthz, /readyz          answered locally (health.py)
        /metrics                   Prometheus metrics (metrics.py), behind the client keys
        a token request            v5 /api/get_token, V6 /tokens/company: answered locally
                                   (local_token.py)
        a path a route serves      forwarded along the route, with its credential set's token
                                   (routing.py, forward.py)
        anything else              404, never forwarded

The upstream clients (one for forwarding, a small one of the token calls' own) and, for each
credential set, its token store, token manager and background refresher are opened at start-up
and closed at shutdown through cleanup_ctx; request handlers reach them through typed AppKeys.
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

from proxy.config.routes import DEFAULT_CREDENTIALS, CredentialSettings
from proxy.config.settings import Settings
from proxy.errors import ProxyError, error_response, proxy_code
from proxy.logs import Secrets, get_logger
from proxy.server.access import AccessPolicy
from proxy.server.body import SpoolBudget
from proxy.server.connections import ClientConnections
from proxy.server.credentials import CredentialSet, CredentialSets
from proxy.server.forward import Forwarder
from proxy.server.handler import ApiHandler, write_whole
from proxy.server.health import healthz, readyz
from proxy.server.local_token import LocalTokenEndpoint
from proxy.server.metrics import CONTENT_TYPE, GET_TOKEN_RESULTS, Metrics
from proxy.server.routing import Route, RouteTable
from proxy.sobot.kinds import KINDS
from proxy.tokens.manager import Backoff, TokenManager
from proxy.tokens.source import token_client, token_source
from proxy.tokens.store import TokenStore, make_store
from proxy.upstream import Client

CREDENTIALS: Final = web.AppKey("credentials", CredentialSets)
ROUTES: Final = web.AppKey("routes", RouteTable)
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
    for key in (
        *(config.secret for config in settings.credential_sets),
        *settings.client_keys,
        store_password or "",
    ):
        secrets.add(key, lasting=True)
    app = web.Application(middlewares=[_json_http_errors])
    log = get_logger()
    access = AccessPolicy(settings)
    metrics = Metrics(
        routes=settings.metrics_routes,
        credential_sets=tuple(config.name for config in settings.credential_sets),
    )
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
        routed = {route.credentials for route in settings.route_table}
        sets = CredentialSets(
            [
                _managed(
                    config,
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
                for config in settings.credential_sets
            ]
        )
        app[CREDENTIALS] = sets
        routes = RouteTable(
            Route.to(
                route.prefix,
                route.base_url,
                None if route.credentials is None else sets.named(route.credentials),
            )
            for route in settings.route_table
        )
        app[ROUTES] = routes
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
            routes=routes,
            local_token=LocalTokenEndpoint(sets, read_timeout=settings.upstream_timeout),
            metrics=metrics,
            log=log,
        )
        for managed in sets:
            if managed.in_use:
                managed.tokens.start()
        try:
            yield
        finally:
            try:
                for managed in sets:
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
    return readyz(request.app[CREDENTIALS])


async def _metrics(request: web.Request) -> web.Response:
    """The metrics, for whoever may use the API: the same client keys."""
    try:
        request.app[ACCESS].authenticate(request.headers)
    except ProxyError as exc:
        return exc.to_response()
    page = web.Response(body=request.app[METRICS].page(), headers={"Content-Type": CONTENT_TYPE})
    await write_whole(request, page)  # a scraper's kept-alive connection keeps no page
    return page


def _managed(
    config: CredentialSettings,
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
    """One credential set, with its token source, store (added to `stores`, for closing) and
    manager (not started yet)."""
    credential = KINDS[config.kind](config.appid, config.secret, config.authorization_scheme)
    set_log = log.bind(credentials=config.name)
    get_token_calls = {
        result: metrics.get_token.labels(config.name, result) for result in GET_TOKEN_RESULTS
    }
    source = token_source(
        credential,
        config.base_url or settings.base_url,
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
        check_hint=_check_hint(config.name),
    )
    metrics.watch_token(config.name, tokens.expires_in)
    return CredentialSet(config.name, credential, tokens, in_use)


def _check_hint(name: str) -> str:
    """What to check when Sobot refuses the set `name`."""
    if name == DEFAULT_CREDENTIALS:
        return "check SOBOT_APPID, SOBOT_APP_KEY and the region / base URL"
    return f"check appid, app_key and upstream / region of [credentials.{name}] in the config file"
