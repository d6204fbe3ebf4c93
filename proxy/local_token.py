"""The local answer to a client's own `GET /api/get_token`.

Existing clients that do their own token dance keep working unchanged: a client that signs
correctly for the configured appid and app_key gets the managed token in Sobot's answer shape,
with `expires_in` the seconds it has left. The call never reaches Sobot, so no client can rotate
the token everyone shares. Like Sobot, a wrong signature is answered with ret_code 900003 in the
body and HTTP 200, which is what such clients already handle.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable

import orjson
from aiohttp import web

from proxy import protocol
from proxy.tokens import TokenManager


def _answer(ret_code: str, ret_msg: str, item: dict[str, str] | None = None) -> web.Response:
    body: dict[str, object] = {"ret_code": ret_code, "ret_msg": ret_msg}
    if item is not None:
        body = {"item": item, **body}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


class LocalTokenEndpoint:
    def __init__(
        self,
        *,
        appid: str,
        app_key: str,
        tokens: TokenManager,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._appid = appid
        self._app_key = app_key
        self._tokens = tokens
        self._wall_clock = wall_clock

    def signed_correctly(self, query: dict[str, str]) -> bool:
        appid = query.get("appid", "")
        create_time = query.get("create_time", "")
        sign = query.get("sign", "").lower()
        try:
            skew = abs(int(create_time) - self._wall_clock())
        except ValueError:
            return False
        expected = protocol.make_sign(self._appid, create_time, self._app_key)
        appid_matches = hmac.compare_digest(appid.encode(), self._appid.encode())
        sign_matches = hmac.compare_digest(sign.encode(), expected.encode())
        # As Sobot does; it also keeps a captured signature from being usable for long.
        return appid_matches and sign_matches and skew <= protocol.MAX_CLOCK_SKEW

    async def answer(self, request: web.Request) -> tuple[web.Response, str]:
        """The answer for the client and the ret_code it carries (for the request log)."""
        if not self.signed_correctly(dict(request.query)):
            return _answer(protocol.SIGNATURE_ERROR, "signature error"), protocol.SIGNATURE_ERROR
        token = await self._tokens.get()  # TokenUnavailable is answered by the caller
        # Round down, so a client that trusts expires_in never uses the token past its end.
        seconds_left = max(0, math.floor(self._tokens.seconds_left(token)))
        item = {"token": token.value, "expires_in": str(seconds_left)}
        return _answer(protocol.OK, "success", item), protocol.OK
