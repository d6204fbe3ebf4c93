"""The v5 open platform: its protocol facts, and its credential kind (V5Credential).

Every v5 family (`/api/`, `/chat-facebook/api/`, `/chat-third/api/`, `/comm-open/api/`, the AI
agent's `/text/ai-agent-open/`) takes the same token: `GET /api/get_token?appid&create_time&sign`
with sign = md5(appid + create_time + app_key), sent in a `token` header; a rejected token is
HTTP 200 with ret_code 900002 (900001 when missing). Every get_token issues a new token and
invalidates the last. See ../shared/reference/sobot-protocol.md and the vendor's "API Call
Instructions" page.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Final
from urllib.parse import urlencode

import orjson
from multidict import CIMultiDict

from proxy.sobot.credential import (
    MAX_CLOCK_SKEW,
    MAX_LIFETIME,
    ClientTokenRequest,
    IssuedToken,
    LocalAnswer,
    MalformedAnswer,
    TokenRefused,
    TokenRequest,
    header_safe,
)

GET_TOKEN_PATH: Final = "/api/get_token"
TOKEN_HEADER: Final = "token"

OK: Final = "000000"
EDITION_UNSUPPORTED: Final = "700046"
TOKEN_EMPTY: Final = "900001"
TOKEN_EXPIRED: Final = "900002"
SIGNATURE_ERROR: Final = "900003"
NO_API_CONFIGURATION: Final = "900004"
UNKNOWN_ERROR: Final = "999999"

# Sobot's own wording, so logs and /readyz explain a code without a trip to the docs.
RET_CODE_MEANINGS: Final = {
    OK: "success",
    EDITION_UNSUPPORTED: "the company's edition does not support this API",
    TOKEN_EMPTY: "token is empty",
    TOKEN_EXPIRED: "token has expired",
    SIGNATURE_ERROR: "signature error",
    NO_API_CONFIGURATION: "no API configuration found for the company",
    UNKNOWN_ERROR: "unknown system exception",
}

# get_token codes that no retry can fix: the appid, app_key or account is wrong.
CONFIGURATION_ERRORS: Final = frozenset(
    {SIGNATURE_ERROR, NO_API_CONFIGURATION, EDITION_UNSUPPORTED}
)

# Answers that mean the injected token was not accepted. 900001 ("token is empty") can only
# mean that too, since the proxy always sends one.
TOKEN_REJECTED: Final = frozenset({TOKEN_EXPIRED, TOKEN_EMPTY})


# A create_time longer than this is no Unix time in seconds (12 digits reach the year 33658).
_MAX_TIME_DIGITS: Final = 12


def make_sign(appid: str, create_time: str, app_key: str) -> str:
    """Lowercase hex md5(appid + create_time + app_key): plain concatenation, as Sobot signs."""
    return hashlib.md5(_exact(appid + create_time + app_key)).hexdigest()


def check_token_request(query: Mapping[str, str], *, appid: str, app_key: str, now: float) -> str:
    """The code Sobot answers a get_token query with: OK, or what is wrong with it.

    An appid it has no API configuration for is 900004, whatever the sign and time; for the
    configured appid, a create_time that is not a decimal Unix time within MAX_CLOCK_SKEW of
    `now`, or a wrong sign, is 900003. Any text a client sends is safe here: bytes that are not
    UTF-8 (decoded with surrogateescape), huge or signed numbers, NaN, non-ASCII digits.
    """
    # Compared in constant time: neither the appid nor the sign shows in the timing.
    if not hmac.compare_digest(_exact(query.get("appid", "")), _exact(appid)):
        return NO_API_CONFIGURATION
    create_time = query.get("create_time", "")
    # ASCII digits only: int() would also take "+1", " 1", "1_0" and other scripts' digits.
    if not (create_time.isascii() and create_time.isdigit()):
        return SIGNATURE_ERROR
    if len(create_time) > _MAX_TIME_DIGITS or abs(int(create_time) - now) > MAX_CLOCK_SKEW:
        # As Sobot does; it also keeps a captured signature from being usable for long.
        return SIGNATURE_ERROR
    expected = make_sign(appid, create_time, app_key)
    if not hmac.compare_digest(_exact(query.get("sign", "").lower()), expected.encode()):
        return SIGNATURE_ERROR
    return OK


def _exact(text: str) -> bytes:
    """`text` as the bytes it came as: a client's bytes that are not UTF-8 arrive as lone
    surrogates (aiohttp decodes with surrogateescape), which plain encode() refuses."""
    return text.encode("utf-8", "surrogateescape")


def answer(ret_code: str, ret_msg: str, item: Mapping[str, Any] | None = None) -> bytes:
    """A body in Sobot's answer shape: `ret_code`, `ret_msg`, and `item` when there is one."""
    body: dict[str, Any] = {"ret_code": ret_code, "ret_msg": ret_msg}
    if item is not None:
        body["item"] = item
    return orjson.dumps(body)


