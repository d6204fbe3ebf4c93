"""A fake Sobot upstream that speaks the protocol faithfully, for tests, demos and development.

It serves the v5 token families and, when given V6 credentials, the V6 call centre; two fakes with
different credentials can run side by side (two hosts) in one test.

- `GET /api/get_token` checks appid (900004 if unknown, whatever the rest), create_time (900003
  if more than 300 s from this clock) and sign (900003), with the proxy's own check
  (v5.check_token_request), then issues a NEW token that invalidates the previous one.
- Every path under a v5 prefix (`prefixes`: by default /api/, /chat-facebook/api/,
  /chat-third/api/, /comm-open/api/, /text/ai-agent-open/) checks the `token` header (900001
  when empty, 900002 when not the current token or expired) and answers like the echo: what
  arrived, so a demo shows it. The token value itself is never echoed, only whether it was valid
  and which one it was. The body is streamed through a sha256, never held whole: `Received.body`
  is kept up to 1 MiB only.
- V6 (`v6_appid` and `v6_secret` given; otherwise its prefixes are not served): `POST
  /tokens/company` checks the JSON body with the proxy's own check (V6Credential.check: HTTP 401
  for an unknown appId, a wrong sign or a stale currentTime, 400 for a body that is no token
  request), then issues a NEW JWT (HS256 with a key of this fake's; payload appId, iat, exp,
  serial, jti) that supersedes the previous one, answered as the vendor's page shows:
  {"response_type": "token", "access_token": JWT, "expires_in": milliseconds}.
  Every path under a v6 prefix (`v6_prefixes`, by default /callservice/) takes the JWT in
  `Authorization`, as `Bearer <jwt>` or bare: a missing, unknown, expired or superseded one is
  HTTP 401 with a V6 error ({"code": 401, "message", "status": "Error"}); a valid one gets the
  echo in the V6 envelope ({"apiVersion": "6.2", "status": "Success", "message": "ok",
  "code": 200, "data": echo}), with `authorization_form` "bearer" or "bare" (never the token).
- Any other path is 404, and counted in `stats.outside_api_calls`, as is a request whose path, as
  Sobot's servlet container resolves it (servlet_path), leaves the prefix it came in under: a
  proxy bug either way.
- Faults, chosen per request by the client with an `X-Fake-Fault` header (end-to-end, so it
  crosses the proxy), under every served prefix. They apply once the request is recorded and its
  token accepted; a token rejection or a scripted answer comes first. Any other value is answered
  400, so a typo is loud.
    html502            502 with a small HTML page, like a load balancer's
    truncate           Content-Length: 2048, 1024 bytes sent, then the connection closed (FIN)
    reset              the same, then the connection aborted (RST)
    stall              no answer at all, until the fake stops
    drop               the request read whole, then the connection closed with no answer
    early              the echo at once, before the request's body is read (body_size 0)
    stall-body         Content-Length: 2048, 1024 bytes sent, then nothing until the fake stops
    download=N         a 200 of N bytes of `download_bytes(N)`, streamed (`download_sha256(N)`)
    slow-download=N    the same without Content-Length (chunked)
    delay=S            wait S seconds (a float), then answer normally
    gbk-filename       a 200 download of 1024 bytes named in GBK bytes (GBK_DISPOSITION, not
                       UTF-8, as Sobot's exports are), written raw; `gbk-filename=TYPE` sends
                       Content-Type TYPE instead of application/vnd.ms-excel
    lowercase-headers  a 200 `{"ret_code":"000000"}`, chunked, as an HTTP/2 gateway writes it:
                       every header name in lower case, hop-by-hop ones (`connection: close,
                       x-hop`, `x-hop`, `keep-alive`, `proxy-authenticate`) among them; raw
- Many companies (`companies`, `v6_companies`, or `fake-sobot --companies-file`): one fake
  serves them all, each with its own key and tokens; a token call for one supersedes only that
  one's previous token, and a request is accepted with any company's current token.
- Controls under `/_fake/` (under no served prefix, so never reachable through the proxy).
  `kind=v6` makes expire, lifetime, fail-get-token and app-key act on the V6 token (default:
  v5), and `appid=A` on company A's (default: the fake's own `appid` / `v6_appid`):
    GET  /_fake/stats                       counters (token serials: the fake's own company's)
    POST /_fake/expire?kind=K               expire the current token now
    POST /_fake/lifetime?seconds=N&kind=K   the lifetime of the next tokens issued
    POST /_fake/app-key?appid=A&kind=K      the body is the company's new app_key (app_secret):
                                            token calls signed with the old one are refused
                                            (900003; V6 401), tokens issued stay valid
    POST /_fake/fail-get-token?mode=M&times=N&kind=K
         M = `malformed`, `http500`, `disconnect` or `stall` (no answer until the fake stops),
         or for v5 a ret_code (e.g. 900003), for v6 a numeric code C (a V6 error with code C,
         HTTP status C when C is 400-599, else 200); N = -1 for always
    POST /_fake/script?times=N&status=S     the next N answers, under any prefix, are the JSON
                                            body posted
    POST /_fake/hold, /_fake/release        stop answering requests under the prefixes, and
                                            start again
    POST /_fake/reset                       forget everything but the credentials
The same controls are methods on FakeSobot for in-process tests.

`stats.open_requests` counts handlers under the prefixes still running and
`stats.cancelled_requests` those that ended cancelled because their client went away;
`await fake.wait_until_idle()` returns once none is running (for leak tests). Disconnects cancel
handlers only on a runner made with `handler_cancellation=True`, as `start()` and
`make_runner()` make it.

Run it alone: `sobot-proxy fake-sobot --port P --appid A --app-key K [--v6-appid A6
--v6-secret S6] [--companies-file FILE]` (FILE: more v5 companies, one `appid app_key` a line).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import math
import secrets
import socket
import ssl
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import unquote

import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict

from proxy.errors import sobot_response
from proxy.sobot import v5, v6
from proxy.sobot.credential import ClientTokenRequest

Kind = Literal["v5", "v6"]
V5_PREFIXES: Final = (
    "/api/",
    "/chat-facebook/api/",
    "/chat-third/api/",
    "/comm-open/api/",
    "/text/ai-agent-open/",
)
V6_PREFIXES: Final = ("/callservice/",)
_TOKEN_FAILURES: Final = frozenset({"malformed", "http500", "disconnect", "stall"})
# The V6 pages' answer envelope, around the echo of a request under a v6 prefix.
V6_ENVELOPE: Final = {"apiVersion": "6.2", "status": "Success", "message": "ok", "code": 200}
V6_REJECTIONS: Final = {
    "missing": "no token in Authorization",
    "expired": "token has expired",
    "superseded": "token has been replaced by a newer one",
    "unknown": "token is not valid",
}

ECHOED_BODY_LIMIT: Final = 4096  # larger bodies are echoed as size and sha256 only
KEPT_BODY_LIMIT: Final = 1024 * 1024

FAULT_HEADER: Final = "X-Fake-Fault"
PARTIAL_LENGTH: Final = 2048  # what truncate, reset and stall-body announce...
PARTIAL_SENT: Final = 1024  # ...and what they send
_SIMPLE_FAULTS: Final = frozenset(
    {"html502", "truncate", "reset", "stall", "stall-body", "drop", "early", "lowercase-headers"}
)
_FAULT_HELP: Final = (
    f"unknown {FAULT_HEADER} value; expected one of html502, truncate, reset, stall, drop, early, "
    "lowercase-headers, "
    "stall-body, download=N, slow-download=N (N bytes), delay=S (S seconds), gbk-filename, "
    "gbk-filename=TYPE (a Content-Type)"
)
# "报表.xls" in GBK: bytes that are not UTF-8, which every header writer must pass on untouched.
GBK_DISPOSITION: Final = b'Content-Disposition: attachment; filename="\xb1\xa8\xb1\xed.xls"'
# The same name in UTF-8, in a header of its own beside it.
UTF8_NAME: Final = "X-File-Name: 报表.xls".encode()
BAD_GATEWAY_PAGE: Final = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


def _make_download_block() -> bytes:
    # 64 KiB that never repeat within the block, so a misplaced or dropped chunk changes the hash.
    return b"".join(hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(2048))


_DOWNLOAD_BLOCK: Final = _make_download_block()


def download_bytes(size: int) -> Iterator[bytes]:
    """The content of a `download=size` answer, in chunks of at most 64 KiB."""
    whole, rest = divmod(size, len(_DOWNLOAD_BLOCK))
    for _ in range(whole):
        yield _DOWNLOAD_BLOCK
    if rest:
        yield _DOWNLOAD_BLOCK[:rest]


def download_sha256(size: int) -> str:
    """The sha256 of `download_bytes(size)`, so a test checks a download without keeping it."""
    digest = hashlib.sha256()
    for chunk in download_bytes(size):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Received:
    """One request under a served prefix as it arrived (token requests excluded)."""

    method: str
    path: str
    query: str  # raw, as sent
    headers: CIMultiDict[str]
    body: bytes | None  # None when larger than KEPT_BODY_LIMIT
    body_size: int
    body_sha256: str
    # v5: valid, expired (not the current token, or past its time), missing. v6: valid, expired
    # (the current token, past its time), superseded (an earlier one), unknown, missing.
    token_state: str
    token_serial: int | None
    kind: Kind = "v5"
    prefix: str = "/api/"  # the served prefix it came in under
    authorization_form: str | None = None  # v6: "bearer" or "bare"; None when missing


@dataclass(slots=True)
class Stats:
    get_token_calls: int = 0
    tokens_issued: int = 0
    api_calls: int = 0  # under a v5 prefix
    token_rejections: int = 0  # 900001 and 900002 answers
    renewals_before_expiry: int = 0  # get_token calls made while the previous token was valid
    v6_token_calls: int = 0  # POST /tokens/company, answered or not
    v6_tokens_issued: int = 0
    v6_api_calls: int = 0  # under a v6 prefix
    v6_token_rejections: int = 0  # 401 answers under a v6 prefix
    v6_renewals_before_expiry: int = 0
    open_requests: int = 0  # handlers under a prefix running now (a gauge: reset() keeps it)
    cancelled_requests: int = 0  # handlers under a prefix that ended cancelled: client went away
    # Requests for a path under no served prefix (and not a token or /_fake/ path), or whose
    # path as a Java servlet container would resolve it (servlet_path) leaves the prefix it came
    # in under: a proxy bug.
    outside_api_calls: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class _Script:
    body: bytes
    times: int
    status: int
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: str
    size: int = 0
    seconds: float = 0.0
    content_type: str = ""


@dataclass(slots=True)
class _Tokens:
    """One company's current token of one kind, and how its token calls are told to fail."""

    appid: str
    lifetime: float
    token: str | None = None
    serial: int = 0
    expires_at: float = 0.0
    failure: str | None = None
    failures_left: int = 0

    def next_failure(self) -> str | None:
        """The failure the next token call is to give, if any (and one fewer left)."""
        mode = self.failure
        if mode is not None and self.failures_left > 0:
            self.failures_left -= 1
            if self.failures_left == 0:
                self.failure = None
        return mode


