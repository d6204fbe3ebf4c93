"""The credential sets a proxy serves, each with its kind and its token manager.

One per tenant (server/tenants.py), built when the tenant is first used (`default`'s at
start-up); a tenant's routes hold the set they inject. Which set a client's own token request is
for is found across every tenant (Tenants.claimant).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from proxy.sobot.credential import Credential
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
    """One tenant's credential sets, `default` first."""

    __slots__ = ("_sets",)

    def __init__(self, sets: Sequence[CredentialSet]) -> None:
        self._sets = tuple(sets)

    def __iter__(self) -> Iterator[CredentialSet]:
        return iter(self._sets)

    @property
    def default(self) -> CredentialSet:
        return self._sets[0]

    def named(self, name: str) -> CredentialSet:
        """The set called `name` (there is one)."""
        found = self.find(name)
        if found is None:
            raise KeyError(name)
        return found

    def find(self, name: str) -> CredentialSet | None:
        """The set called `name`, if there is one."""
        return next((managed for managed in self._sets if managed.name == name), None)