def describe(ret_code: str) -> str:
    meaning = RET_CODE_MEANINGS.get(ret_code)
    return f"{ret_code} ({meaning})" if meaning else ret_code


def parse_token_answer(body: bytes) -> tuple[str, str, IssuedToken | None]:
    """Parse a get_token answer into (ret_code, ret_msg, token or None when ret_code is not OK).

    Accepts `expires_in` or `expire_in` (both spellings appear in the vendor's pages) as a string
    or a number of seconds. Raises MalformedAnswer for anything else.
    """
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedAnswer("the answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise MalformedAnswer("the answer is not a JSON object")
    ret_code = ret_code_of(answer)
    if ret_code is None:
        raise MalformedAnswer("the answer has no ret_code")
    ret_msg = str(answer.get("ret_msg", ""))
    if ret_code != OK:
        return ret_code, ret_msg, None
    item = answer.get("item")
    if not isinstance(item, dict):
        raise MalformedAnswer("the answer has no item object")
    token = item.get("token")
    if not isinstance(token, str) or not header_safe(token):
        raise MalformedAnswer("the answer has no token")
    lifetime = _seconds(item.get("expires_in", item.get("expire_in")))
    if lifetime is None:
        raise MalformedAnswer("the answer has no valid expires_in")
    # Capped: a lifetime past MAX_LIFETIME is a misread, and renewing early costs little.
    return ret_code, ret_msg, IssuedToken(token, min(lifetime, MAX_LIFETIME))


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return seconds if 0 < seconds < float("inf") else None


def ret_code_of(answer: Any) -> str | None:
    """The return code of a decoded answer as it came, or None when it has none.

    Most product lines answer `ret_code` as a string; some answer `retCode`, and some robot APIs
    answer a number such as 0. The value is returned as text for logging and comparison; the
    body itself is never altered.
    """
    if not isinstance(answer, dict):
        return None
    code = answer.get("ret_code", answer.get("retCode"))
    if code is None or isinstance(code, dict | list):
        return None
    return str(code)


class V5Credential:
    """The v5 credential kind (see credential.py for the interface)."""

    kind: ClassVar[str] = "v5"
    token_path: ClassVar[str] = GET_TOKEN_PATH
    reads_client_body: ClassVar[bool] = False
    # Late: every get_token rotates the token for every user of the appid, so renewing early
    # buys nothing and costs in-flight requests a replay.
    renewal_fraction: ClassVar[float] = 0.9
    uses_refresh_margin: ClassVar[bool] = True
    store_namespace: ClassVar[str] = "sobot-proxy"  # the keys of every release before kinds

    __slots__ = ("_app_key", "appid")

    def __init__(self, appid: str, secret: str) -> None:
        self.appid = appid
        self._app_key = secret

    def __repr__(self) -> str:
        return f"V5Credential(appid={self.appid!r})"

    def token_request(self, now: float) -> TokenRequest:
        create_time = str(int(now))
        sign = make_sign(self.appid, create_time, self._app_key)
        query = urlencode({"appid": self.appid, "create_time": create_time, "sign": sign})
        return TokenRequest("GET", f"{GET_TOKEN_PATH}?{query}", secrets=(sign,))

    def parse_token_answer(self, status: int, body: bytes, now: float) -> IssuedToken:
        ret_code, ret_msg, token = parse_token_answer(body)
        if token is None:
            raise TokenRefused(
                ret_code, ret_msg, configuration_error=ret_code in CONFIGURATION_ERRORS
            )
        return token

    def inject(self, headers: CIMultiDict[str], token: str) -> None:
        headers[TOKEN_HEADER] = token

    def rejected(self, status: int, ret_code: str | None) -> bool:
        return ret_code in TOKEN_REJECTED

    def claimed_appid(self, request: ClientTokenRequest) -> str | None:
        return request.query.get("appid")

    def check(self, request: ClientTokenRequest, now: float) -> str | None:
        code = check_token_request(request.query, appid=self.appid, app_key=self._app_key, now=now)
        return None if code == OK else code

    def grant(self, token: str, seconds_left: float) -> LocalAnswer:
        # Round down, so a client that trusts expires_in never uses the token past its end.
        item = {"token": token, "expires_in": str(max(0, math.floor(seconds_left)))}
        return LocalAnswer(200, answer(OK, "success", item), OK)

    def refuse(self, code: str | None) -> LocalAnswer:
        # Sobot's own refusals, with HTTP 200, which is what clients of get_token handle.
        code = code or NO_API_CONFIGURATION
        return LocalAnswer(200, answer(code, RET_CODE_MEANINGS.get(code, "refused")), code)

    def describe(self, code: str) -> str:
        return describe(code)

    def error_fields(self, status: int, message: str) -> Mapping[str, object]:
        return {}  # ret_code and ret_msg are v5's own shape
