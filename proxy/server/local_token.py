"""The local answer to a client's own token request: v5's `GET /api/get_token`, V6's
`POST /tokens/company`.

Existing clients that do their own token dance keep working unchanged: a client that signs
correctly for a configured credential set gets that set's managed token, in its kind's answer
shape, with the time it has left. The call never reaches Sobot, so no client can rotate the
token everyone shares. Which set: the one of the request's kind whose appid the request names,
in whichever tenant has it (server/tenants.py: the tenant is built then if it was not yet). With
client keys, only the key's own tenant is looked in: another tenant's appid is answered as one no
set has, so a key cannot find out which appids the proxy serves.
Refusals are in the kind's own shape (sobot/credential.py: refuse): v5's are Sobot's own, 900004
for an appid no set has and 900003 for a wrong signature or a stale create_time, with HTTP 200,
which is what such clients already handle.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Final

from aiohttp import web

from proxy.errors import BodyTooLarge, ClientTimeout
from proxy.server.tenants import Tenants
from proxy.sobot.credential import ClientTokenRequest, Credential, LocalAnswer
from proxy.sobot.kinds import KINDS

# A token request's body is a few dozen bytes of JSON; anything much larger is not one.
MAX_BODY: Final = 16 * 1024


class LocalTokenEndpoint:
    def __init__(
        self,
        tenants: Tenants,
        *,
        read_timeout: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`read_timeout`: how long a client has to send a token request's body."""
        self._tenants = tenants
        self._read_timeout = read_timeout
        self._wall_clock = wall_clock
        self._strangers: dict[str, Credential] = {}  # kind -> a set no one can ask for

    def admit(self, request: web.BaseRequest) -> None:
        """Before the body is read (`Expect: 100-continue`): refuse a body too large."""
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise BodyTooLarge(f"a token request's body is at most {MAX_BODY} bytes")

    async def answer(
        self, request: web.Request, kind: Credential, *, key_tenant: str | None = None
    ) -> tuple[web.Response, str, str | None, str | None]:
        """The answer for the client, the code it carries, the credential set and the tenant
        it was for, if one (for the request log). `key_tenant`: the client key's tenant, the
        only one it may ask for (None: no client keys)."""
        body = await self._read_small(request) if kind.reads_client_body else b""
        claim = ClientTokenRequest(request.query, body)
        now = self._wall_clock()
        appid = kind.claimed_appid(claim)
        claimant = self._tenants.claimant(kind.kind, appid)
        if claimant is None or key_tenant not in (None, claimant[0]):
            # No set has it, or none the client key may ask for: answered alike, so a key learns
            # nothing of other tenants' appids. Checked against a set of its kind whose appid no
            # client can name: "malformed" if it is, else "unknown appid", in the kind's words.
            stranger = self._strangers.get(kind.kind)
            if stranger is None:
                stranger = self._strangers[kind.kind] = _stranger(kind.kind)
            return (*_response(stranger.refuse(stranger.check(claim, now))), None, None)
        name, set_name, credential = claimant
        refusal = credential.check(claim, now)
        if refusal is not None:
            return (*_response(credential.refuse(refusal)), set_name, name)
        # Checked: only now is the tenant built (and its tokens fetched), if it was not yet.
        tenant = self._tenants.get(name)
        managed = None if tenant is None else tenant.sets.find(set_name)
        assert managed is not None  # the index is made of the tenants' own sets
        tokens = managed.tokens
        token = await tokens.get()  # TokenUnavailable is answered by the caller
        granted = managed.credential.grant(token.value, tokens.seconds_left(token))
        return (*_response(granted), managed.name, name)

    async def _read_small(self, request: web.Request) -> bytes:
        """The whole body, at most MAX_BODY bytes, within the read timeout (a few dozen bytes
        are due at once: one timer for the whole, not one per read)."""
        self.admit(request)
        body = bytearray()
        try:
            async with asyncio.timeout(self._read_timeout):
                while chunk := await request.content.readany():
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise BodyTooLarge(f"a token request's body is at most {MAX_BODY} bytes")
        except TimeoutError:
            raise ClientTimeout("the client stopped sending its token request's body") from None
        return bytes(body)


def _stranger(kind: str) -> Credential:
    """A credential of `kind` whose appid and secret are random: no request names it."""
    return KINDS[kind](secrets.token_hex(16), secrets.token_hex(16), "Bearer")


def _response(answer: LocalAnswer) -> tuple[web.Response, str]:
    response = web.Response(status=answer.status, body=answer.body, content_type="application/json")
    return response, answer.code
