"""Value parsers shared by the settings loader (settings.py) and the routes tables
(toml_routes.py): text, choices, upstreams, path prefixes.

Each parser takes a raw value (a string from a flag or the environment, or a TOML value) and
returns it parsed, or raises ValueError with the reason, which the loader prefixes with where
the value came from. A reason never repeats a value that may hold a secret.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

# Sobot's public domains by region. China has two: the default SaaS (on Alibaba Cloud) and the
# one for companies on Tencent Cloud, as the vendor's Chinese developer pages name them.
REGIONS: Final = {
    "sg": "https://sg.sobot.io",
    "us": "https://us.sobot.com",
    "cn": "https://www.sobot.com",
    "cn-soboten": "https://www.soboten.com",
}
REGIONS_HELP: Final = (
    "sg = https://sg.sobot.io (Singapore), us = https://us.sobot.com (North America), "
    "cn = https://www.sobot.com (China), "
    "cn-soboten = https://www.soboten.com (China, for companies on Tencent Cloud)"
)


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def choice(choices: tuple[str, ...] | Mapping[str, str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        given = str(value).strip().lower()
        if given not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return given

    return parse


region: Final = choice(REGIONS)


def base_url(value: Any) -> str:
    """An upstream: scheme://host[:port][/prefix], returned without a trailing slash."""
    url = text(value)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{value!r} is not a valid URL") from None
    if "@" in parts.netloc:  # the value is not repeated: it may hold a password
        raise ValueError("the URL must not carry credentials")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL with a host")
    if any(char.isspace() for char in url):
        raise ValueError(f"{value!r} contains white space")
    # An empty query or fragment ("https://h/?") counts too: every path would follow it.
    if "?" in url or "#" in url:
        raise ValueError(f"{value!r} must not carry a query or fragment")
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything


def in_clear(url: str) -> bool:
    """Whether requests to the upstream `url` would cross the network unencrypted."""
    parts = urlsplit(url)
    return parts.scheme == "http" and not is_loopback(parts.hostname or "")


def items(value: Any) -> list[str]:
    """Items of a comma-separated string or a TOML list."""
    listed = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in listed if str(item).strip()]


# A route's prefix is matched against the request path after path confinement (server/paths.py)
# has refused empty, dot and encoded segments: a prefix holding one could never match.
_SEGMENT: Final = re.compile(r"[A-Za-z0-9._~-]+")


def path_prefix(value: Any) -> str:
    """A route's prefix: whole segments between slashes, such as /callservice/ (or / itself)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a path prefix (a string such as /callservice/)")
    if not (value.startswith("/") and value.endswith("/")):
        raise ValueError(f"{value!r} must start and end with / (such as /callservice/)")
    segments = value[1:-1].split("/") if value != "/" else []
    if not all(_SEGMENT.fullmatch(segment) and segment.strip(".") for segment in segments):
        raise ValueError(
            f"{value!r} is not a path prefix: its segments must be letters, digits and -._~, "
            "none of them empty or only dots"
        )
    return value


def path_prefixes(value: Any) -> tuple[str, ...]:
    """Route prefixes, comma-separated or a TOML list; a repeated one counts once."""
    return tuple(dict.fromkeys(path_prefix(prefix) for prefix in items(value)))


def paths(value: Any) -> tuple[str, ...]:
    """Path prefixes matched as text, under every route (the allow-list, metrics groups)."""
    given = items(value)
    for path in given:
        if not path.startswith("/"):
            raise ValueError(f"{path!r} is not a path (it must start with /)")
    return tuple(given)
