"""Which request targets are forwarded, and the exact path and query sent upstream.

Only origin-form targets under /api/ are forwarded. Leading repeated slashes count as one
(a public PHP SDK for Sobot sends `//api/ws/5/ticket/...`). Anything that could make the path
mean something else upstream is rejected with 400 rather than normalised, because a normalised
path is not what the client asked for: dot segments (`.`, `..`, also percent-encoded, also with
`;parameters` such as `..;x=1`), encoded slashes or backslashes (`%2f`, `%5c`), raw backslashes,
empty segments inside the path, control characters (raw, or percent-encoded in the path), a `#`
(a fragment is never part of a request target, RFC 9112 section 3.2; servers that meet one cut
the path there, after `..` too), and raw bytes outside ASCII anywhere in the target. The query
string is passed on byte for byte.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

from proxy.errors import BadRequest, NotProxied
from proxy.sobot.v5 import GET_TOKEN_PATH

API_PREFIX: Final = "/api/"
# Never in a request target as sent: control characters (raw, or in a path percent-encoded) and
# `#`, where a fragment would begin.
_RAW_REFUSED: Final = re.compile(r"[\x00-\x20\x7f#]")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def split_target(raw_target: str) -> tuple[str, str]:
    """The (path, '?query' or '') to forward for a raw request target, or raise.

    Raises NotProxied (404) for paths outside /api/ and BadRequest (400) for targets that could
    reach the upstream anywhere else.
    """
    if not raw_target.startswith("/"):
        raise BadRequest("only origin-form request targets such as /api/... are accepted")
    if not raw_target.isascii():
        # RFC 3986 allows none; aiohttp's C parser refuses them, its pure-Python one does not.
        raise BadRequest("bytes outside ASCII in a request target must be percent-encoded")
    if _RAW_REFUSED.search(raw_target):
        raise BadRequest("control characters and `#` in a request target must be percent-encoded")
    path, mark, query = raw_target.partition("?")
    path = "/" + path.lstrip("/")
    if not path.startswith(API_PREFIX):
        raise NotProxied(f"only paths under {API_PREFIX} are forwarded to Sobot")
    segments = path[len(API_PREFIX) :].split("/")
    for index, segment in enumerate(segments):
        if not segment:
            if index == len(segments) - 1:
                continue  # a trailing slash is part of some APIs' paths
            raise BadRequest("empty path segments are not forwarded")
        decoded = unquote(segment)
        if _CONTROL.search(decoded):
            raise BadRequest("control characters are not forwarded in a path, even encoded")
        # Java servlet containers (Tomcat, Jetty, Spring) drop a segment's `;parameters` before
        # they resolve dot segments: upstream, `..;x=1` is `..`.
        if decoded.partition(";")[0] in (".", "..") or "/" in decoded or "\\" in decoded:
            raise BadRequest("dot segments, encoded slashes and backslashes are not forwarded")
    return path, mark + query


def is_get_token(path: str) -> bool:
    """Whether the upstream could take `path` for get_token, however it is spelled.

    An upstream may decode percent-encodings (`get%5ftoken`), drop `;parameters`, fold case,
    trim white space (Spring's path matching once did), take `get_token.json` for `get_token`
    (Spring MVC's suffix patterns) or ignore a trailing slash: any of these must still be
    answered locally, never forwarded.
    """
    segments = (unquote(segment.partition(";")[0]).strip() for segment in path.split("/"))
    spelled = "/".join(segments).rstrip("/").lower()
    if spelled == GET_TOKEN_PATH:
        return True
    suffix = spelled[len(GET_TOKEN_PATH) :]
    return spelled.startswith(GET_TOKEN_PATH + ".") and "/" not in suffix
