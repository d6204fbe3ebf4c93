"""The route table: which upstream and which credential set a request path goes to.

Built from Settings.route_table once per tenant (server/tenants.py), when the tenant is first
used: the prefixes are shared, but a route's upstream may be the tenant's main upstream and its
credential set is the tenant's set of that name. A lookup walks the prefixes longest first
and compares in place (str.startswith): it allocates nothing (tests/test_routes.py measures it),
and a handful of prefixes cost less than slicing the path to look it up in a dict. Prefixes end
with `/`, so they match whole segments (`/callservice/` never matches `/callservicex/`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy import upstream
from proxy.server.credentials import CredentialSet


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    base_url: str  # for logs and `check`
    origin: upstream.Origin
    base_path: str  # the base URL's path, "" or "/prefix": requests go to base_path + path
    credential_set: CredentialSet | None  # None: forwarded without injecting anything
    # The set the route names that its tenant does not have: the route is refused (403).
    lacking: str | None = None

    @classmethod
    def to(
        cls,
        prefix: str,
        base_url: str,
        credential_set: CredentialSet | None,
        *,
        lacking: str | None = None,
    ) -> Route:
        origin = upstream.Origin.of(base_url)
        return cls(prefix, base_url, origin, urlsplit(base_url).path, credential_set, lacking)

    @property
    def credentials_name(self) -> str:
        if self.lacking is not None:
            return self.lacking
        return "none" if self.credential_set is None else self.credential_set.name


class RouteTable:
    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = tuple(sorted(routes, key=lambda route: (-len(route.prefix), route.prefix)))

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def match(self, path: str) -> Route | None:
        """The route of the longest prefix `path` starts with; None: no route serves it."""
        # Indexed, not `for route in`: a for loop makes an iterator object on every call.
        routes = self._routes
        index = 0
        while index < len(routes):
            route = routes[index]
            if path.startswith(route.prefix):
                return route
            index += 1
        return None
