"""The V6 credential kind: its token exchange, every answer spelling, and a client's own request."""

from __future__ import annotations

import base64
import math
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from proxy.sobot import v6
from proxy.sobot.credential import (
    MAX_LIFETIME,
    ClientTokenRequest,
    MalformedAnswer,
    TokenRefused,
    spelled_as,
)
from proxy.sobot.kinds import KINDS
from proxy.sobot.v5 import V5Credential
from proxy.sobot.v6 import V6Credential

APPID = "app-1"
SECRET = "secret-2"
NOW = 1_700_000_000.0  # a wall-clock second
NOW_MS = "1700000000000"
# md5("app-1" + "1700000000000" + "token" + "secret-2"), computed once by hand.
SIGN = "fef751c6fec7871f1094b79ab75f4510"


def credential(scheme: str = "Bearer") -> V6Credential:
    return V6Credential(APPID, SECRET, authorization_scheme=scheme)


def jwt(claims: dict[str, Any] | bytes) -> str:
    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    payload = claims if isinstance(claims, bytes) else orjson.dumps(claims)
    header = orjson.dumps({"alg": "HS256", "typ": "JWT"})
    return f"{part(header)}.{part(payload)}.{part(b'signature')}"


def parse(body: dict[str, Any] | bytes, status: int = 200, now: float = NOW):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return credential().parse_token_answer(status, raw, now)


def client_request(**fields: Any) -> ClientTokenRequest:
    body = {"responseType": "token", "appId": APPID, "currentTime": NOW_MS, "sign": SIGN}
    body.update(fields)
    return ClientTokenRequest(query={}, body=orjson.dumps(body))


# -- the token exchange ---------------------------------------------------------------------


def test_sign_matches_one_computed_by_hand():
    assert v6.make_sign(APPID, NOW_MS, SECRET) == SIGN


def test_token_request_is_a_signed_json_post():
    request = credential().token_request(NOW + 0.0009)  # milliseconds are truncated
    assert (request.method, request.path) == ("POST", "/tokens/company")
    assert dict(request.headers) == {
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    assert request.body is not None
    assert orjson.loads(request.body) == {
        "responseType": "token",
        "appId": APPID,
        "currentTime": NOW_MS,
        "sign": SIGN,
    }
    assert request.secrets == (SIGN,)
    assert SIGN not in repr(request)


# -- its answer -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["access_token", "accessToken"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_the_token_under_either_name_at_the_top_or_in_data(name, wrapped):
    token = jwt({"appId": APPID, "exp": NOW + 3600})
    fields = {name: token, "expires_in": 86400000}
    body = (
        {"apiVersion": "6.2", "status": "Success", "code": 200, "message": "ok", "data": fields}
        if wrapped
        else fields
    )
    issued = parse(body)
    assert (issued.value, issued.lifetime) == (token, 3600.0)


def test_the_jwts_exp_is_believed_over_expires_in():
    issued = parse({"access_token": jwt({"exp": NOW + 120.5}), "expires_in": 86400000})
    assert issued.lifetime == 120.5


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [
        (86400000, 86400.0),  # the vendor's example: milliseconds
        ("86400000", 86400.0),
        (1_000_000, 1000.0),  # the smallest value read as milliseconds
        (999_999, 999_999.0),  # the largest read as seconds
        (7200, 7200.0),
        ("60", 60.0),
        (2.5, 2.5),
    ],
)
def test_expires_in_is_milliseconds_when_large_else_seconds(expires_in, lifetime):
    # Not a JWT, or a JWT whose payload has no exp: expires_in is all there is.
    for token in ("opaque-token", jwt({"appId": APPID}), jwt(b"not json")):
        issued = parse({"access_token": token, "expires_in": expires_in})
        assert issued.lifetime == lifetime


def test_expires_in_under_its_other_spelling_and_in_data():
    body = {"code": "200", "data": {"accessToken": "opaque", "expiresIn": 3600}}
    assert parse(body).lifetime == 3600.0


@pytest.mark.parametrize(
    "exp",
    [str(NOW - 1), str(NOW), str((NOW + 3600) * 1000), "1e300", str(2**70)],
    ids=["past", "now", "milliseconds", "huge", "beyond-64-bits"],
)
def test_an_exp_that_cannot_be_meant_gives_way_to_expires_in(exp):
    """Already past (a clock apart from ours) or beyond MAX_LIFETIME (a unit misread, or
    garbled): expires_in decides, so the token is renewed in time and its answers stay sane."""
    token = jwt(b'{"exp": ' + exp.encode() + b"}")
    issued = parse({"access_token": token, "expires_in": 86400000})
    assert issued.lifetime == 86400.0


