"""The local answer to a client's own `GET /api/get_token`.

Existing clients that do their own token dance keep working unchanged: a client that signs
correctly for the configured appid and app_key gets the managed token in Sobot's answer shape,
with `expires_in` the seconds it has left. The call never reaches Sobot, so no client can rotate
the token everyone shares. Refusals are Sobot's own (v5.check_token_request), in the body
with HTTP 200, which is what such clients already handle: 900004 for an appid that is not the
configured one, 900003 for a wrong signature or a stale create_time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from aiohttp import web

from proxy.errors import sobot_response
from proxy.sobot import v5
from proxy.tokens.manager import TokenManager


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

    async def answer(self, request: web.Request) -> tuple[web.Response, str]:
        """The answer for the client and the ret_code it carries (for the request log)."""
        ret_code = v5.check_token_request(
            request.query, appid=self._appid, app_key=self._app_key, now=self._wall_clock()
        )
        if ret_code != v5.OK:
            return sobot_response(ret_code, v5.RET_CODE_MEANINGS[ret_code]), ret_code
        token = await self._tokens.get()  # TokenUnavailable is answered by the caller
        # Round down, so a client that trusts expires_in never uses the token past its end.
        seconds_left = max(0, math.floor(self._tokens.seconds_left(token)))
        item = {"token": token.value, "expires_in": str(seconds_left)}
        return sobot_response(v5.OK, "success", item), v5.OK
