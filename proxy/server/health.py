"""`/healthz` (the process answers) and `/readyz` (a valid token is held). Never forwarded."""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.errors import NotReady
from proxy.tokens.manager import TokenManager

_ALIVE = orjson.dumps({"status": "alive"})


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(body=_ALIVE, content_type="application/json")


def readyz(tokens: TokenManager) -> web.Response:
    """200 while a valid token is held; 503 with the reason (in Sobot's shape) otherwise."""
    status = tokens.status()
    body: dict[str, object]
    if status.ready:
        body = {"status": "ready", "token_expires_in": status.expires_in}
        if status.problem:  # a token is held, but its renewal is failing
            body["warning"] = status.problem
        return web.Response(body=orjson.dumps(body), content_type="application/json")
    body = {
        "ret_code": status.ret_code or NotReady.code,
        "ret_msg": status.problem,
        "status": "not ready",
        "configuration_error": status.configuration_error,
    }
    return web.Response(
        status=NotReady.status, body=orjson.dumps(body), content_type="application/json"
    )