def test_a_lifetime_is_never_believed_past_max_lifetime():
    issued = parse({"access_token": "opaque", "expires_in": 1e300})
    assert issued.lifetime == MAX_LIFETIME
    granted = orjson.loads(credential().grant("opaque", 1e300).body)
    assert granted["expires_in"] == int(MAX_LIFETIME * 1000)


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b"[]",
        b"{}",
        {"expires_in": 60},
        {"access_token": "", "expires_in": 60},
        {"access_token": 12, "expires_in": 60},
        {"access_token": "two words", "expires_in": 60},  # never written into a header
        {"access_token": "line\r\nX-Injected: 1", "expires_in": 60},
        {"access_token": "opaque"},
        {"access_token": "opaque", "expires_in": 0},
        {"access_token": "opaque", "expires_in": -5},
        {"access_token": "opaque", "expires_in": "soon"},
        {"access_token": "opaque", "expires_in": True},
        {"access_token": jwt({"exp": NOW - 1})},  # already past, and nothing else to go by
        {"code": 200, "status": "Success", "data": {"expires_in": 60}},
    ],
)
def test_malformed_answers_are_refused(body):
    with pytest.raises(MalformedAnswer):
        parse(body)


@pytest.mark.parametrize(
    ("status", "body", "code", "message", "configuration_error"),
    [
        (401, {"code": 401, "message": "sign error", "status": "Error"}, "401", "sign error", True),
        (403, b"<html>Forbidden</html>", "403", "", True),
        (400, {"message": "bad appId"}, "400", "bad appId", True),
        (500, b"Internal Server Error", "500", "", False),
        (502, {"code": 200, "access_token": "t", "expires_in": 60}, "502", "", False),
        (200, {"code": 10002, "message": "appId not found"}, "10002", "appId not found", False),
        (200, {"code": "401", "reason": "Unauthorized"}, "401", "Unauthorized", True),
        (200, {"status": "Failure", "code": 0, "message": "no"}, "200", "no", False),
        (200, {"apiVersion": "6.2", "status": "Error", "code": 403, "data": {}}, "403", "", True),
    ],
)
def test_refusals_carry_the_code_and_whether_configuration_is_wrong(
    status, body, code, message, configuration_error
):
    with pytest.raises(TokenRefused) as refused:
        parse(body, status=status)
    assert (refused.value.code, refused.value.message) == (code, message)
    assert refused.value.configuration_error is configuration_error


# -- forwarding -----------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "sent"), [("Bearer", "Bearer jwt-value"), ("", "jwt-value")])
def test_inject_replaces_every_authorization_the_client_sent(scheme, sent):
    headers = CIMultiDict([("Authorization", "Basic a"), ("X-Kept", "1"), ("authorization", "b")])
    credential(scheme).inject(headers, "jwt-value")
    assert headers.getall("Authorization") == [sent]
    assert headers["X-Kept"] == "1"


@pytest.mark.parametrize(
    ("status", "rejected"), [(401, True), (200, False), (403, False), (500, False)]
)
def test_only_a_401_means_the_token_was_rejected(status, rejected):
    assert credential().rejected(status, "900002") is rejected
    assert credential().rejected(status, None) is rejected


@pytest.mark.parametrize(
    ("path", "is_token_path"),
    [
        ("/tokens/company", True),
        ("/tokens/company/", True),
        ("/Tokens/%63ompany", True),
        ("/tokens/company;x=1", True),
        ("/tokens/company.json", True),
        ("/tokens/agent", False),
        ("/tokens/companyx", False),
        ("/callservice/tokens/company", False),
    ],
)
def test_the_token_path_however_it_is_spelled(path, is_token_path):
    assert spelled_as(path, v6.TOKEN_PATH) is is_token_path


# -- a client's own token request ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "appid"),
    [
        ({"appId": APPID}, APPID),
        ({"appId": "other"}, "other"),
        ({"appId": 12}, None),
        ({"appid": APPID}, None),
        (b"not json", None),
        (b"[]", None),
        (b"", None),
    ],
)
def test_claimed_appid_is_the_bodys_appid(body, appid):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    assert credential().claimed_appid(ClientTokenRequest(query={}, body=raw)) == appid


def test_a_well_signed_request_passes():
    assert credential().check(client_request(), NOW) is None
    assert credential().check(client_request(sign=SIGN.upper()), NOW) is None
    assert credential().check(client_request(), NOW + 300) is None  # the edge of the skew


