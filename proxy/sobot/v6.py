"""The V6 call centre's credential kind (V6Credential): a JWT in `Authorization`.

Facts (../shared/reference/sobot-api-families.md; the vendor's V6 authentication pages):
`POST /tokens/company` with the JSON body {"responseType": "token", "appId", "currentTime" (Unix
ms, as a string), "sign" = md5(appId + currentTime + responseType + app_secret)}; the answer
carries the JWT as `access_token` or `accessToken`, at the top level or in the V6 envelope's
`data`, with `expires_in` in a unit the pages leave open. A rejected token is HTTP 401.

Choices where the pages are silent:
- A token's lifetime is its JWT's own `exp` claim when the payload can be read; otherwise
  `expires_in`, read as milliseconds when >= 1_000_000 (the vendor's 86400000 is 24 h in ms;
  1e6 seconds would be 11.6 days, longer than any token the vendor documents), else as seconds.
- A token endpoint refuses with HTTP >= 400, or with a `code` other than 200/0 or an
  error-like `status` and no token; 400/401/403 mean a wrong appId, secret or sign.
- A client's own token request is answered like the vendor's page shows: HTTP 200
  {"response_type": "token", "access_token", "expires_in"}, `expires_in` in whole milliseconds
  left (rounded down, as that page's 86400000 suggests). A refusal is {"code", "message",
  "status": "Error"}, its HTTP status the code's first three digits:
    400001  not a well-formed token request (a JSON object with string responseType, appId and
            sign, and currentTime a decimal Unix time in ms)
    400002  responseType is not "token"
    401001  no V6 credentials for this appId
    401002  the sign does not verify
    401003  currentTime is more than MAX_CLOCK_SKEW from the proxy's clock
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import math
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar, Final

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

TOKEN_PATH: Final = "/tokens/company"
RESPONSE_TYPE: Final = "token"

MALFORMED_REQUEST: Final = "400001"
WRONG_RESPONSE_TYPE: Final = "400002"
UNKNOWN_APPID: Final = "401001"
SIGNATURE_ERROR: Final = "401002"
STALE_TIME: Final = "401003"
MEANINGS: Final = {
    MALFORMED_REQUEST: "not a well-formed token request",
    WRONG_RESPONSE_TYPE: 'responseType is not "token"',
    UNKNOWN_APPID: "no V6 credentials for this appId",
    SIGNATURE_ERROR: "signature error",
    STALE_TIME: "currentTime is too far from the server's clock",
}

# expires_in at or above this is milliseconds (see the module docstring).
_MILLISECONDS_FROM: Final = 1_000_000
# A currentTime longer than this is no Unix time in ms (15 digits reach the year 33658).
_MAX_TIME_DIGITS: Final = 15
_CONFIGURATION_ERRORS: Final = frozenset({"400", "401", "403"})
_FAILED_STATUSES: Final = frozenset({"error", "failure", "failed", "fail"})


def make_sign(appid: str, current_time: str, app_secret: str) -> str:
    """Lowercase hex md5(appId + currentTime + "token" + app_secret), plain concatenation."""
    return hashlib.md5((appid + current_time + RESPONSE_TYPE + app_secret).encode()).hexdigest()


def error(code: int, message: str) -> dict[str, object]:
    """The fields of a V6-shaped error, as the vendor's V6 answers carry them."""
    return {"code": code, "message": message, "status": "Error"}


def error_body(code: int, message: str) -> bytes:
    """A V6-shaped error answer."""
    return orjson.dumps(error(code, message))


