"""The protocol facts: the vendor's signature example and every spelling of a get_token answer."""

import orjson
import pytest

from proxy.sobot import v5
from proxy.sobot.credential import MAX_LIFETIME, IssuedToken, MalformedAnswer


def test_sign_matches_the_vendors_worked_example():
    assert v5.make_sign("1", "1569397773", "2") == "258eec3118705112b2c53dc8043d4d34"


@pytest.mark.parametrize(
    ("item", "lifetime"),
    [
        ({"token": "t", "expires_in": "86400"}, 86400.0),  # the vendor's example: a string
        ({"token": "t", "expires_in": 7200}, 7200.0),  # clients in the wild see numbers
        ({"token": "t", "expires_in": 2.5}, 2.5),
        ({"token": "t", "expire_in": "3600"}, 3600.0),  # another vendor page's spelling
        ({"token": "t", "expire_in": 60}, 60.0),
    ],
)
def test_token_answer_lifetime_in_every_spelling(item, lifetime):
    body = orjson.dumps({"item": item, "ret_code": "000000", "ret_msg": "Success"})
    ret_code, _, token = v5.parse_token_answer(body)
    assert ret_code == "000000"
    assert token is not None
    assert (token.value, token.lifetime) == ("t", lifetime)


def test_token_answer_with_an_error_code_has_no_token():
    body = b'{"ret_code": "900003", "ret_msg": "sign error"}'
    assert v5.parse_token_answer(body) == ("900003", "sign error", None)


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b"[]",
        b'{"ret_msg": "no code"}',
        b'{"ret_code": "000000"}',
        b'{"ret_code": "000000", "item": {"expires_in": "60"}}',
        b'{"ret_code": "000000", "item": {"token": "", "expires_in": "60"}}',
        b'{"ret_code": "000000", "item": {"token": "t"}}',
        b'{"ret_code": "000000", "item": {"token": "t", "expires_in": "soon"}}',
        b'{"ret_code": "000000", "item": {"token": "t", "expires_in": "0"}}',
        b'{"ret_code": "000000", "item": {"token": "t", "expires_in": -5}}',
        b'{"ret_code": "000000", "item": {"token": "t", "expires_in": true}}',
        # Written into every forwarded request's head: a CR LF would end the header there.
        b'{"ret_code": "000000", "item": {"token": "t\\r\\nX-Injected: 1", "expires_in": 60}}',
        b'{"ret_code": "000000", "item": {"token": "two words", "expires_in": 60}}',
    ],
)
def test_malformed_token_answers_are_refused(body):
    with pytest.raises(MalformedAnswer):
        v5.parse_token_answer(body)


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ({"ret_code": "900002", "ret_msg": "expired"}, "900002"),
        ({"retCode": "900002"}, "900002"),  # some product lines' spelling
        ({"ret_code": 0}, "0"),  # some robot APIs answer a number
        ({"retCode": 900002}, "900002"),
        ({"ret_msg": "no code here"}, None),
        ({"ret_code": {"nested": 1}}, None),
        ([1, 2], None),
    ],
)
def test_ret_code_is_found_under_either_name(answer, code):
    assert v5.ret_code_of(answer) == code


def test_issued_token_repr_hides_the_value():
    assert "secret-value" not in repr(IssuedToken("secret-value", 60.0))


def test_a_lifetime_is_never_believed_past_max_lifetime():
    """A lifetime past 30 days is a misread: renewing early costs one get_token, never renewing
    would cost every request."""
    body = b'{"ret_code": "000000", "item": {"token": "t", "expires_in": 1e300}}'
    _, _, token = v5.parse_token_answer(body)
    assert token is not None
    assert token.lifetime == MAX_LIFETIME
