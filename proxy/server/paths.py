"""Which request targets may be forwarded, and the exact path and query sent upstream.

Only origin-form targets are forwarded, and only along a route (routing.py); the rules here
apply under every route's prefix. Leading repeated slashes count as one
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

from proxy.errors import BadRequest

# Never in a request target as sent: control characters (raw, or in a path percent-encoded) and
# `#`, where a fragment would begin.
_RAW_REFUSED: Final = re.compile(r"[\x00-\x20\x7f#]")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def split_target(raw_target: str) -> tuple[str, str]:
    """The (path, '?query' or '') to forward for a raw request target, or raise.

    Raises BadRequest (400) for targets that could reach the upstream anywhere else than they
    say. Whether a route serves the path is the route table's to say.
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
    segments = path[1:].split("/")
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


def as_served(path: str) -> str:
    """`path` (from split_target) as the upstream will take it, to choose its route and apply
    the allow-lists: percent-encodings decoded, each segment's `;parameters` dropped (Java
    servlet containers drop them), case kept.

    Otherwise `/text/ai-agent-open/%73elf/` or `.../self;x/` would go along a shorter route
    than `/text/ai-agent-open/self/`, which the upstream serves them as. split_target has
    refused every encoding that could make a new segment (`%2f`, dot segments), so decoding
    keeps the segments as they are. Most paths have nothing to decode: they come back as they
    are, with nothing allocated.
    """
    if "%" not in path and ";" not in path:
        return path
    return "/".join(unquote(segment.partition(";")[0]) for segment in path.split("/"))
