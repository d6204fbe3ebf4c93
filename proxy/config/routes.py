"""Routes and credential sets: which paths go where, carrying which credential.

    route           a path prefix -> an upstream (a base URL) and a credential set, or none
    credential set  an appid and its secret, of one kind (v5, v6), with one token

The simple configuration is a table of its own: SOBOT_APPID / SOBOT_APP_KEY and the region or
base URL are the set named `default` (kind v5) and the main upstream, and every prefix of
SOBOT_FORWARD_PREFIXES goes to the main upstream with `default`. The TOML file adds
`[credentials.NAME]` sets and `[[routes]]`; a `[[routes]]` prefix equal to a forwarded prefix
replaces it. The loader (settings.py) validates all of it; these are the values it produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from proxy.sobot.credential import Credential
from proxy.sobot.kinds import KINDS

DEFAULT_CREDENTIALS: Final = "default"
NO_CREDENTIALS: Final = "none"
# The v5 families seen in real clients, all on the regional domain with the v5 token.
DEFAULT_FORWARD_PREFIXES: Final = (
    "/api/",
    "/chat-facebook/api/",
    "/chat-third/api/",
    "/comm-open/api/",
)
DEFAULT_AUTHORIZATION_SCHEME: Final = "Bearer"


@dataclass(frozen=True, slots=True)
class CredentialSettings:
    """One credential set. `base_url`: where its token comes from (None: the main upstream)."""

    name: str
    kind: str
    appid: str
    secret: str = field(repr=False)
    base_url: str | None = None
    # v6: `Authorization: <scheme> <token>`; "" sends the bare token.
    authorization_scheme: str = DEFAULT_AUTHORIZATION_SCHEME
    # The file the secret was read from (None: given as a value), for a reload to read again.
    # Where the secret came from, not what the set is: left out of ==.
    secret_file: str | None = field(default=None, compare=False)

    def credential(self) -> Credential:
        """The set as its kind speaks it: appid, secret and injection."""
        return KINDS[self.kind](self.appid, self.secret, self.authorization_scheme)


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """One route. `base_url` None: the main upstream; `credentials` None: inject nothing."""

    prefix: str
    base_url: str | None = None
    credentials: str | None = DEFAULT_CREDENTIALS


@dataclass(frozen=True, slots=True)
class ResolvedRoute:
    """A route as it is served, shared by every tenant. `base_url` None: the main upstream of
    the tenant that asks (each tenant has its own); `credentials`: a set's name, looked up in
    the asking tenant's sets (None: inject nothing)."""

    prefix: str
    base_url: str | None
    credentials: str | None

    def upstream(self, main_base_url: str) -> str:
        """Where the route goes for a tenant whose main upstream is `main_base_url`."""
        return self.base_url or main_base_url


def resolve_routes(
    forward_prefixes: tuple[str, ...], routes: tuple[RouteSettings, ...]
) -> tuple[ResolvedRoute, ...]:
    """The route table: the forwarded prefixes, then `[[routes]]` (which replace a forwarded
    prefix they repeat), longest prefix first, as they are matched."""
    table = {
        prefix: ResolvedRoute(prefix, None, DEFAULT_CREDENTIALS) for prefix in forward_prefixes
    }
    for route in routes:
        table[route.prefix] = ResolvedRoute(route.prefix, route.base_url, route.credentials)
    return tuple(sorted(table.values(), key=lambda route: (-len(route.prefix), route.prefix)))
