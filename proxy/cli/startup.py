"""The start-up summary: what this proxy serves, where, along which routes, with which token
store, and whether each credential set got a token. One `started` event; in console format, a
block laid out for people."""

from __future__ import annotations

import structlog

from proxy.config.settings import REGIONS, Settings
from proxy.server.credentials import CredentialSets
from proxy.server.routing import RouteTable
from proxy.tokens.manager import TokenStatus

# How a field reads in the console block, where it differs from its name.
_LABELS = {"token_status": "token"}


async def announce(
    sets: CredentialSets,
    routes: RouteTable,
    settings: Settings,
    log: structlog.typing.FilteringBoundLogger,
    *,
    url: str,
    worker: str | None,
    token_store: str,
) -> None:
    """Log the summary once each set's first token is held or its fetch has failed.

    `worker` is "i/N" in a worker of several; `token_store` is as describe_store gives it.
    """
    statuses = [
        (managed, await managed.tokens.first_outcome() if managed.in_use else None)
        for managed in sets
    ]
    region = next((name for name, base in REGIONS.items() if base == settings.base_url), None)
    fields: dict[str, object] = {
        "upstream": settings.base_url if region is None else f"{settings.base_url} ({region})",
        "listening": url,
        "token_store": token_store,
        "workers": worker or str(settings.workers),
        "client_keys": len(settings.client_keys),
        # The default set's. Not `token`: the logs mask a field of that name whatever it holds
        # (logs.py).
        "token_status": _token(statuses[0][1]),
    }
    if len(statuses) > 1:
        fields["credentials"] = [
            f"{managed.name} ({managed.credential.kind}): {_token(status)}"
            for managed, status in statuses
        ]
    fields["routes"] = [
        f"{route.prefix} -> {route.base_url} ({route.credentials_name})" for route in routes
    ]
    if settings.log_format == "console":
        labels = {name: _LABELS.get(name, name.replace("_", " ")) for name in fields}
        width = max(map(len, labels.values()))
        lines = "\n".join(
            f"  {labels[name]:<{width}}  {_lines(value, width)}" for name, value in fields.items()
        )
        log.info(f"sobot-proxy started\n{lines}")
    else:
        log.info("started", **fields)


def _lines(value: object, width: int) -> str:
    """A field's value in the console block: a list one item a line, aligned."""
    if isinstance(value, list):
        return f"\n  {'':<{width}}  ".join(map(str, value))
    return str(value)


def _token(status: TokenStatus | None) -> str:
    if status is None:
        return "not fetched: no route uses it (fetched when a client asks for its token)"
    if status.ready:
        return f"obtained, expires in {status.expires_in:.0f} s"
    return f"not yet: {status.problem}"
