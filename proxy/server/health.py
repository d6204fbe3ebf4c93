"""`/healthz` (the process answers) and `/readyz` (every credential set in use holds a valid
token). Never forwarded.

A set is in use when a route injects it; one no route names is fetched only when a client asks
for its token, and does not decide readiness. The body reports each set; its top-level
`token_expires_in` is the `default` set's, as before there were several.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.errors import NotReady
from proxy.server.credentials import CredentialSets

_ALIVE = orjson.dumps({"status": "alive"})


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(body=_ALIVE, content_type="application/json")


def readyz(sets: CredentialSets) -> web.Response:
    """200 while every set in use holds a valid token; 503 with the reason (in Sobot's shape,
    from the first set without one) otherwise."""
    report: dict[str, dict[str, object]] = {}
    failing = None
    for managed in sets:
        status = managed.tokens.status()
        entry: dict[str, object] = {"kind": managed.credential.kind, "ready": status.ready}
        if not managed.in_use:
            entry["in_use"] = False  # no route injects it: fetched when a client asks
            if status.ready:
                entry["token_expires_in"] = status.expires_in
        elif status.ready:
            entry["token_expires_in"] = status.expires_in
            if status.problem:  # a token is held, but its renewal is failing
                entry["warning"] = status.problem
        else:
            entry["problem"] = status.problem
            entry["configuration_error"] = status.configuration_error
            if failing is None:
                failing = managed.name, status
        report[managed.name] = entry
    default = sets.default.tokens.status()
    body: dict[str, object]
    if failing is None:
        body = {"status": "ready", "token_expires_in": default.expires_in}
        warnings = [
            f"{name}: {entry['warning']}" for name, entry in report.items() if "warning" in entry
        ]
        if warnings:
            body["warning"] = "; ".join(warnings)
        body["credentials"] = report
        return web.Response(body=orjson.dumps(body), content_type="application/json")
    name, status = failing
    body = {
        "ret_code": status.ret_code or NotReady.code,
        "ret_msg": status.problem if name == sets.default.name else f"{name}: {status.problem}",
        "status": "not ready",
        "configuration_error": status.configuration_error,
        "credentials": report,
    }
    return web.Response(
        status=NotReady.status, body=orjson.dumps(body), content_type="application/json"
    )
