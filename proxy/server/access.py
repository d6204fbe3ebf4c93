"""Who may use the proxy, and for what: client keys, and allow-lists of paths and methods.

Client keys are compared in constant time: each presented key is hashed and compared with the
hash of every configured key, with no early exit, so neither a key's content nor its position in
the list shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from aiohttp import hdrs
from multidict import CIMultiDictProxy

from proxy.config.settings import Settings
from proxy.errors import Forbidden, Unauthorized

_BEARER: Final = "bearer "


class AccessPolicy:
    def __init__(self, settings: Settings) -> None:
        self._key_digests = tuple(_digest(key) for key in settings.client_keys)
        self._allow_paths = settings.allow_paths
        self._allow_methods = frozenset(settings.allow_methods)

    @property
    def authenticates(self) -> bool:
        """Whether clients must present a key (and Authorization is consumed, not forwarded)."""
        return bool(self._key_digests)

    def authenticate(self, headers: CIMultiDictProxy[str]) -> None:
        """Raise Unauthorized unless the request carries one of the client keys."""
        if not self._key_digests:
            return
        presented = headers.get(hdrs.AUTHORIZATION, "")
        if presented[: len(_BEARER)].lower() != _BEARER:
            raise Unauthorized("send a client key as `Authorization: Bearer <key>`")
        digest = _digest(presented[len(_BEARER) :].strip())
        matched = False
        for known in self._key_digests:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise Unauthorized("the client key is not valid")

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