class V6Credential:
    """The V6 credential kind (see credential.py for the interface)."""

    kind: ClassVar[str] = "v6"
    token_path: ClassVar[str] = TOKEN_PATH
    reads_client_body: ClassVar[bool] = True
    renewal_fraction: ClassVar[float] = 0.5  # the vendor's advice: renew at half the life
    uses_refresh_margin: ClassVar[bool] = False
    store_namespace: ClassVar[str] = "sobot-proxy-v6"

    __slots__ = ("_prefix", "_secret", "appid")

    def __init__(self, appid: str, secret: str, *, authorization_scheme: str = "Bearer") -> None:
        self.appid = appid
        self._secret = secret
        self._prefix = f"{authorization_scheme} " if authorization_scheme else ""

    def __repr__(self) -> str:
        return f"V6Credential(appid={self.appid!r})"

    def token_request(self, now: float) -> TokenRequest:
        current_time = str(int(now * 1000))
        sign = make_sign(self.appid, current_time, self._secret)
        body = {
            "responseType": RESPONSE_TYPE,
            "appId": self.appid,
            "currentTime": current_time,
            "sign": sign,
        }
        headers = (("Content-Type", "application/json"), ("Accept", "application/json"))
        return TokenRequest("POST", TOKEN_PATH, headers, orjson.dumps(body), secrets=(sign,))

    def parse_token_answer(self, status: int, body: bytes, now: float) -> IssuedToken:
        fields = _json_object(body)
        if fields is None and status < 400:
            raise MalformedAnswer("the answer is not a JSON object")
        fields = fields or {}
        data = fields.get("data")
        places = (data, fields) if isinstance(data, dict) else (fields,)
        token = _first(places, "access_token", "accessToken")
        code = fields.get("code")
        code = str(code) if isinstance(code, str | int) and not isinstance(code, bool) else None
        failed_code = code is not None and code not in ("200", "0")
        failed_status = str(fields.get("status", "")).lower() in _FAILED_STATUSES
        if status >= 400 or (token is None and (failed_code or failed_status)):
            refusal = code if failed_code and code is not None else str(status)
            message = fields.get("message") or fields.get("reason") or ""
            raise TokenRefused(
                refusal,
                str(message),
                configuration_error=bool({refusal, str(status)} & _CONFIGURATION_ERRORS),
            )
        if not isinstance(token, str) or not header_safe(token):
            raise MalformedAnswer("the answer has no access_token")
        expiry = _jwt_expiry(token)
        if expiry is not None and 0 < expiry - now <= MAX_LIFETIME:
            return IssuedToken(token, expiry - now)
        # No exp, or one that cannot be meant (already past: a clock apart from ours; beyond
        # MAX_LIFETIME: milliseconds, or garbled): expires_in decides.
        lifetime = _lifetime(_first(places, "expires_in", "expiresIn"))
        if lifetime is None:
            raise MalformedAnswer("the answer has neither a plausible exp nor a valid expires_in")
        return IssuedToken(token, min(lifetime, MAX_LIFETIME))

    def inject(self, headers: CIMultiDict[str], token: str) -> None:
        # A client's v5 `token` (which it may hold from the proxy's own get_token) is not for
        # this host.
        headers.popall("token", None)
        headers["Authorization"] = self._prefix + token  # replaces every one the client sent

    def rejected(self, status: int, ret_code: str | None) -> bool:
        return status == 401

    def claimed_appid(self, request: ClientTokenRequest) -> str | None:
        appid = (_json_object(request.body) or {}).get("appId")
        return appid if isinstance(appid, str) else None

    def check(self, request: ClientTokenRequest, now: float) -> str | None:
        fields = _json_object(request.body) or {}
        current_time = fields.get("currentTime")
        if isinstance(current_time, int) and not isinstance(current_time, bool):
            current_time = str(current_time)  # a number, as a client in a typed language sends
        match (fields.get("appId"), fields.get("responseType"), current_time, fields.get("sign")):
            case (str() as appid, str() as response_type, str() as current_time, str() as sign):
                pass
            case _:
                return MALFORMED_REQUEST
        # JSON strings are valid UTF-8 (orjson refuses lone surrogates), so encode() is safe.
        # Compared in constant time: neither the appId nor the sign shows in the timing.
        if not hmac.compare_digest(appid.encode(), self.appid.encode()):
            return UNKNOWN_APPID
        if response_type != RESPONSE_TYPE:
            return WRONG_RESPONSE_TYPE
        # ASCII digits only: int() would also take "+1", " 1", "1_0" and other scripts' digits.
        if not (current_time.isascii() and current_time.isdigit()):
            return MALFORMED_REQUEST
        if len(current_time) > _MAX_TIME_DIGITS:
            return STALE_TIME
        if abs(int(current_time) / 1000 - now) > MAX_CLOCK_SKEW:
            return STALE_TIME
        expected = make_sign(self.appid, current_time, self._secret)
        if not hmac.compare_digest(sign.lower().encode(), expected.encode()):
            return SIGNATURE_ERROR
        return None

    def grant(self, token: str, seconds_left: float) -> LocalAnswer:
        # Rounded down, so a client that trusts expires_in never uses the token past its end.
        milliseconds = max(0, math.floor(min(seconds_left, MAX_LIFETIME) * 1000))
        body = {"response_type": RESPONSE_TYPE, "access_token": token, "expires_in": milliseconds}
        return LocalAnswer(200, orjson.dumps(body), "200")

    def refuse(self, code: str | None) -> LocalAnswer:
        code = code if code in MEANINGS else UNKNOWN_APPID  # None: no set has this appId
        return LocalAnswer(int(code[:3]), error_body(int(code), MEANINGS[code]), code)

    def describe(self, code: str) -> str:
        meaning = MEANINGS.get(code)
        if meaning is None and code.isascii() and code.isdigit():
            # A token endpoint's refusal is often only its HTTP status.
            with contextlib.suppress(ValueError):
                meaning = HTTPStatus(int(code)).phrase
        return f"{code} ({meaning})" if meaning else code

    def error_fields(self, status: int, message: str) -> Mapping[str, object]:
        # A V6 client finds `code` and `message` where it looks.
        return error(status, message)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _first(places: tuple[dict[str, Any], ...], *names: str) -> Any:
    """The first of `names` present (not null) in the first place that has one."""
    for place in places:
        for name in names:
            if place.get(name) is not None:
                return place[name]
    return None


def _jwt_expiry(token: str) -> float | None:
    """The JWT's `exp` claim (RFC 7519 4.1.4), None when its payload cannot be read.

    The signature is not checked: the proxy only needs to know when to renew, and Sobot checks
    the token itself. PyJWT would do this (verify_signature=False), a dependency for one line.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are both ValueErrors
        return None
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(expiry, bool) or not isinstance(expiry, int | float):
        return None
    return float(expiry) if math.isfinite(expiry) else None


def _lifetime(value: Any) -> float | None:
    """expires_in in seconds: a positive number or numeric string, milliseconds when large."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not 0 < number < math.inf:
        return None
    return number / 1000 if number >= _MILLISECONDS_FROM else number