@dataclass(slots=True)
class _State:
    # Each company's tokens, by appid; and every token issued, with its company's tokens and
    # serial, so a request's token is found with one dict lookup however many companies there
    # are (a benchmark runs a thousand).
    v5: dict[str, _Tokens]
    v6: dict[str, _Tokens]
    v5_issued: dict[str, tuple[_Tokens, int]] = field(default_factory=dict)
    v6_issued: dict[str, tuple[_Tokens, int]] = field(default_factory=dict)
    scripts: deque[_Script] = field(default_factory=deque)

    def companies(self, kind: str) -> dict[str, _Tokens]:
        if kind == "v5":
            return self.v5
        if kind == "v6":
            return self.v6
        raise ValueError(f"kind must be v5 or v6, not {kind!r}")

    def issued(self, kind: Kind) -> dict[str, tuple[_Tokens, int]]:
        return self.v5_issued if kind == "v5" else self.v6_issued


class FakeSobot:
    def __init__(
        self,
        appid: str,
        app_key: str,
        *,
        v6_appid: str | None = None,
        v6_secret: str | None = None,
        companies: Mapping[str, str] | None = None,
        v6_companies: Mapping[str, str] | None = None,
        prefixes: tuple[str, ...] = V5_PREFIXES,
        v6_prefixes: tuple[str, ...] = V6_PREFIXES,
        token_lifetime: float = 86400.0,
        v6_token_lifetime: float = 86400.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        same_company_as: FakeSobot | None = None,
    ) -> None:
        """`prefixes` take the v5 `token`; `v6_prefixes` the V6 JWT, served only when
        `v6_appid` and `v6_secret` are given. Every prefix starts and ends with `/`.

        `companies` (appid -> app_key) and `v6_companies` (appId -> app_secret): more Sobot
        companies served by this one host besides `appid` (and `v6_appid`), as one fake
        standing for Sobot itself in front of many tenants. Each company has its own tokens: a
        token call for one issues a new token that supersedes that company's previous one only,
        and a request under a prefix is accepted with any company's current token. The controls
        act on `appid`'s (or `v6_appid`'s) tokens unless given another company's appid.

        `same_company_as`: another host of the same Sobot company (as api-c.soboten.com is
        beside www.soboten.com): the tokens either issues are the ones both accept."""
        if (v6_appid is None) != (v6_secret is None):
            raise ValueError("v6_appid and v6_secret go together")
        if v6_companies and v6_appid is None:
            raise ValueError("v6_companies go with v6_appid and v6_secret")
        self.appid = appid
        self.v6_appid = v6_appid
        # The key each v5 company's get_token is checked with, by appid.
        self._app_keys = {**(companies or {}), appid: app_key}
        # The proxy's own kind checks the requests, so the fake and the proxy agree on them.
        self._v6_credentials = {
            v6_company: v6.V6Credential(v6_company, secret)
            for v6_company, secret in {
                **(v6_companies or {}),
                **({v6_appid: v6_secret} if v6_appid is not None and v6_secret else {}),
            }.items()
        }
        self._jwt_key = secrets.token_bytes(32)
        served: list[tuple[str, Kind]] = [(prefix, "v5") for prefix in prefixes]
        if self._v6_credentials:
            served += [(prefix, "v6") for prefix in v6_prefixes]
        for prefix, _kind in served:
            if not (prefix.startswith("/") and prefix.endswith("/")):
                raise ValueError(f"a prefix starts and ends with '/': {prefix!r}")
        if len({prefix for prefix, _kind in served}) != len(served):
            raise ValueError("a prefix is served once")
        # Longest first: the longest matching prefix wins, as in the proxy's route table.
        self._served = tuple(sorted(served, key=lambda route: -len(route[0])))
        self._initial_lifetimes = (token_lifetime, v6_token_lifetime)
        self._clock = clock
        self._wall_clock = wall_clock
        self.stats = Stats()
        self.received: deque[Received] = deque(maxlen=10_000)
        self.issued_tokens: list[str] = []  # v5, for tests that check no token ever leaks
        self.issue_times: list[float] = []  # when each was issued, on the fake's clock
        self.issued_v6_tokens: list[str] = []  # the same for V6
        self.v6_issue_times: list[float] = []
        self._token_called = asyncio.Event()  # a get_token or /tokens/company call began
        self._api_progress = asyncio.Event()  # a call under a prefix began, or arrived whole
        self._answers_released = asyncio.Event()
        self._answers_released.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()  # ends stalls, so stop() is never held up by them
        self._company = same_company_as
        self._state = self._new_state()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _new_state(self) -> _State:
        v5_lifetime, v6_lifetime = self._initial_lifetimes
        if self._company is not None:
            shared = self._company._state
            state = _State(shared.v5, shared.v6, shared.v5_issued, shared.v6_issued)
        else:
            state = _State(v5={}, v6={})
        for appid in self._app_keys:
            state.v5.setdefault(appid, _Tokens(appid, v5_lifetime))
        for appid in self._v6_credentials:
            state.v6.setdefault(appid, _Tokens(appid, v6_lifetime))
        return state

    def _tokens(self, kind: Kind, appid: str | None = None) -> _Tokens:
        """A company's tokens of `kind`: `appid`'s, by default this fake's own company's."""
        if appid is None:
            appid = self.appid if kind == "v5" else self.v6_appid
        tokens = self._state.companies(kind).get(appid or "")
        if tokens is None:
            raise ValueError(f"no {kind} company {appid!r}")
        return tokens

    # -- controls --------------------------------------------------------------------------

    def expire_token(self, kind: Kind = "v5", appid: str | None = None) -> None:
        self._tokens(kind, appid).expires_at = 0.0

    def set_lifetime(self, seconds: float, kind: Kind = "v5", appid: str | None = None) -> None:
        self._tokens(kind, appid).lifetime = seconds

    def fail_get_token(
        self, mode: str, times: int = 1, kind: Kind = "v5", appid: str | None = None
    ) -> None:
        """Make the next `times` token calls of `kind` fail (-1: until told otherwise, 0: stop).

        `mode` as the module docstring says; for v6 anything else than a number or a named mode
        is a ValueError. Only the calls naming the company's appid fail."""
        tokens = self._tokens(kind, appid)
        if kind == "v6" and mode not in _TOKEN_FAILURES and not (mode.isascii() and mode.isdigit()):
            raise ValueError(f"unknown v6 failure mode {mode!r}")
        tokens.failure = mode if times else None
        tokens.failures_left = times

    def set_app_key(self, app_key: str, appid: str | None = None, kind: Kind = "v5") -> None:
        """From now on accept a company's token calls signed with `app_key` (v6: its
        app_secret) only, as Sobot does once the key is changed in its console: one signed with
        the old key is refused as a wrong sign (v5 `900003`, V6 HTTP 401). `appid`: by default
        this fake's own company's.

        Tokens issued before stay valid until they expire or a new one supersedes them: a
        changed key does not end the token held."""
        tokens = self._tokens(kind, appid)  # a ValueError for a company this fake does not have
        if kind == "v5":
            self._app_keys[tokens.appid] = app_key
        else:
            self._v6_credentials[tokens.appid] = v6.V6Credential(tokens.appid, app_key)

    def script(
        self,
        answer: dict[str, Any] | bytes,
        times: int = 1,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `times` calls under any prefix with `answer`, whatever their token.

        A dict is sent as JSON; bytes are sent as they are (with `headers` saying what they are).
        """
        if isinstance(answer, bytes):
            body, headers = answer, headers or {}
        else:
            body, headers = (
                orjson.dumps(answer),
                {"Content-Type": "application/json", **(headers or {})},
            )
        self._state.scripts.append(_Script(body, times, status, headers))

    def hold_answers(self) -> None:
        """Stall: requests under the prefixes are received and recorded, but not answered until
        released."""
        self._answers_released.clear()

    def release_answers(self) -> None:
        self._answers_released.set()

    async def wait_for_get_token_calls(self, count: int) -> None:
        """Return once get_token has been called `count` times in all (bound it with a timeout)."""
        while self.stats.get_token_calls < count:
            self._token_called.clear()
            await self._token_called.wait()

    async def wait_for_v6_token_calls(self, count: int) -> None:
        """Return once /tokens/company has been called `count` times in all (bound it with a
        timeout)."""
        while self.stats.v6_token_calls < count:
            self._token_called.clear()
            await self._token_called.wait()

    async def wait_for_api_calls(self, count: int) -> None:
        """Return once `count` calls under v5 prefixes have begun in all, their heads received
        (bound it with a timeout)."""
        while self.stats.api_calls < count:
            self._api_progress.clear()
            await self._api_progress.wait()

    async def wait_for_v6_api_calls(self, count: int) -> None:
        """The same for calls under v6 prefixes."""
        while self.stats.v6_api_calls < count:
            self._api_progress.clear()
            await self._api_progress.wait()

    async def wait_for_received(self, count: int) -> None:
        """Return once `count` requests are in `received`, bodies and all (bound it with a
        timeout)."""
        while len(self.received) < count:
            self._api_progress.clear()
            await self._api_progress.wait()

    async def wait_until_idle(self) -> None:
        """Return once no handler under a prefix is running (bound it with a timeout)."""
        await self._idle.wait()

    def reset(self) -> None:
        self.stats = Stats(open_requests=self.stats.open_requests)
        self.received.clear()
        self._state = self._new_state()

    @property
    def current_token(self) -> str | None:
        """The valid v5 token, for tests that check a secret never leaks."""
        return self._current(self._tokens("v5"))

    @property
    def current_v6_token(self) -> str | None:
        """The valid V6 token."""
        return self._current(self._tokens("v6")) if self.v6_appid is not None else None

    def _current(self, tokens: _Tokens) -> str | None:
        return tokens.token if tokens.token and self._clock() < tokens.expires_at else None

    # -- serving ---------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The fake as an app: serve it with `make_runner()`, or `handler_cancellation=True`.

        Without that option a client that goes away does not end its handler: a stalled request
        stays in `stats.open_requests` until the fake stops, and `cancelled_requests` stays 0.
        """
        app = web.Application()
        app.router.add_get(v5.GET_TOKEN_PATH, self._get_token)
        if self._v6_credentials:
            app.router.add_post(v6.TOKEN_PATH, self._v6_token)
        app.router.add_get("/_fake/stats", self._stats)
        app.router.add_post("/_fake/{control}", self._control)
        app.router.add_route("*", "/{tail:.*}", self._api)
        return app

    def make_runner(self) -> web.AppRunner:
        """A runner for `make_app()` that cancels a handler when its client disconnects."""
        return web.AppRunner(self.make_app(), access_log=None, handler_cancellation=True)

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Serve on host:port (0: a free one), over TLS with `ssl_context`; returns the URL."""
        self._stopping.clear()
        self._runner = self.make_runner()
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://{bound_host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        self._stopping.set()
        self.release_answers()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the protocol ----------------------------------------------------------------------

    async def _get_token(self, request: web.Request) -> web.StreamResponse:
        self.stats.get_token_calls += 1
        self._token_called.set()
        # The company the call names; an appid no company has is checked against this fake's
        # own, which refuses it (900004) as Sobot does.
        tokens = self._state.v5.get(request.query.get("appid", "")) or self._tokens("v5")
        mode = tokens.next_failure()
        if mode is not None:
            return await self._failed_token_call(request, mode, "v5")

        ret_code = v5.check_token_request(
            request.query,
            appid=tokens.appid,
            app_key=self._app_keys[tokens.appid],
            now=self._wall_clock(),
        )
        if ret_code != v5.OK:
            return sobot_response(ret_code, v5.RET_CODE_MEANINGS[ret_code])

        if self._current(tokens) is not None:
            self.stats.renewals_before_expiry += 1
        # Every call issues a new token and the company's previous one stops working.
        token = self._issue(tokens, uuid.uuid4().hex, "v5", self.issued_tokens, self.issue_times)
        self.stats.tokens_issued += 1
        lifetime = tokens.lifetime
        expires_in = str(int(lifetime)) if lifetime == int(lifetime) else str(lifetime)
        return sobot_response(v5.OK, "Success", {"token": token, "expires_in": expires_in})

    async def _v6_token(self, request: web.Request) -> web.StreamResponse:
        self.stats.v6_token_calls += 1
        self._token_called.set()
        claim = ClientTokenRequest(query={}, body=await request.read())
        # As for v5: the company the call names, else this fake's own, which refuses it.
        own = self._tokens("v6")
        tokens = self._state.v6.get(self._v6_credentials[own.appid].claimed_appid(claim) or "")
        tokens = tokens or own
        mode = tokens.next_failure()
        if mode is not None:
            return await self._failed_token_call(request, mode, "v6")

        credential = self._v6_credentials[tokens.appid]
        code = credential.check(claim, self._wall_clock())
        if code is not None:
            refusal = credential.refuse(code)
            return _json(refusal.status, refusal.body)

        if self._current(tokens) is not None:
            self.stats.v6_renewals_before_expiry += 1
        # Whether Sobot's V6 invalidates the previous token is not documented: the fake does,
        # the stricter of the two, so a proxy that relies on an old token is caught.
        jwt = self._issue(
            tokens, self._mint_jwt(tokens), "v6", self.issued_v6_tokens, self.v6_issue_times
        )
        self.stats.v6_tokens_issued += 1
        granted = credential.grant(jwt, tokens.lifetime)
        return _json(granted.status, granted.body)

    def _issue(
        self,
        tokens: _Tokens,
        token: str,
        kind: Kind,
        issued: list[str],
        issue_times: list[float],
    ) -> str:
        tokens.token = token
        tokens.serial += 1
        tokens.expires_at = self._clock() + tokens.lifetime
        self._state.issued(kind)[token] = (tokens, tokens.serial)
        issued.append(token)
        issue_times.append(self._clock())
        return token

    def _mint_jwt(self, tokens: _Tokens) -> str:
        """An HS256 JWT of the next serial; `exp` to the millisecond, so short test lifetimes
        read right."""
        now = self._wall_clock()
        claims = {
            "appId": tokens.appid,
            "iat": int(now),
            "exp": round(now + tokens.lifetime, 3),
            "serial": tokens.serial + 1,
            "jti": uuid.uuid4().hex,
        }
        signing_input = (
            _base64url(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
            + "."
            + _base64url(orjson.dumps(claims))
        )
        signature = hmac.new(self._jwt_key, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_base64url(signature)}"

    async def _failed_token_call(
        self, request: web.Request, mode: str, kind: Kind
    ) -> web.StreamResponse:
        if mode == "malformed":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        if mode == "http500":
            return web.Response(status=500, text="Internal Server Error")
        if mode in ("disconnect", "stall"):
            if mode == "stall":
                await self._stopping.wait()
            if request.transport is not None:
                request.transport.abort()
            return web.Response()  # never sent: the connection is gone
        if kind == "v5":
            return sobot_response(mode, v5.RET_CODE_MEANINGS.get(mode, "error"))
        code = int(mode)
        return _json(code if 400 <= code < 600 else 200, v6.error_body(code, "refused"))

    def _route(self, request: web.Request) -> tuple[str, Kind] | None:
        # path_safe: the path as aiohttp's router matches it (decoded, but %2F kept).
        path = request.rel_url.path_safe
        for prefix, kind in self._served:
            if path.startswith(prefix):
                return prefix, kind
        return None

    async def _api(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request)
        if route is None:
            # Sobot serves nothing here: a proxy must never send anything this way.
            self.stats.outside_api_calls += 1
            return web.Response(status=404, text="not an API path")
        self.stats.open_requests += 1
        self._idle.clear()
        try:
            return await self._answer_api(request, *route)
        except asyncio.CancelledError:
            self.stats.cancelled_requests += 1
            raise
        finally:
            # self.stats, not a saved reference: reset() may have replaced it meanwhile.
            self.stats.open_requests -= 1
            if self.stats.open_requests == 0:
                self._idle.set()

    async def _answer_api(
        self, request: web.Request, prefix: str, kind: Kind
    ) -> web.StreamResponse:
        if kind == "v5":
            self.stats.api_calls += 1
        else:
            self.stats.v6_api_calls += 1
        self._api_progress.set()
        if not servlet_path(request.raw_path).startswith(prefix):
            # aiohttp routed it here, but Sobot's servlet container would serve something else.
            self.stats.outside_api_calls += 1
        # Streamed, so a GiB upload costs a GiB of hashing, not of memory.
        digest = hashlib.sha256()
        size = 0
        kept: bytearray | None = bytearray()
        # `early` answers before reading the body, as a server may (an error, a redirect).
        if request.headers.get(FAULT_HEADER) != "early":
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
                if kept is not None and size <= KEPT_BODY_LIMIT:
                    kept += chunk
                else:
                    kept = None
        state = self._state
        if kind == "v5":
            form = None
            token_state, serial = self._v5_token_state(request.headers.get(v5.TOKEN_HEADER, ""))
        else:
            form, sent = _authorization(request.headers.get(hdrs.AUTHORIZATION, ""))
            token_state, serial = self._v6_token_state(sent)
        received = Received(
            method=request.method,
            path=request.path,
            query=request.query_string and request.raw_path.partition("?")[2],
            headers=CIMultiDict(request.headers),
            body=bytes(kept) if kept is not None else None,
            body_size=size,
            body_sha256=digest.hexdigest(),
            token_state=token_state,
            token_serial=serial,
            kind=kind,
            prefix=prefix,
            authorization_form=form,
        )
        self.received.append(received)
        self._api_progress.set()
        await self._answers_released.wait()

        if state.scripts:
            script = state.scripts[0]
            script.times -= 1
            if script.times <= 0:
                state.scripts.popleft()
            return web.Response(status=script.status, body=script.body, headers=script.headers)
        if token_state != "valid":
            return self._token_rejection(kind, token_state)
        fault_value = request.headers.get(FAULT_HEADER)
        if fault_value is not None:
            try:
                fault = _parse_fault(fault_value)
            except ValueError:
                return web.Response(status=400, text=f"{_FAULT_HELP}, got {fault_value!r}\n")
            answer = await self._apply_fault(request, fault)
            if answer is not None:
                return answer
        if kind == "v5":
            return sobot_response(v5.OK, "success", _echo(received))
        return _json(200, orjson.dumps({**V6_ENVELOPE, "data": _echo(received)}))

    def _v5_token_state(self, sent: str) -> tuple[str, int | None]:
        if not sent:
            return "missing", None
        tokens, serial = self._state.v5_issued.get(sent, (None, None))
        if tokens is not None and sent == tokens.token and self._clock() < tokens.expires_at:
            return "valid", serial
        return "expired", None

    def _v6_token_state(self, sent: str) -> tuple[str, int | None]:
        if not sent:
            return "missing", None
        tokens, serial = self._state.v6_issued.get(sent, (None, None))
        if tokens is not None and sent == tokens.token:
            if self._clock() < tokens.expires_at:
                return "valid", serial
            return "expired", serial
        if serial is not None:
            return "superseded", serial
        if sent in self.issued_v6_tokens:  # issued before a reset()
            return "superseded", self.issued_v6_tokens.index(sent) + 1
        return "unknown", None

    def _token_rejection(self, kind: Kind, token_state: str) -> web.Response:
        if kind == "v5":
            self.stats.token_rejections += 1
            if token_state == "missing":
                return sobot_response(v5.TOKEN_EMPTY, "token is empty")
            return sobot_response(v5.TOKEN_EXPIRED, "token has expired, obtain a new one")
        self.stats.v6_token_rejections += 1
        return _json(401, v6.error_body(401, V6_REJECTIONS[token_state]))

    async def _apply_fault(self, request: web.Request, fault: _Fault) -> web.StreamResponse | None:
        """Answer as `fault` says; None: answer normally after all (delay)."""
        if fault.kind == "html502":
            return web.Response(status=502, text=BAD_GATEWAY_PAGE, content_type="text/html")
        if fault.kind == "early":
            return None  # the echo, without the body
        if fault.kind == "gbk-filename":
            # aiohttp cannot write header bytes that are not UTF-8, so the answer is written raw.
            body = _DOWNLOAD_BLOCK[:PARTIAL_SENT]
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: {fault.content_type}\r\n".encode()
                + GBK_DISPOSITION
                + b"\r\n"
                + UTF8_NAME
                + f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if request.transport is not None:
                request.transport.write(head + body)
            _drop(request, reset=False)  # a clean close, after what was written
            return web.Response(status=503)  # never sent: the connection is gone
        if fault.kind == "lowercase-headers":
            body = b'{"ret_code":"000000","ret_msg":"success"}'
            head = (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"transfer-encoding: chunked\r\nconnection: close, x-hop\r\nx-hop: hop\r\n"
                b"keep-alive: timeout=5\r\nproxy-authenticate: Basic\r\nx-kept: kept\r\n\r\n"
            )
            if request.transport is not None:
                request.transport.write(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            _drop(request, reset=False)  # as its `connection: close` says
            return web.Response(status=503)  # never sent: the connection is gone
        if fault.kind == "drop":
            _drop(request, reset=False)
            return web.Response(status=503)  # never sent: the connection is gone
        if fault.kind == "stall":
            await self._stopping.wait()
            _drop(request, reset=False)
            return web.Response(status=503)  # never sent: the connection is gone
        if fault.kind == "delay":
            # Cut short by stop(), which would otherwise wait for it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(fault.seconds):
                    await self._stopping.wait()
            return None
        if fault.kind in ("download", "slow-download"):
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            if fault.kind == "download":
                response.content_length = fault.size
            else:
                response.enable_chunked_encoding()
            await response.prepare(request)
            # write() waits for the socket to drain, so memory stays bounded at any size.
            for chunk in download_bytes(fault.size):
                await response.write(chunk)
            await response.write_eof()
            return response
        # truncate, reset and stall-body: a body cut short after half of what was announced.
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = PARTIAL_LENGTH
        await response.prepare(request)
        await response.write(_DOWNLOAD_BLOCK[:PARTIAL_SENT])
        if fault.kind == "stall-body":
            await self._stopping.wait()
        _drop(request, reset=fault.kind == "reset")
        return response

    # -- control endpoints -----------------------------------------------------------------

    async def _stats(self, _request: web.Request) -> web.Response:
        v6_serial = self._tokens("v6").serial if self.v6_appid is not None else 0
        serials = {"token_serial": self._tokens("v5").serial, "v6_token_serial": v6_serial}
        return web.json_response({**self.stats.as_dict(), **serials})

    async def _control(self, request: web.Request) -> web.Response:
        control = request.match_info["control"]
        query = request.query
        try:
            kind = _kind(query.get("kind", "v5"))
            appid = query.get("appid")
            if control == "expire":
                self.expire_token(kind, appid)
            elif control == "lifetime":
                self.set_lifetime(float(query["seconds"]), kind, appid)
            elif control == "fail-get-token":
                self.fail_get_token(query["mode"], int(query.get("times", "1")), kind, appid)
            elif control == "app-key":
                # The key in the body, not the query: query strings end up in access logs.
                app_key = (await request.text()).strip()
                if not app_key:
                    raise ValueError("the new key is the body, and it is empty")
                self.set_app_key(app_key, appid, kind)
            elif control == "script":
                self.script(
                    orjson.loads(await request.read()),
                    int(query.get("times", "1")),
                    status=int(query.get("status", "200")),
                )
            elif control == "hold":
                self.hold_answers()
            elif control == "release":
                self.release_answers()
            elif control == "reset":
                self.reset()
            else:
                raise web.HTTPNotFound(text=f"unknown control {control!r}")
        except (KeyError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"bad control request: {exc}") from None
        return web.json_response({"ok": True})


def read_companies(path: str) -> dict[str, str]:
    """The companies of a companies file: one `appid app_key` a line, blank lines and lines
    starting with `#` skipped. A ValueError names a wrong line by its number, never its words."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc.__class__.__name__}") from None
    companies: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) != 2:
            raise ValueError(f"{path} line {number}: expected `appid app_key`")
        if words[0] in companies:
            raise ValueError(f"{path} line {number}: that appid is on an earlier line")
        companies[words[0]] = words[1]
    return companies


