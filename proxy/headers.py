"""Header rules for both directions of the proxy (RFC 9110 section 7.6.1)."""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.protocol import TOKEN_HEADER
from proxy.request_id import HEADER as REQUEST_ID_HEADER

# Meaningful only for one connection: never forwarded in either direction.
HOP_BY_HOP: Final = frozenset(
    istr(name)
    for name in (
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
)

# Also not copied upstream: Host and Content-Length are set for the upstream request itself,
# the client's token is replaced by the managed one, X-Forwarded-* and X-Request-Id are set
# below. Expect was answered by the proxy's own server, which has the body by the time it
# forwards it.
_NOT_COPIED_UPSTREAM: Final = HOP_BY_HOP | {
    istr(hdrs.HOST),
    istr(hdrs.CONTENT_LENGTH),
    istr(hdrs.EXPECT),
    istr(TOKEN_HEADER),
    istr(hdrs.X_FORWARDED_FOR),
    istr(hdrs.X_FORWARDED_PROTO),
    istr(REQUEST_ID_HEADER),
}
# Content-Length is set by the server from the body it sends.
_NOT_COPIED_DOWNSTREAM: Final = HOP_BY_HOP | {istr(hdrs.CONTENT_LENGTH)}


def _connection_named(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names listed in Connection, which are hop-by-hop for this message only."""
    named = headers.getall(hdrs.CONNECTION, ())
    if not named:
        return frozenset()
    return frozenset(
        name.strip().lower() for value in named for name in value.split(",") if name.strip()
    )


def _copy(headers: CIMultiDictProxy[str], dropped: frozenset[istr]) -> CIMultiDict[str]:
    named = _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name not in dropped and (not named or name.lower() not in named):
            out.add(name, value)
    return out


# With client keys on, Authorization carries the proxy's own credential: consumed, not forwarded.
_NOT_COPIED_UPSTREAM_AUTHENTICATED: Final = _NOT_COPIED_UPSTREAM | {istr(hdrs.AUTHORIZATION)}


def upstream_headers(
    headers: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    scheme: str,
    consume_authorization: bool,
    request_id: str,
) -> CIMultiDict[str]:
    """The client's end-to-end headers plus X-Forwarded-For / -Proto and the request's id;
    the token is set later."""
    dropped = _NOT_COPIED_UPSTREAM_AUTHENTICATED if consume_authorization else _NOT_COPIED_UPSTREAM
    out = _copy(headers, dropped)
    forwarded_for = ", ".join([*headers.getall(hdrs.X_FORWARDED_FOR, ()), client_ip or "unknown"])
    out[hdrs.X_FORWARDED_FOR] = forwarded_for
    out[hdrs.X_FORWARDED_PROTO] = scheme
    out[REQUEST_ID_HEADER] = request_id
    return out


def downstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's answer headers for the client: all but the hop-by-hop ones."""
    return _copy(headers, _NOT_COPIED_DOWNSTREAM)
