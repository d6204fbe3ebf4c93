"""`/healthz` (the process answers) and `/readyz` (every credential set in use holds a valid
token). Never forwarded.

A set is in use when a route injects it; one no route names is fetched only when a client asks
for its token, and does not decide readiness. The body reports each set; its top-level
`token_expires_in` is the `default` set's, as before there were several.

Tenants: readiness is `default`'s, whose tokens are fetched at start-up. A named tenant starts
on its first request and may sit idle (its tokens left to expire), so it cannot decide whether
the proxy takes traffic, and one company's refused key must not take every other company's
proxy out of its load balancer. The body stays short with a thousand tenants: `default`'s sets
in full, then `tenants`: how many are configured, started and failing (0 included), and, only
when some fail, the problem of the first PROBLEMS_SHOWN started tenants whose tokens fail. A
set whose token is valid but whose renewal fails (a new key Sobot refuses after a reload:
`configuration_error`) stays ready and says so: `warning`, `problem` and `configuration_error`
in its entry, `warning` at the top.
`/readyz?tenant=NAME` reports that tenant's sets in full, and is 503 while one it uses lacks a
token. Who may see the tenants' names is the caller's to decide (app.py): with client keys, only
an operator's key.
"""

from __future__ import annotations

import itertools
from typing import Final

import orjson
from aiohttp import web

from proxy.errors import NotReady, UnknownTenant
from proxy.server.credentials import CredentialSets
from proxy.server.tenants import Tenants
from proxy.tokens.manager import TokenStatus

_ALIVE = orjson.dumps({"status": "alive"})
# The failing tenants named in /readyz's summary at most (`failing` counts them all).
PROBLEMS_SHOWN: Final = 20


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(body=_ALIVE, content_type="application/json")


def readyz(
    tenants: Tenants, tenant: str | None = None, *, names_tenants: bool = True
) -> web.Response:
    """200 while every set `default` uses (or the tenant `tenant`, if named) holds a valid
    token; 503 with the reason (in Sobot's shape, from the first set without one) otherwise.
    `names_tenants`: the summary may name the failing tenants (else it only counts them)."""
    if tenant is None:
        summary = _tenants_summary(tenants, names_tenants)
        return _ready(tenants.default.sets, {"tenants": summary})
    started = tenants.built(tenant)
    if started is None:
        if tenants.is_configured(tenant):
            body = {"status": "not started", "tenant": tenant}
            return web.Response(body=orjson.dumps(body), content_type="application/json")
        return UnknownTenant("the tenant named by ?tenant= is not configured").to_response()
    return _ready(started.sets, {"tenant": tenant})


def _tenants_summary(tenants: Tenants, names_tenants: bool) -> dict[str, object]:
    """How many tenants are configured, started and failing, and what fails for which (if
    `names_tenants`)."""
    started = list(tenants.started())
    problems = {}
    for tenant in started[1:]:  # `default` is reported in full
        report, failing = _report(tenant.sets)
        if failing is not None:
            name, status = failing
            problems[tenant.name] = f"{name}: {status.problem}"
        else:
            warnings = _warnings(report)
            if warnings:
                problems[tenant.name] = warnings
    summary: dict[str, object] = {
        "configured": tenants.configured,
        "started": len(started),
        "failing": len(problems),  # always, 0 included: a probe's query needs no default
    }
    if problems and names_tenants:  # the first few: a probe's answer stays short when many fail
        summary["problems"] = dict(itertools.islice(problems.items(), PROBLEMS_SHOWN))
    return summary


def _report(
    sets: CredentialSets,
) -> tuple[dict[str, dict[str, object]], tuple[str, TokenStatus] | None]:
    """Each set's entry, and the first set in use without a valid token (and its status)."""
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
            if status.problem:  # a token is held, but its renewal is failing: it serves on
                entry["warning"] = status.problem
                entry["problem"] = status.problem
                entry["configuration_error"] = status.configuration_error
        elif status.ret_code is None and not managed.tokens.renewing:
            entry["idle"] = True  # a named tenant's, unused: renewed again when next used
        else:
            # Its last token call failed (idle or not: a refused tenant that paused is still
            # refused), or the first is under way.
            entry["problem"] = status.problem
            entry["configuration_error"] = status.configuration_error
            if not managed.tokens.renewing:
                entry["idle"] = True
            if failing is None:
                failing = managed.name, status
        report[managed.name] = entry
    return report, failing


def _warnings(report: dict[str, dict[str, object]]) -> str:
    return "; ".join(
        f"{name}: {entry['warning']}" for name, entry in report.items() if "warning" in entry
    )


def _ready(sets: CredentialSets, extra: dict[str, object]) -> web.Response:
    report, failing = _report(sets)
    default = sets.default.tokens.status()
    body: dict[str, object]
    if failing is None:
        body = {"status": "ready", "token_expires_in": default.expires_in}
        warnings = _warnings(report)
        if warnings:
            body["warning"] = warnings
        body["credentials"] = report
        body.update(extra)
        return web.Response(body=orjson.dumps(body), content_type="application/json")
    name, status = failing
    body = {
        "ret_code": status.ret_code or NotReady.code,
        "ret_msg": status.problem if name == sets.default.name else f"{name}: {status.problem}",
        "status": "not ready",
        "configuration_error": status.configuration_error,
        "credentials": report,
        **extra,
    }
    return web.Response(
        status=NotReady.status, body=orjson.dumps(body), content_type="application/json"
    )
