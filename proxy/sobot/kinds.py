"""The credential kinds there are, by the name a credential set's `kind` gives."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from proxy.sobot.credential import Credential
from proxy.sobot.v5 import V5Credential
from proxy.sobot.v6 import V6Credential

# A kind is built from an appid, its secret and, for v6, the Authorization scheme.
KINDS: Final[Mapping[str, Callable[[str, str, str], Credential]]] = {
    "v5": lambda appid, secret, _scheme: V5Credential(appid, secret),
    "v6": lambda appid, secret, scheme: V6Credential(appid, secret, authorization_scheme=scheme),
}

# Every kind's token endpoint, as clients call it (`check` refuses one as a probe: it rotates).
TOKEN_PATHS: Final = (V5Credential.token_path, V6Credential.token_path)
