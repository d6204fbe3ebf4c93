"""The credential sets a proxy serves, each with its kind and its token manager.

Built once at start-up (app.py). The handler asks it which set a client's own token request is
for (by kind, then by the appid the request names); the routes hold the set they inject.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from proxy.sobot.credential import Credential
from proxy.tokens.manager import TokenManager


@dataclass(frozen=True, slots=True)
class ManagedCredential:
    """One credential set: its name, its kind (with the appid and secret), its token."""

    name: str
    credential: Credential
    tokens: TokenManager


class CredentialSets:
    """Every credential set, `default` first."""

    __slots__ = ("_by_kind", "_sets", "_token_kinds")

    def __init__(self, sets: Sequence[ManagedCredential]) -> None:
        self._sets = tuple(sets)
        self._by_kind: dict[str, dict[str, ManagedCredential]] = {}
        for managed in self._sets:
            self._by_kind.setdefault(managed.credential.kind, {})[managed.credential.appid] = (
                managed
            )
        # One credential of each kind answers "is this that kind's token path?".
        self._token_kinds = tuple(
            next(iter(by_appid.values())).credential for by_appid in self._by_kind.values()
        )

    def __iter__(self) -> Iterator[ManagedCredential]:
        return iter(self._sets)

    @property
    def default(self) -> ManagedCredential:
        return self._sets[0]

    def named(self, name: str) -> ManagedCredential:
        return next(managed for managed in self._sets if managed.name == name)

    def token_kind(self, path: str) -> Credential | None:
        """The kind whose token endpoint `path` is (in any spelling), among the kinds served."""
        for credential in self._token_kinds:
            if credential.is_token_path(path):
                return credential
        return None

    def for_appid(self, kind: str, appid: str | None) -> ManagedCredential | None:
        """The set of `kind` with `appid`, if one is served."""
        if appid is None:
            return None
        return self._by_kind.get(kind, {}).get(appid)
