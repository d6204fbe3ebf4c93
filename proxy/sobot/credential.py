"""What every kind of Sobot credential provides: the one interface the proxy is written against.

A credential kind (v5.py, v6.py) is a class built from one credential set (an appid and its
secret). It knows, for its family of Sobot APIs:

    token_request(now)              the exchange that obtains a token (get_token, /tokens/company)
    parse_token_answer(status, body, now)
                                    the token in the answer, or TokenRefused / MalformedAnswer
    inject(headers, token)          how a forwarded request carries the token
    error_fields(status, message)   the kind's own fields in the proxy's error answers
    rejected(status, ret_code)      whether an answer means "this token is not accepted"
    token_path                      a client's own token request, answered locally (in any
                                    spelling an upstream might take for it: spelling())...
    claimed_appid / check / grant / refuse
                                    ...and how: which set it names, whether its sign verifies,
                                    and the answers in the family's own shape

Everything here is pure: no I/O, no clock of its own (`now` is passed in). The token lifecycle
(tokens/), the upstream exchange and the forwarding (server/) are written once, for every kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final, Protocol
from urllib.parse import unquote

from multidict import CIMultiDict

# A token request signed with a time further than this from the proxy's clock is refused (v5's
# create_time, V6's currentTime), as Sobot refuses it; it also keeps a captured sign from being
# usable for long.
MAX_CLOCK_SKEW: Final = 300
# The longest a token is believed to live, whatever its answer says: a day is what the vendor
# documents; a lifetime past this is a misread (a unit, a garbled claim), and renewing a
# month-old token early costs one token call, where never renewing would cost every request.
MAX_LIFETIME: Final = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token as its endpoint issued it: the value and its lifetime in seconds."""

    value: str = ""
    lifetime: float = 0.0

    def __repr__(self) -> str:  # the value is a credential: never in a repr or a traceback
        return f"IssuedToken(lifetime={self.lifetime})"


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """The HTTP exchange that obtains a token. `path` (with its query) is appended to the
    credential set's upstream base URL; `secrets` are values in it never to be logged."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = field(default=None, repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)


class MalformedAnswer(ValueError):
    """The token endpoint answered something that is not a well-formed answer of its kind."""


class TokenRefused(Exception):
    """The token endpoint answered, and refused: `code` is its own code (as text).

    `configuration_error`: no retry can fix it (a wrong appid, secret or sign)."""

    def __init__(self, code: str, message: str, *, configuration_error: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.configuration_error = configuration_error


@dataclass(frozen=True, slots=True)
class ClientTokenRequest:
    """A client's own token request, as far as a kind needs it: the decoded query and the
    body (empty when the kind reads none)."""

    query: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """An answer the proxy gives itself, in a family's own shape; `code` is for the log."""

    status: int
    body: bytes = field(repr=False)
    code: str


class Credential(Protocol):
    """One credential set of one kind. See the module docstring."""

    kind: ClassVar[str]  # "v5", "v6": the TOML `kind`
    token_path: ClassVar[str]  # the path of the kind's token endpoint, as clients call it
    reads_client_body: ClassVar[bool]  # a client's token request carries its claim in the body
    # Background renewal: at `renewal_fraction` of a token's life at the latest, and earlier by
    # the refresh margin (SOBOT_REFRESH_MARGIN) when `uses_refresh_margin`.
    renewal_fraction: ClassVar[float]
    uses_refresh_margin: ClassVar[bool]
    # Shared-store keys begin with this: kinds never share a key, whatever their appids.
    store_namespace: ClassVar[str]

    appid: str

    def token_request(self, now: float) -> TokenRequest: ...

    def parse_token_answer(self, status: int, body: bytes, now: float) -> IssuedToken:
        """The token, or raise TokenRefused (the endpoint said no) / MalformedAnswer."""
        ...

    def inject(self, headers: CIMultiDict[str], token: str) -> None:
        """Put `token` in a forwarded request's headers, replacing what the client sent."""
        ...

    def rejected(self, status: int, ret_code: str | None) -> bool:
        """Whether an answer (its HTTP status, its return code if it carries one) means the
        injected token was not accepted: the one answer that is replayed with a new token."""
        ...

    def claimed_appid(self, request: ClientTokenRequest) -> str | None:
        """The appid a client's token request names (None: it names none)."""
        ...

    def check(self, request: ClientTokenRequest, now: float) -> str | None:
        """None if the request is signed with this set's secret, else the refusal's code."""
        ...

    def grant(self, token: str, seconds_left: float) -> LocalAnswer:
        """The answer handing `token` to a client that proved it knows the secret."""
        ...

    def refuse(self, code: str | None) -> LocalAnswer:
        """The answer to a token request that does not verify (`code` from check()), or that
        names no configured appid (None)."""
        ...

    def describe(self, code: str) -> str:
        """A token endpoint's code, with its meaning when known, for logs and /readyz."""
        ...

    def error_fields(self, status: int, message: str) -> Mapping[str, object]:
        """Fields of the kind's own error shape, added beside `ret_code` and `ret_msg` to the
        proxy's own error answers on its routes (none for v5, whose shape those are)."""
        ...


def spelling(path: str) -> str:
    """`path` as an upstream might take it, for comparing with a token path (names()).

    An upstream may decode percent-encodings (`get%5ftoken`), drop `;parameters`, fold case,
    trim white space (Spring's path matching once did), take `get_token.json` for `get_token`
    (Spring MVC's suffix patterns) or ignore a trailing slash: any of these must still be
    answered locally, never forwarded, since every token request rotates the token.
    """
    segments = (unquote(segment.partition(";")[0]).strip() for segment in path.split("/"))
    return "/".join(segments).rstrip("/").lower()


def names(spelled: str, token_path: str) -> bool:
    """Whether a path of this `spelling()` is `token_path` to an upstream (`x.json` too)."""
    if spelled == token_path:
        return True
    suffix = spelled[len(token_path) :]
    return spelled.startswith(token_path + ".") and "/" not in suffix


def spelled_as(path: str, token_path: str) -> bool:
    """Whether an upstream could take `path` for `token_path`, however it is spelled."""
    return names(spelling(path), token_path)


def header_safe(token: str) -> bool:
    """Whether `token` can go in a request's head as it is: no white space or control character
    (a CR LF in it would end the header, and begin another)."""
    return bool(token) and token.isascii() and token.isprintable() and " " not in token
