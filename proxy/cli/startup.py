"""The start-up summary: what this proxy serves, where, with which token store, and whether it
got a token. One `started` event; in console format, a block laid out for people."""

from __future__ import annotations

import structlog

from proxy.config.settings import REGIONS, Settings
from proxy.tokens.manager import TokenManager

# How a field reads in the console block, where it differs from its name.
_LABELS = {"token_status": "token"}


async def announce(
    tokens: TokenManager,
    settings: Settings,
    log: structlog.typing.FilteringBoundLogger,
    *,
    url: str,
    worker: str | None,
    token_store: str,
) -> None:
    """Log the summary once the first token is held or its fetch has failed.

    `worker` is "i/N" in a worker of several; `token_store` is as describe_store gives it.
    """
    status = await tokens.first_outcome()
    region = next((name for name, base in REGIONS.items() if base == settings.base_url), None)
    if status.ready:
        token = f"obtained, expires in {status.expires_in:.0f} s"
    else:
        token = f"not yet: {status.problem}"
    fields = {
        "upstream": settings.base_url if region is None else f"{settings.base_url} ({region})",
        "listening": url,
        "token_store": token_store,
        "workers": worker or str(settings.workers),
        "client_keys": len(settings.client_keys),
        # Not `token`: the logs mask a field of that name whatever it holds (logs.py).
        "token_status": token,
    }
    if settings.log_format == "console":
        labels = {name: _LABELS.get(name, name.replace("_", " ")) for name in fields}
        width = max(map(len, labels.values()))
        lines = "\n".join(f"  {labels[name]:<{width}}  {value}" for name, value in fields.items())
        log.info(f"sobot-proxy started\n{lines}")
    else:
        log.info("started", **fields)
