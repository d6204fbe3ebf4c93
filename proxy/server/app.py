"""The proxy's aiohttp application: routes, request handling, and resource lifetimes.

    make_app(settings) -> web.Application
        /healthz, /readyz          answered locally (server/health.py)
        /metrics                   Prometheus metrics (server/metrics.py), behind the client keys
        /api/get_token             answered locally (server/local_token.py)
        /api/...                   forwarded with the managed token (server/forward.py)
        anything else              404, never forwarded

The upstream clients (one for forwarding, a small one of get_token's own), the token store, the
token manager and its background refresher are opened at start-up and closed at shutdown through
cleanup_ctx; request handlers reach them through typed AppKeys.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.config.settings import Settings
from proxy.errors import ProxyError, error_response, proxy_code
from proxy.logs import Secrets, get_logger
from proxy.server.access import AccessPolicy
from proxy.server.body import SpoolBudget
from proxy.server.connections import ClientConnections
from proxy.server.forward import Forwarder
from proxy.server.handler import ApiHandler, write_whole
from proxy.server.health import healthz, readyz
from proxy.server.local_token import LocalTokenEndpoint
from proxy.server.metrics import CONTENT_TYPE, Metrics
from proxy.tokens.manager import Backoff, TokenManager
from proxy.tokens.source import token_client, token_source
from proxy.tokens.store import make_store
from proxy.upstream import Client

TOKENS: Final = web.AppKey("tokens", TokenManager)
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
    for key in (settings.app_key, *settings.client_keys, store_password or ""):
        secrets.add(key, lasting=True)
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
        # get_token has connections of its own: a pool full of slow requests must never keep
        # the token from being renewed.
        get_token_client = token_client(settings, tls)
        source = token_source(
            settings,
            get_token_client,
            log=log,
            secrets=secrets,
            on_result=lambda result: metrics.get_token.labels(result).inc(),
        )
        store = make_store(
            settings,
            log=log,
            workers_directory=workers_directory,
            on_error=metrics.store_errors.inc,
        )
        tokens = TokenManager(
            source,
            store=store,
            refresh_margin=settings.refresh_margin,
            log=log,
            backoff=backoff or Backoff(),
            secrets=secrets,
        )
        app[TOKENS] = tokens
        metrics.watch_token(tokens.expires_in)
        app[API] = ApiHandler(
            access=access,
            forwarder=Forwarder(
                settings,
                client=client,
                tokens=tokens,
                log=log,
                spool=SpoolBudget(
                    settings.spool_limit,
                    max_body=settings.max_body,
                    on_change=metrics.spool_reserved.set,
                ),
            ),
            local_token=LocalTokenEndpoint(
                appid=settings.appid, app_key=settings.app_key, tokens=tokens
            ),
            metrics=metrics,
            log=log,
        )
        tokens.start()
        try:
            yield
        finally:
            try:
                await tokens.stop()
            finally:
                try:
                    await store.close()
                finally:
                    await client.close()
                    await get_token_client.close()

    app.cleanup_ctx.append(lifetime)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_route("*", "/{tail:.*}", _api, expect_handler=_expect)
    return app


async def _readyz(request: web.Request) -> web.Response:
    return readyz(request.app[TOKENS])


async def _metrics(request: web.Request) -> web.Response:
    """The metrics, for whoever may use the API: the same client keys."""
    try:
        request.app[ACCESS].authenticate(request.headers)
    except ProxyError as exc:
        return exc.to_response()
    page = web.Response(body=request.app[METRICS].page(), headers={"Content-Type": CONTENT_TYPE})
    await write_whole(request, page)  # a scraper's kept-alive connection keeps no page
    return page