def servlet_path(raw_target: str) -> str:
    """The path of a request target as a Java servlet container (Tomcat, Jetty, Spring: what
    Sobot runs on) resolves it: each segment's `;parameters` dropped, percent-decoding, a
    backslash taken for a slash, then dot segments resolved; a `#` ends the path, as a fragment."""
    resolved: list[str] = []
    for raw_segment in raw_target.partition("?")[0].partition("#")[0].split("/"):
        decoded = unquote(raw_segment.partition(";")[0]).replace("\\", "/")
        for segment in decoded.split("/"):
            if segment == "..":
                if len(resolved) > 1:
                    resolved.pop()
            elif segment != ".":
                resolved.append(segment)
    return "/".join(resolved)


def _parse_fault(value: str) -> _Fault:
    kind, has_argument, argument = value.strip().partition("=")
    if not has_argument and kind in _SIMPLE_FAULTS:
        return _Fault(kind)
    if has_argument and kind in ("download", "slow-download"):
        size = int(argument)
        if size < 0:
            raise ValueError(value)
        return _Fault(kind, size=size)
    if kind == "gbk-filename":
        content_type = argument.strip() if has_argument else "application/vnd.ms-excel"
        if not content_type.isascii() or not content_type.isprintable():
            raise ValueError(value)
        return _Fault(kind, content_type=content_type)
    if has_argument and kind == "delay":
        seconds = float(argument)
        if not 0 <= seconds < math.inf:
            raise ValueError(value)
        return _Fault(kind, seconds=seconds)
    raise ValueError(value)


