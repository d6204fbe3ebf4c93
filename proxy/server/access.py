"""Who may use the proxy, and for what: client keys, and allow-lists of paths and methods.

Client keys are looked up by their SHA-256 digest: a presented key is hashed, and its digest
looked up in a dict of the configured keys' digests, each to the tenant it is bound to
(Settings.client_key_bindings). One lookup, however many keys (a thousand tenants cost what one
does). What its timing could show is about digests, not keys: the dict hashes the digest
(with the process's own random seed) and compares whole digests of equal length, so a caller
who times it learns at best how a SHA-256 digest of its guess relates to a configured key's
digest; to steer that it would have to choose inputs by their digest (a preimage), and a digest
it learnt would not be a key: the proxy takes keys, never digests.

A reload (server/reload.py) replaces the keys with one attribute swap: a request is checked
against the keys before or after it, never a mix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

from aiohttp import hdrs
from multidict import CIMultiDictProxy

from proxy.config.settings import Settings
from proxy.errors import Forbidden, Unauthorized

_BEARER: Final = "bearer "


class AccessPolicy:
    def __init__(self, settings: Settings) -> None:
        self._tenant_of_digest = _table(settings.client_key_bindings)
        self._allow_paths = settings.allow_paths
        self._allow_methods = frozenset(settings.allow_methods)

    @property
    def authenticates(self) -> bool:
        """Whether clients must present a key (and Authorization is consumed, not forwarded)."""
        return bool(self._tenant_of_digest)

    def use(self, bindings: Iterable[tuple[str, str]]) -> None:
        """From now on, these (client key, its tenant): the whole table in one swap. Turning
        authentication on or off is not a reload's (the caller keeps it as it is)."""
        self._tenant_of_digest = _table(bindings)

    def authenticate(self, headers: CIMultiDictProxy[str]) -> str | None:
        """The tenant of the client key the request carries (None: no client keys are
        configured); raise Unauthorized if it carries none of them."""
        table = self._tenant_of_digest  # once: a reload may swap it meanwhile
        if not table:
            return None
        presented = headers.get(hdrs.AUTHORIZATION, "")
        if presented[: len(_BEARER)].lower() != _BEARER:
            raise Unauthorized("send a client key as `Authorization: Bearer <key>`")
        tenant = table.get(_digest(presented[len(_BEARER) :].strip()))
        if tenant is None:
            raise Unauthorized("the client key is not valid")
        return tenant

    def authorize(self, method: str, served: str) -> None:
        """Raise Forbidden unless the allow-lists (when set) admit this method and path."""
        if self._allow_methods and method not in self._allow_methods:
            raise Forbidden(f"the method {method} is not allowed through this proxy")
        # `served`: the path as the upstream takes it (paths.as_served, made once by the
        # handler). Encoded slashes and dot segments never get this far, so decoding cannot
        # make one path pass for another.
        if self._allow_paths and not served.startswith(self._allow_paths):
            raise Forbidden("this path is not allowed through this proxy")


def _digest(key: str) -> bytes:
    # surrogateescape: a presented key with bytes that are not UTF-8 (aiohttp decodes header
    # bytes that way) is hashed as the bytes it came as, and simply matches no key.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _table(bindings: Iterable[tuple[str, str]]) -> dict[bytes, str]:
    return {_digest(key): tenant for key, tenant in bindings}
