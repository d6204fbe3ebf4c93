"""The credential sets a proxy serves, each with its kind and its token manager.

One per tenant (server/tenants.py), built when the tenant is first used (`default`'s at
start-up). The handler asks it which set a client's own token request is for (by kind, then by
the appid the request names); a tenant's routes hold the set they inject.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from proxy.sobot.credential import Credential, names, spelling
from proxy.tokens.manager import TokenManager
from proxy.tokens.source import CredentialTokenSource
from proxy.tokens.store import TokenStore


@dataclass(frozen=True, slots=True)
class CredentialSet:
    """One credential set: its name, its kind (with the appid and secret), its token (the
    manager, the source it fetches from and the store it keeps it in).

    `in_use`: a route injects it. Only then is its token fetched at start-up and renewed in the
    background; a set no route names is fetched when a client asks for its token, since every
    token call may rotate the token other users of the appid hold.

    A reload that changes only the secret makes a new CredentialSet with the new credential and
    the same manager, source (now signing with it) and store: the token held is kept."""

    name: str
    credential: Credential
    tokens: TokenManager
    source: CredentialTokenSource
    store: TokenStore
    in_use: bool = True


class CredentialSets:
    """Every credential set, `default` first."""

    __slots__ = ("_by_kind", "_sets", "_token_kinds")

    def __init__(self, sets: Sequence[CredentialSet]) -> None:
        self._sets = tuple(sets)
        self._by_kind: dict[str, dict[str, CredentialSet]] = {}
        for managed in self._sets:
            self._by_kind.setdefault(managed.credential.kind, {})[managed.credential.appid] = (
                managed
            )
        # One credential of each kind answers "is this that kind's token path?".
        self._token_kinds = tuple(
            next(iter(by_appid.values())).credential for by_appid in self._by_kind.values()
        )

    def __iter__(self) -> Iterator[CredentialSet]:
        return iter(self._sets)

    @property
    def default(self) -> CredentialSet:
        return self._sets[0]

    def named(self, name: str) -> CredentialSet:
        return next(managed for managed in self._sets if managed.name == name)

    def find(self, name: str) -> CredentialSet | None:
        """The set called `name`, if there is one."""
        return next((managed for managed in self._sets if managed.name == name), None)

    def token_kind(self, path: str) -> Credential | None:
        """The kind whose token endpoint `path` is (in any spelling), among the kinds served."""
        spelled = spelling(path)  # once, for every kind
        for credential in self._token_kinds:
            if names(spelled, credential.token_path):
                return credential
        return None

    def for_appid(self, kind: str, appid: str | None) -> CredentialSet | None:
        """The set of `kind` with `appid`, if one is served."""
        if appid is None:
            return None
        return self._by_kind.get(kind, {}).get(appid)
