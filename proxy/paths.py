"""Which request targets are forwarded, and the exact path and query sent upstream.

Only origin-form targets under /api/ are forwarded. Leading repeated slashes count as one
(a public PHP SDK for Sobot sends `//api/ws/5/ticket/...`). Anything that could make the path
mean something else upstream is rejected with 400 rather than normalised, because a normalised
path is not what the client asked for: dot segments (`.`, `..`, also percent-encoded, also with
`;parameters` such as `..;x=1`), encoded slashes or backslashes (`%2f`, `%5c`), raw backslashes,
empty segments inside the path, and raw bytes outside ASCII anywhere in the target. The query
string is passed on byte for byte.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote

from proxy.errors import BadRequest, NotProxied
from proxy.protocol import GET_TOKEN_PATH

API_PREFIX: Final = "/api/"


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
        # Java servlet containers (Tomcat, Jetty, Spring) drop a segment's `;parameters` before
        # they resolve dot segments: upstream, `..;x=1` is `..`.
        if decoded.partition(";")[0] in (".", "..") or "/" in decoded or "\\" in decoded:
            raise BadRequest("dot segments, encoded slashes and backslashes are not forwarded")
    return path, mark + query


def is_get_token(path: str) -> bool:
    """Whether the upstream could take `path` for get_token, however it is spelled.

    An upstream may decode percent-encodings (`get%5ftoken`), drop `;parameters`, fold case or
    ignore a trailing slash: any of these must still be answered locally, never forwarded.
    """
    segments = (unquote(segment.partition(";")[0]) for segment in path.split("/"))
    return "/".join(segments).rstrip("/").lower() == GET_TOKEN_PATH
