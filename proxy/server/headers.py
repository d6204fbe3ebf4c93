"""Header rules for both directions of the proxy (RFC 9110 section 7.6.1)."""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.server.request_id import HEADER as REQUEST_ID_HEADER
from proxy.server.tenants import HEADER as TENANT_HEADER

# Header names are compared in lower case: `name.lower() in` one of these sets. (An `istr` in a
# set would not do: it hashes as the spelling it was made with, and the upstream client and
# aiohttp's pure-Python parser keep names as the peer spelled them.)


def _names(*names: str) -> frozenset[str]:
    return frozenset(name.lower() for name in names)


# Meaningful only for one connection: never forwarded in either direction.
HOP_BY_HOP: Final = _names(
    hdrs.CONNECTION,
    hdrs.KEEP_ALIVE,
    hdrs.TE,
    hdrs.TRAILER,
    hdrs.TRANSFER_ENCODING,
    hdrs.UPGRADE,
    hdrs.PROXY_AUTHORIZATION,
    hdrs.PROXY_AUTHENTICATE,
    "Proxy-Connection",  # not standard, but still sent by some clients
)

# Also not copied upstream: Host and Content-Length are set for the upstream request itself,
# X-Request-Id is replaced by the request's id, and X-Sobot-Tenant is the proxy's own (which
# tenant: server/tenants.py). (A client's `token` or Authorization is
# replaced by the managed token where a route injects one: sobot/credential.py.) Expect
# was answered by the proxy's own server, which has the body by the time it forwards it.
_NOT_COPIED_UPSTREAM: Final = HOP_BY_HOP | _names(
    hdrs.HOST, hdrs.CONTENT_LENGTH, hdrs.EXPECT, REQUEST_ID_HEADER, TENANT_HEADER
)
# Addresses of callers, and of the proxies before them. Sobot is a third party: they reach it
# only when the operator asks for forwarding headers (Settings.forwarded_headers), and then the
# proxy sets X-Forwarded-For and -Proto itself.
FORWARDING: Final = _names(
    hdrs.FORWARDED, hdrs.X_FORWARDED_FOR, hdrs.X_FORWARDED_HOST, hdrs.X_FORWARDED_PROTO, "X-Real-IP"
)
# Content-Length is set by the server from the body it sends.
_NOT_COPIED_DOWNSTREAM: Final = HOP_BY_HOP | _names(hdrs.CONTENT_LENGTH)


def _connection_named(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names listed in Connection, which are hop-by-hop for this message only."""
    named = headers.getall(hdrs.CONNECTION, ())
    if not named:
        return frozenset()
    return frozenset(
        name.strip().lower() for value in named for name in value.split(",") if name.strip()
    )


def _copy(headers: CIMultiDictProxy[str], dropped: frozenset[str]) -> CIMultiDict[str]:
    dropped = dropped | _connection_named(headers) if hdrs.CONNECTION in headers else dropped
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in dropped:
            out.add(name, value)
    return out


class UpstreamHeaders:
    """The headers of the requests to Sobot, under rules fixed at start-up."""

    __slots__ = ("_dropped", "_forwarding")

    def __init__(self, *, consume_authorization: bool, forwarding: bool) -> None:
        """`consume_authorization`: Authorization carries the proxy's own client key (client
        keys are on), so it is not forwarded. `forwarding`: send X-Forwarded-For / -Proto."""
        dropped = _NOT_COPIED_UPSTREAM | FORWARDING
        if consume_authorization:
            dropped |= _names(hdrs.AUTHORIZATION)
        if forwarding:  # the client's own X-Forwarded-For is kept, the caller appended to it
            dropped -= _names(hdrs.FORWARDED, hdrs.X_FORWARDED_HOST, "X-Real-IP")
        self._dropped = dropped
        self._forwarding = forwarding

    def of(self, request: web.BaseRequest, request_id: str) -> CIMultiDict[str]:
        """The client's end-to-end headers, the request's id, and X-Forwarded-For / -Proto when
        forwarding; the token is set later."""
        headers = request.headers
        out = _copy(headers, self._dropped)
        if self._forwarding:
            chain = [
                *(hop for hop in headers.getall(hdrs.X_FORWARDED_FOR, ()) if hop.strip()),
                request.remote or "unknown",
            ]
            out[hdrs.X_FORWARDED_FOR] = ", ".join(chain)
            out[hdrs.X_FORWARDED_PROTO] = request.scheme
        out[REQUEST_ID_HEADER] = request_id
        return out


def downstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's answer headers for the client: all but the hop-by-hop ones."""
    return _copy(headers, _NOT_COPIED_DOWNSTREAM)