def _drop(request: web.Request, *, reset: bool) -> None:
    """Close the connection under a request: a clean FIN, or with `reset` an RST."""
    transport = request.transport
    if transport is None:
        return
    if not reset:
        transport.close()
        return
    # A plain close sends FIN; SO_LINGER 0 makes the kernel send RST instead.
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _echo(received: Received) -> dict[str, Any]:
    # The token is a credential: say which one arrived, never its value.
    hidden = {v5.TOKEN_HEADER, "authorization"} if received.kind == "v6" else {v5.TOKEN_HEADER}
    echo: dict[str, Any] = {
        "method": received.method,
        "path": _printable(received.path),
        "query": _printable(received.query),
        "headers": [
            [name, _printable(value)]
            for name, value in received.headers.items()
            if name.lower() not in hidden
        ],
        "token": {"state": received.token_state, "serial": received.token_serial},
        "body_size": received.body_size,
        "body_sha256": received.body_sha256,
    }
    if received.kind == "v6":
        echo["authorization_form"] = received.authorization_form
    if received.body is not None and received.body_size <= ECHOED_BODY_LIMIT:
        echo["body"] = received.body.decode("utf-8", "replace")
    return echo


def _printable(text: str) -> str:
    """`text` for JSON: bytes that were not UTF-8 (decoded with surrogateescape) as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _kind(value: str) -> Kind:
    if value == "v5":
        return "v5"
    if value == "v6":
        return "v6"
    raise ValueError(f"kind must be v5 or v6, not {value!r}")


def _authorization(value: str) -> tuple[str | None, str]:
    """(form, token) of an Authorization header: `Bearer <jwt>` (the scheme in any case, as
    RFC 9110 11.1 has it) or the bare `<jwt>`; (None, "") when there is none."""
    value = value.strip()
    scheme, _space, rest = value.partition(" ")
    if scheme.lower() == "bearer":  # a scheme with no token ("Bearer") is no token
        token = rest.strip()
        return ("bearer", token) if token else (None, "")
    return ("bare", value) if value else (None, "")


def _base64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")
