"""Forwarding one client request along its route, with its credential set's token, and the one
replay after a rejected token.

A request goes to its route's upstream (routing.py) with the token of the route's credential set
injected as its kind injects it (sobot/credential.py), or with nothing injected on a route whose
credentials are `none`. It reaches the upstream twice only when the answer means the injected
token was rejected (v5: ret_code 900002 or 900001; V6: HTTP 401): the token is replaced
(tokens/manager.py) and the identical request is sent once more. Nothing else is ever retried.

Answers are inspected only when they may carry a Sobot return code and are small enough to read
whole (INSPECT_LIMIT); everything else streams through to the client. Either way their heads go
out as Sobot's bytes (server/exact_head.py).

The exchange itself goes through upstream.Client (pooled keep-alive connections on httptools);
its errors are translated to the client's here, in _upstream_error.
"""

from __future__ import annotations

import asyncio
import errno
import tempfile
import time
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Final

import aiohttp
import orjson
import structlog
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from proxy import upstream
from proxy.config.settings import Settings
from proxy.errors import (
    BadRequest,
    BodyTooLarge,
    ClientGone,
    ClientTimeout,
    Overloaded,
    ProxyError,
    SpoolFailed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.server.body import NOTHING_RESERVED, Deadline, ReplayableBody, Reservation, SpoolBudget
from proxy.server.exact_head import (
    WRITE_PIECE,
    ExactHeadResponse,
    ExactHeadStreamResponse,
    PiecewiseResponse,
    write_in_pieces,
)
from proxy.server.headers import UpstreamHeaders, downstream_headers
from proxy.server.request_id import HEADER as REQUEST_ID_HEADER
from proxy.server.request_log import RequestRecord
from proxy.server.routing import Route
from proxy.sobot import v5

# Answers up to this size that may be JSON are read whole to find their ret_code. Sobot's
# error answers are a few hundred bytes; a larger answer streams through uninspected.
INSPECT_LIMIT: Final = 1024 * 1024


@dataclass(slots=True)
class _Answer:
    """An upstream answer, read whole (body) or still to be streamed (body is a prefix)."""

    response: upstream.Response
    body: bytes
    complete: bool
    ret_code: str | None


class Forwarder:
    def __init__(
        self,
        settings: Settings,
        *,
        client: upstream.Client,
        log: structlog.typing.FilteringBoundLogger,
        spool: SpoolBudget | None = None,
    ) -> None:
        # The client has the connect and read timeouts. No overall limit: a large download may
        # take long, but it must keep moving. The wait for a free connection is the queue's
        # business (`_slots`), not the connect timeout's.
        self._client = client
        self._log = log
        self._read_timeout = settings.upstream_timeout
        self._connect_timeout = settings.connect_timeout
        self._max_body = settings.max_body
        self._upstream_headers = UpstreamHeaders(
            consume_authorization=bool(settings.client_keys),
            forwarding=settings.forwarded_headers,
        )
        self._temp_dir = settings.temp_dir
        self._spool = spool or SpoolBudget(settings.spool_limit, max_body=settings.max_body)
        # One slot per connection to Sobot, held for a whole exchange; up to max_queue more
        # requests wait for one, and any beyond that are refused.
        self._slots = asyncio.Semaphore(settings.upstream_connections)
        self._capacity = settings.upstream_connections + settings.max_queue
        self._active = 0

    def check_capacity(self) -> None:
        """Raise Overloaded when the pool and its queue are full."""
        if self._active >= self._capacity:
            raise Overloaded("too many requests are waiting for Sobot; try again shortly")

    def check_declared_length(self, request: web.BaseRequest) -> None:
        if request.content_length is not None and request.content_length > self._max_body:
            raise BodyTooLarge(f"request body over the limit of {self._max_body} bytes")

    def admit(self, request: web.BaseRequest) -> Reservation:
        """Before the body is read: refuse (raise) a request that cannot be taken now, or
        reserve the spool room its body may need. The caller releases the reservation."""
        self.check_capacity()
        self.check_declared_length(request)
        if not request.body_exists:
            return NOTHING_RESERVED
        return self._spool.reserve(request.content_length)

    async def forward(
        self,
        request: web.Request,
        route: Route,
        path: str,
        query: str,
        record: RequestRecord,
        reserved: Reservation | None = None,
    ) -> web.StreamResponse:
        """Forward one request along `route`, noting in `record` what happened. `reserved`:
        the spool room admit() gave it already (answering `Expect: 100-continue`); released
        here."""
        if reserved is None:
            reserved = self.admit(request)
        else:
            self.check_capacity()  # again: others may have come since the 100 Continue
        self._active += 1
        body = None
        try:
            if request.body_exists:
                body = ReplayableBody(
                    request.content,
                    max_size=self._max_body,
                    temp_dir=self._temp_dir,
                    reservation=reserved,
                )
            async with self._slots:
                return await self._forward(request, route, path + query, body, record)
        finally:
            self._active -= 1
            if body is not None:
                body.close()
            reserved.release()

    async def _forward(
        self,
        request: web.Request,
        route: Route,
        target: str,
        body: ReplayableBody | None,
        record: RequestRecord,
    ) -> web.StreamResponse:
        target = route.base_path + target  # as the client sent it: already encoded
        headers = self._upstream_headers.of(request, record.request_id)
        if request.content_length is not None and body is not None:
            headers[hdrs.CONTENT_LENGTH] = str(request.content_length)
        data = None if body is None else body.first_pass()
        managed = route.credential_set
        if managed is None:
            answer = await self._send(request.method, route, target, headers, data, body, record)
        else:
            credential, tokens = managed.credential, managed.tokens
            token = await tokens.get()
            credential.inject(headers, token.value)
            answer = await self._send(request.method, route, target, headers, data, body, record)
            if credential.rejected(answer.response.status, answer.ret_code):
                answer.response.release()
                token = await tokens.replace(token)
                credential.inject(headers, token.value)
                data = None if body is None else body.replay()
                answer = await self._send(
                    request.method, route, target, headers, data, body, record
                )
        record.status, record.ret_code = answer.response.status, answer.ret_code
        return await self._relay(request, answer, record)

    async def _send(
        self,
        method: str,
        route: Route,
        target: str,
        headers: CIMultiDict[str],
        data: AsyncGenerator[bytes] | None,
        body: ReplayableBody | None,
        record: RequestRecord,
    ) -> _Answer:
        """One attempt: send, then read the answer whole if it may carry a return code."""
        record.attempts += 1
        sent = time.perf_counter()
        try:
            response = await self._request(method, route.origin, target, headers, data, body)
            try:
                return await self._inspect(response)
            except BaseException:
                response.release()
                raise
        finally:
            record.upstream_s += time.perf_counter() - sent

    async def _request(
        self,
        method: str,
        origin: upstream.Origin,
        target: str,
        headers: CIMultiDict[str],
        data: AsyncGenerator[bytes] | None,
        body: ReplayableBody | None,
    ) -> upstream.Response:
        """Send the request and wait for the answer's headers.

        The client's read timeout only starts once the body is sent, so with a body this phase
        has a deadline of its own: connect plus read timeout at first, then read timeout from
        the last time body bytes moved. A failing client body ends it at once.
        """
        try:
            if body is None:
                # Only the head to send: the client's own connect and read timeouts bound every
                # wait, and a deadline of ours would be one more timer per request for nothing.
                return await self._client.request(method, origin, target, headers, data)
            async with asyncio.timeout(self._connect_timeout + self._read_timeout) as timeout:
                body.deadline = Deadline(timeout, self._read_timeout)
                return await self._client.request(method, origin, target, headers, data)
        except (TimeoutError, upstream.ClientError) as exc:
            # The client's side of the body explains a failure first: too large, malformed,
            # or stalled.
            if body is not None and body.error is not None:
                if isinstance(body.error, SpoolFailed):
                    self._log_spool_failure(body.error.cause)
                raise _client_body_error(body.error) from None
            if body is not None and body.waiting_for_client and isinstance(exc, TimeoutError):
                raise ClientTimeout("the client stopped sending its request body") from None
            raise _upstream_error(exc) from None
        finally:
            if body is not None:
                body.deadline = None  # the answer has come: bytes still to send set no deadline

    def _log_spool_failure(self, cause: OSError) -> None:
        """The operator's side of a 507: what the disk said, never a byte of the body."""
        self._log.error(
            "spool_failed",
            errno=errno.errorcode.get(cause.errno or 0, "unknown"),
            reason=cause.strerror or type(cause).__name__,
            temp_dir=self._temp_dir or tempfile.gettempdir(),
            reserved_bytes=self._spool.reserved,
            spool_limit=self._spool.limit,
        )

    async def _inspect(self, response: upstream.Response) -> _Answer:
        """Read a small answer that may be JSON whole and find its ret_code."""
        content_type = response.headers.get(hdrs.CONTENT_TYPE, "").lower()
        may_be_json = (
            "json" in content_type or content_type.startswith("text/plain") or (not content_type)
        )
        length = response.content_length
        if not may_be_json or (length is not None and length > INSPECT_LIMIT):
            return _Answer(response, b"", complete=False, ret_code=None)
        try:
            body = await response.read_up_to(INSPECT_LIMIT + 1)
        except (TimeoutError, upstream.ClientError) as exc:
            raise _upstream_error(exc) from None
        if len(body) > INSPECT_LIMIT:
            return _Answer(response, body, complete=False, ret_code=None)
        encoding = response.headers.get(hdrs.CONTENT_ENCODING, "identity")
        return _Answer(response, body, complete=True, ret_code=_ret_code(body, encoding))

    async def _relay(
        self, request: web.Request, answer: _Answer, record: RequestRecord
    ) -> web.StreamResponse:
        sobot = answer.response
        headers = downstream_headers(sobot.headers)
        headers[REQUEST_ID_HEADER] = record.request_id
        if not answer.complete:
            return await self._stream(request, answer, headers, record)
        sobot.release()  # before the answer is written (by the handler): Sobot's slot is free
        if request.method == hdrs.METH_HEAD and sobot.content_length is not None:
            # A HEAD answer has no body but tells the length a GET would have.
            headers[hdrs.CONTENT_LENGTH] = str(sobot.content_length)
            response = ExactHeadStreamResponse(status=sobot.status, headers=headers)
            await response.prepare(request)
            await response.write_eof()
            return response
        if len(answer.body) > WRITE_PIECE:
            return PiecewiseResponse(status=sobot.status, body=answer.body, headers=headers)
        return ExactHeadResponse(status=sobot.status, body=answer.body, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        answer: _Answer,
        headers: CIMultiDict[str],
        record: RequestRecord,
    ) -> web.StreamResponse:
        sobot = answer.response
        if sobot.content_length is not None:
            headers[hdrs.CONTENT_LENGTH] = str(sobot.content_length)
        response = ExactHeadStreamResponse(status=sobot.status, headers=headers)
        try:
            await response.prepare(request)
            chunk = answer.body  # what inspection already read, if anything
            while True:
                try:
                    # A client that stops reading is cut by the send watchdog
                    # (server/connections.py), which cancels this and lets Sobot's connection go.
                    await write_in_pieces(response, chunk)
                except (ConnectionError, aiohttp.ClientConnectionError):
                    record.error = "the client went away mid-answer"
                    return response
                try:
                    chunk = await sobot.readany()
                except (TimeoutError, upstream.ClientError) as exc:
                    # Headers are gone already: the only honest signal left is to abort the
                    # connection, so the client never takes a truncated body for a whole one.
                    record.error = f"Sobot broke off its answer ({type(exc).__name__})"
                    self._log.warning("upstream_aborted", path=record.path, reason=record.error)
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if not chunk:
                    break
            await response.write_eof()
        finally:
            sobot.release()
        return response


def _client_body_error(exc: BaseException) -> ProxyError:
    """The client-facing error when reading the client's own body failed."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, HttpProcessingError):
        return BadRequest("the request body is malformed", closes_connection=True)
    return ClientGone("the client went away while sending its body")


def _upstream_error(exc: BaseException) -> ProxyError:
    """The client-facing error for a failed exchange with Sobot (no URL, no credential)."""
    if isinstance(exc, upstream.ConnectTimeout):
        return UpstreamTimeout("could not connect to Sobot in time")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("Sobot did not answer in time")
    if isinstance(exc, upstream.ConnectError):
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            # The proxy's own limit, not Sobot's fault: its clients hold every descriptor.
            return Overloaded(
                "the proxy has no file descriptors left to connect to Sobot (its open files "
                "limit is reached); try again shortly, and see its log"
            )
        return UpstreamUnreachable(
            f"cannot connect to Sobot at {exc.host}:{exc.port} ({exc.reason})"
        )
    return UpstreamUnreachable(f"the exchange with Sobot failed ({type(exc).__name__})")


def _ret_code(body: bytes, content_encoding: str) -> str | None:
    """The Sobot return code of an answer body, if it is a JSON object that carries one."""
    encoding = content_encoding.strip().lower()
    try:
        if encoding == "gzip":
            body = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body, 4 * INSPECT_LIMIT)
        elif encoding == "deflate":
            # RFC 9110 says zlib-wrapped; some servers send raw deflate. Try both.
            try:
                body = zlib.decompressobj().decompress(body, 4 * INSPECT_LIMIT)
            except zlib.error:
                body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, 4 * INSPECT_LIMIT)
        elif encoding not in ("", "identity"):
            return None  # e.g. br: relayed as is, not inspected
        stripped = body.lstrip()
        if not stripped.startswith(b"{"):
            return None
        return v5.ret_code_of(orjson.loads(stripped))
    except (zlib.error, orjson.JSONDecodeError):
        return None
