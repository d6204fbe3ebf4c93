"""Every request under the catch-all route: admission, dispatch, error answers, the log line,
and the drain at shutdown.

    admission   client key (401), the tenant (server/tenants.py: 403 for another tenant than
                the key's, 404 for an unknown one, 400 for X-Sobot-Tenant sent twice), request
                target (400), allow-lists (403)
    dispatch    a token request of a kind served (v5 get_token, V6 /tokens/company), in any
                spelling -> answered locally; a path a route serves -> forwarded along the
                tenant's route (403 when the tenant lacks the route's credential set);
                anything else -> 404
    answers     a ProxyError becomes its JSON answer; anything else a plain 500; every answer
                is written here, and its body let go once written (write_whole)
    record      one log line and the metrics, with the request's id (server/request_id.py)
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Iterable
from typing import Final, NamedTuple

import structlog
from aiohttp import HttpVersion11, hdrs, web
from multidict import CIMultiDictProxy

from proxy.coalesce import CoalescedTransport
from proxy.errors import (
    BadRequest,
    ExpectationFailed,
    Forbidden,
    InternalError,
    NotProxied,
    ProxyError,
)
from proxy.server.access import AccessPolicy
from proxy.server.body import NOTHING_RESERVED, Reservation
from proxy.server.exact_head import PiecewiseResponse
from proxy.server.forward import Forwarder
from proxy.server.local_token import LocalTokenEndpoint
from proxy.server.metrics import Metrics
from proxy.server.paths import as_served, split_target
from proxy.server.request_id import HEADER as REQUEST_ID_HEADER
from proxy.server.request_id import request_id_for
from proxy.server.request_log import RequestRecord
from proxy.server.routing import Route
from proxy.server.tenants import HEADER as TENANT_HEADER
from proxy.server.tenants import Tenant, Tenants
from proxy.sobot.credential import Credential


class Admitted(NamedTuple):
    """A request that may be served (the allow-lists still to apply): where it goes and for whom.
    Nothing is built for it: for a tenant not started yet, `route` is the shared prefixes' one
    (`default`'s), for the handler to bind (_bound) once the request is to be forwarded."""

    path: str
    query: str
    served: str  # the path as the upstream takes it (paths.as_served)
    kind: Credential | None  # the kind whose token request it is, answered locally
    route: Route | None  # the route it goes along (None for a token request)
    tenant_name: str
    tenant: Tenant | None  # if it has started
    key_tenant: str | None  # the client key's tenant, when client keys are on


# The spool room reserved when `Expect: 100-continue` was answered, for handle() to take over.
_RESERVED: Final = web.RequestKey("spool_reserved", Reservation)


async def write_whole(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Write an answer that is not prepared yet, whole, and let go of its body.

    aiohttp writes a returned answer after the handler and keeps it until the connection's next
    request arrives: a kept-alive client that went quiet after a 1 MiB answer would pin that
    MiB. Written here, the body goes as soon as the socket has taken it (a client that does not
    take it is cut by the send watchdog, server/connections.py), and aiohttp finds the answer done.
    """
    await response.prepare(request)
    if isinstance(response, PiecewiseResponse):
        await response.write_body()
    await response.write_eof()
    if isinstance(response, web.Response):
        response.body = None


class ApiHandler:
    def __init__(
        self,
        *,
        access: AccessPolicy,
        forwarder: Forwarder,
        tenants: Tenants,
        prefixes: Iterable[str],
        local_token: LocalTokenEndpoint,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """`prefixes`: the routes' (shared by every tenant), for the 404's message."""
        self._access = access
        self._forwarder = forwarder
        self._tenants = tenants
        self._not_routed = NotProxied(
            "no route serves this path: only paths under "
            + ", ".join(prefixes)
            + " are forwarded to Sobot"
        ).message
        self._local_token = local_token
        self._metrics = metrics
        self._log = log
        self._running: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._cutting = False

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def others_in_flight(self) -> bool:
        """Whether a request other than the current task's is in flight: then the current
        one's writes can wait for the end of the loop's pass, to leave with theirs."""
        running = self._running
        return len(running) > (1 if asyncio.current_task() in running else 0)

    def _admit(self, request: web.BaseRequest, record: RequestRecord) -> Admitted:
        """The request, once it may be served at all (see Admitted)."""
        # Authentication comes first, so a caller without a key learns nothing else.
        key_tenant = self._access.authenticate(request.headers)
        name = self._tenants.name_for_request(key_tenant, _named_tenant(request.headers))
        record.tenant = name
        path, query = split_target(request.raw_path)
        record.path = path
        kind = self._tenants.token_kind(path)
        served = as_served(path)
        tenant = self._tenants.built(name)
        route = (tenant or self._tenants.default).routes.match(served)
        if kind is not None:
            # Answered locally; counted under the route it would have gone along, if any.
            record.route = kind.token_path if route is None else route.prefix
            return Admitted(path, query, served, kind, None, name, tenant, key_tenant)
        if route is None:
            raise NotProxied(self._not_routed)
        record.route, record.credentials = route.prefix, route.credentials_name
        return Admitted(path, query, served, kind, route, name, tenant, key_tenant)

    def _refuse_lacking(self, admitted: Admitted) -> None:
        """Refuse a route whose credential set the request's tenant has not (a started tenant's
        routes know; else its configuration)."""
        route, name, tenant = admitted.route, admitted.tenant_name, admitted.tenant
        if route is None:
            return
        if tenant is not None:
            lacking = route.lacking
        else:  # the shared route: is its set one the tenant has?
            wanted = route.lacking or (route.credential_set and route.credential_set.name)
            lacking = wanted if wanted and not self._tenants.has_set(name, wanted) else None
        if lacking is not None:
            raise Forbidden(
                f"the tenant {name} has no credential set {lacking!r}, which the "
                f"route {route.prefix} injects"
            )

    def _shape(self, kind: Credential | None, route: Route | None) -> Credential | None:
        """The kind whose error shape a request's errors take: its token request's, or that of
        the credential set its route injects (the tenant's own, or another's of that name)."""
        if kind is not None:
            return kind
        if route is None:
            return None
        if route.credential_set is not None:
            return route.credential_set.credential
        return None if route.lacking is None else self._tenants.kind_of_set(route.lacking)

    def _bound(self, name: str, served: str) -> Route:
        """The route of the path `served` (as the upstream takes it) as the tenant `name` takes
        it, the tenant started now: its first request to be forwarded."""
        tenant = self._tenants.get(name)
        assert tenant is not None  # a configured name
        route = tenant.routes.match(served)
        assert route is not None  # the prefixes are shared
        return route

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse before the client sends its body, or invite it."""
        started = time.perf_counter()
        record = RequestRecord(request.method, request.path, request_id_for(request.headers))
        reserved = NOTHING_RESERVED
        shape = None
        try:
            admitted = self._admit(request, record)
            shape = self._shape(admitted.kind, admitted.route)
            self._refuse_lacking(admitted)
            self._access.authorize(request.method, admitted.served)
            if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
                raise ExpectationFailed("only `Expect: 100-continue` is understood")
            if admitted.kind is not None:
                self._local_token.admit(request)
            else:
                # Capacity, declared size and spool room: the refusal comes instead of the 100.
                reserved = self._forwarder.admit(request)
        except ProxyError as exc:
            record.status, record.ret_code, record.error = exc.status, exc.ret_code, exc.message
            response = _error_response(exc, shape)
            response.headers[REQUEST_ID_HEADER] = record.request_id
            response.force_close()  # the body was never invited: it cannot follow on this one
            with structlog.contextvars.bound_contextvars(request_id=record.request_id):
                self._finish(record, started)
            return response
        if request.version == HttpVersion11:
            try:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                # Drained here, where a cancellation releases the room: aiohttp's own drain
                # before handle() then has nothing to wait for.
                await request.writer.drain()
            except BaseException:
                reserved.release()
                raise
            request.writer.output_size = 0  # the interim answer is not the answer
        if reserved.size:
            request[_RESERVED] = reserved
            # Should handle() never run for this request, the room comes back with it.
            weakref.finalize(request, reserved.release)
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        record = RequestRecord(request.method, request.path, request_id_for(request.headers))
        # Every line logged while this request is handled carries its id. Reset at the end:
        # the requests of one kept-alive connection are handled in one task, one context.
        context = structlog.contextvars.bind_contextvars(request_id=record.request_id)
        try:
            response = await self._tracked(request, record, started)
            self._finish(record, started)
            return response
        finally:
            structlog.contextvars.reset_contextvars(**context)
            structlog.contextvars.unbind_contextvars("tenant")  # bound once known (_respond)

    async def _tracked(
        self, request: web.Request, record: RequestRecord, started: float
    ) -> web.StreamResponse:
        """The answer, written, with the request counted as in flight (for the drain and the
        metrics) while it is worked on; a request cut short is logged here."""
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
            self._idle.clear()
        self._metrics.in_flight.inc()
        transport = request.transport  # gone from the request once the connection is lost
        try:
            response = await self._respond(request, record)
            if not response.prepared:
                response.headers[REQUEST_ID_HEADER] = record.request_id
                if self._draining:
                    response.force_close()  # stopping: a kept-alive client must not send more
                try:
                    await write_whole(request, response)
                except ConnectionError:
                    record.error = "the client went away before its answer was written"
            return response
        except asyncio.CancelledError:
            if self._cutting:
                record.error = "cut: still running when the shutdown grace ran out"
            elif isinstance(transport, CoalescedTransport) and transport.cut_because:
                record.error = transport.cut_because  # the proxy cut it (server/connections.py)
            else:
                record.error = "cancelled: the client went away"
            self._finish(record, started)
            raise
        finally:
            self._metrics.in_flight.dec()
            if task is not None:
                self._running.discard(task)
            if not self._running:
                self._idle.set()

    async def _respond(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        """The answer to one request; what happened is noted in `record`."""
        reserved = request.pop(_RESERVED, None) if hdrs.EXPECT in request.headers else None
        shape = None
        try:
            admitted = self._admit(request, record)
            path, query, served, kind, route, name, tenant, key_tenant = admitted
            # Every line logged from now on while this request is handled names its tenant.
            structlog.contextvars.bind_contextvars(tenant=name)
            shape = self._shape(kind, route)
            self._refuse_lacking(admitted)
            self._access.authorize(request.method, served)
            if kind is not None:
                answer = await self._local_token.answer(request, kind, key_tenant=key_tenant)
                response, record.ret_code, record.credentials, answered_for = answer
                if answered_for is not None:
                    record.tenant = answered_for
                record.status = response.status
                return response
            if tenant is None:
                route = self._bound(name, served)
            assert route is not None
            return await self._forwarder.forward(request, route, path, query, record, reserved)
        except ProxyError as exc:
            record.status, record.ret_code, record.error = exc.status, exc.ret_code, exc.message
            return _error_response(exc, shape)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("internal_error", method=record.method, path=record.path)
            error = InternalError("the proxy failed to handle the request; see its log")
            record.status, record.ret_code = error.status, error.ret_code
            return _error_response(error, shape)
        finally:
            if reserved is not None:
                reserved.release()  # forward() has, unless it was never reached

    def _finish(self, record: RequestRecord, started: float) -> None:
        """The request's one log line and its metrics."""
        duration = time.perf_counter() - started
        self._log.info("request", **record.fields(duration))
        self._metrics.observe(record, duration)

    async def settled(self) -> None:
        """Return once every request in flight now has finished (each request runs in a task
        of its own): a reload closes what it retired only after that."""
        running = [task for task in self._running if task is not asyncio.current_task()]
        if running:
            await asyncio.wait(running)

    async def drain(self, grace: float) -> None:
        """Let requests in flight finish within `grace` seconds; cut (and log) the rest."""
        self._draining = True
        self._log.info("draining", in_flight=self.in_flight, grace_s=grace)
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            self._cutting = True
            running = list(self._running)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)


def _named_tenant(headers: CIMultiDictProxy[str]) -> str | None:
    """The tenant X-Sobot-Tenant names, if it is sent; sent twice, it names none for sure."""
    named = headers.getall(TENANT_HEADER, ())
    if len(named) > 1:
        raise BadRequest(f"{TENANT_HEADER} is sent more than once: send it once")
    return named[0] if named else None


def _error_response(error: ProxyError, shape: Credential | None) -> web.Response:
    """The proxy's own error answer, with the fields of the kind's own shape (V6's) beside
    Sobot's v5 `ret_code` and `ret_msg`."""
    if shape is None:
        return error.to_response()
    return error.to_response(shape.error_fields(error.status, error.message))
