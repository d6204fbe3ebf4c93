"""Errors a client can see, each with its HTTP status and a body in Sobot's shape.

    ProxyError                      any failure answered by the proxy itself
    ├── BadRequest          400     980400  a request target the proxy will not forward
    ├── NotProxied          404     980404  a path outside /api/ (never forwarded)
    ├── UnknownTenant       404     980404  X-Sobot-Tenant names no configured tenant
    ├── Unauthorized        401     980401  no valid client key (when client keys are set)
    ├── Forbidden           403     980403  a path or method outside the allow-lists; another
    │                                       tenant than the client key's; a route whose
    │                                       credential set the tenant does not have
    ├── ClientTimeout       408     980408  the client stopped sending its request body
    ├── ExpectationFailed   417     980417  an Expect header other than 100-continue
    ├── ClientGone          499     980499  the client went away (logged; nobody to answer)
    ├── BodyTooLarge        413     980413  a request body over the configured cap
    ├── UpstreamUnreachable 502     980502  cannot connect to Sobot, or it broke the exchange
    ├── Overloaded          503     980503  more requests waiting for Sobot than allowed
    ├── SpoolFull           503     980503  no room left to keep another large request body
    ├── UpstreamTimeout     504     980504  Sobot did not answer within the timeout
    ├── TokenUnavailable    502     <the token call's code, or 980502>
    ├── NotReady            503     <the token call's code, or 980503>  /readyz: a set lacks a token
    ├── SpoolFailed         507     980507  keeping a request body on disk failed (disk full, ...)
    └── InternalError       500     980500  a bug in the proxy; details go to the log only

Proxy codes are 98xxxx, where xxx is the HTTP status, so they never collide with Sobot's own
codes (000000, 7xxxxx, 9000xx, 999999) and any client that treats "not 000000" as failure keeps
working. Messages say what went wrong and what to check; they never carry a credential, an
internal path or a stack trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from aiohttp import web

from proxy.sobot import v5


def proxy_code(status: int) -> str:
    """The proxy's own ret_code for an answer of HTTP `status`: 980 + the status."""
    return f"980{status}"


class ProxyError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = proxy_code(500)  # derived from `status` for every subclass
    # The request body may be left unread: the connection cannot carry another request.
    closes_connection: bool = False

    def __init__(
        self,
        message: str,
        *,
        ret_code: str | None = None,
        closes_connection: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.ret_code = ret_code or self.code
        if closes_connection is not None:
            self.closes_connection = closes_connection

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.code = proxy_code(cls.status)

    def to_response(self, extra: Mapping[str, object] | None = None) -> web.Response:
        """The answer: Sobot's v5 shape, and `extra` fields (a kind's own shape) beside."""
        response = error_response(self.status, self.ret_code, self.message, extra)
        if self.closes_connection:
            response.force_close()
        return response


class BadRequest(ProxyError):
    status = 400


class NotProxied(ProxyError):
    status = 404


class UnknownTenant(ProxyError):
    status = 404


class Unauthorized(ProxyError):
    status = 401

    def to_response(self, extra: Mapping[str, object] | None = None) -> web.Response:
        response = super().to_response(extra)
        response.headers["WWW-Authenticate"] = 'Bearer realm="sobot-proxy"'
        return response


class Forbidden(ProxyError):
    status = 403


class ClientTimeout(ProxyError):
    status = 408
    closes_connection = True


class ExpectationFailed(ProxyError):
    status = 417


class ClientGone(ProxyError):
    status = 499  # nginx's convention for "client closed request": only ever in the log
    closes_connection = True


class BodyTooLarge(ProxyError):
    status = 413
    closes_connection = True


class UpstreamUnreachable(ProxyError):
    status = 502


class Overloaded(ProxyError):
    status = 503


class SpoolFull(ProxyError):
    """Refused before the body is read: it would not fit in the room left for spooled bodies."""

    status = 503
    closes_connection = True  # the unread body is large: not worth reading to keep the connection


class UpstreamTimeout(ProxyError):
    status = 504


class TokenUnavailable(ProxyError):
    """No valid token could be obtained; ret_code is the token endpoint's own code when it
    answered one, and `configuration_error` says no retry can fix it."""

    status = 502

    def __init__(
        self, message: str, *, ret_code: str | None = None, configuration_error: bool = False
    ) -> None:
        super().__init__(message, ret_code=ret_code)
        self.configuration_error = configuration_error


class NotReady(ProxyError):
    status = 503


class SpoolFailed(ProxyError):
    """Writing the body's spool failed: the proxy's storage, not the client, is at fault."""

    status = 507  # Insufficient Storage (RFC 4918, section 11.5)
    closes_connection = True  # the rest of the body is left unread

    def __init__(self, message: str, *, cause: OSError) -> None:
        super().__init__(message)
        self.cause = cause  # for the log only: it may name an internal path


class InternalError(ProxyError):
    status = 500


def sobot_response(
    ret_code: str, ret_msg: str, item: Mapping[str, Any] | None = None, *, status: int = 200
) -> web.Response:
    """An answer in Sobot's shape (v5.answer), as the proxy and the fake Sobot make one."""
    body = v5.answer(ret_code, ret_msg, item)
    return web.Response(status=status, body=body, content_type="application/json")


def error_response(
    status: int, ret_code: str, message: str, extra: Mapping[str, object] | None = None
) -> web.Response:
    if not extra:
        return sobot_response(ret_code, message, status=status)
    body = orjson.dumps({"ret_code": ret_code, "ret_msg": message, **extra})
    return web.Response(status=status, body=body, content_type="application/json")