def test_a_current_time_sent_as_a_number_is_read_as_its_digits():
    assert credential().check(client_request(currentTime=int(NOW_MS)), NOW) is None


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (client_request(sign=v6.make_sign(APPID, NOW_MS, "not-the-secret")), v6.SIGNATURE_ERROR),
        (client_request(sign=""), v6.SIGNATURE_ERROR),
        (client_request(appId="other-app"), v6.UNKNOWN_APPID),
        (client_request(responseType="agent"), v6.WRONG_RESPONSE_TYPE),
        (client_request(currentTime="1699999699999"), v6.STALE_TIME),  # 300.001 s early
        (client_request(currentTime="1700000300001"), v6.STALE_TIME),
        (client_request(currentTime="9" * 400), v6.STALE_TIME),
        (client_request(currentTime="+1700000000000"), v6.MALFORMED_REQUEST),
        (client_request(currentTime="1700000000000.0"), v6.MALFORMED_REQUEST),
        (client_request(currentTime="\u0661" * 13), v6.MALFORMED_REQUEST),  # Arabic-Indic 1s
        (client_request(currentTime=1.7e12), v6.MALFORMED_REQUEST),
        (client_request(currentTime=True), v6.MALFORMED_REQUEST),
        (client_request(sign=None), v6.MALFORMED_REQUEST),
        (client_request(appId=12), v6.MALFORMED_REQUEST),
        (ClientTokenRequest(query={}, body=b"appId=app-1&sign=x"), v6.MALFORMED_REQUEST),
        (ClientTokenRequest(query={}, body=b"\xff\xfe"), v6.MALFORMED_REQUEST),
        (ClientTokenRequest(query={}, body=b'["app-1"]'), v6.MALFORMED_REQUEST),
        (ClientTokenRequest(query={}, body=b""), v6.MALFORMED_REQUEST),
    ],
)
def test_a_request_that_does_not_verify_gets_its_code(request_, code):
    assert credential().check(request_, NOW) == code


def test_grant_is_the_vendors_shape_with_milliseconds_left_rounded_down():
    answer = credential().grant("jwt-value", 3599.9996)
    assert (answer.status, answer.code) == (200, "200")
    assert orjson.loads(answer.body) == {
        "response_type": "token",
        "access_token": "jwt-value",
        "expires_in": 3599999,
    }
    assert orjson.loads(credential().grant("jwt-value", -1.0).body)["expires_in"] == 0


@pytest.mark.parametrize(
    ("code", "status", "body_code"),
    [
        (v6.MALFORMED_REQUEST, 400, 400001),
        (v6.WRONG_RESPONSE_TYPE, 400, 400002),
        (v6.UNKNOWN_APPID, 401, 401001),
        (v6.SIGNATURE_ERROR, 401, 401002),
        (v6.STALE_TIME, 401, 401003),
        (None, 401, 401001),  # a request naming no configured appId
    ],
)
def test_refuse_is_a_v6_error_with_its_status(code, status, body_code):
    answer = credential().refuse(code)
    assert (answer.status, answer.code) == (status, str(body_code))
    body = orjson.loads(answer.body)
    assert body == {"code": body_code, "message": v6.MEANINGS[str(body_code)], "status": "Error"}


@pytest.mark.parametrize(
    ("code", "described"),
    [
        ("401002", "401002 (signature error)"),
        ("401", "401 (Unauthorized)"),
        ("503", "503 (Service Unavailable)"),
        ("10002", "10002"),
        ("", ""),
    ],
)
def test_describe_gives_a_codes_meaning_when_known(code, described):
    assert credential().describe(code) == described


def test_repr_shows_no_secret():
    assert SECRET not in repr(credential())


# -- the kinds registry ---------------------------------------------------------------------


def test_the_kinds_registry_builds_both_kinds():
    v5_set = KINDS["v5"]("appid", "key", "Bearer")
    v6_set = KINDS["v6"]("appid", "secret", "")
    assert isinstance(v5_set, V5Credential)
    assert isinstance(v6_set, V6Credential)
    assert (v5_set.kind, v6_set.kind) == ("v5", "v6")
    assert v5_set.store_namespace != v6_set.store_namespace
    headers: CIMultiDict[str] = CIMultiDict()
    v6_set.inject(headers, "t")
    assert headers["Authorization"] == "t"  # the scheme reached the kind
    assert math.isclose(v6_set.renewal_fraction, 0.5)
