"""Secrets read from files: the one reading the loader does at start-up and a reload again.

    a secret   the file's text, stripped (an app_key, a v6 app_secret, the Redis password)
    a list     the file's lines, each as it is (client keys: tenants.bind_client_keys reads them)

A problem is a ValueError whose message names the file as it was given, never what is in it;
the caller prefixes the setting that names the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

COMMENT: Final = "#"
ReadText = Callable[[Path], str]


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def read_secret(path: Path, shown: str, read: ReadText = read_text) -> str:
    """The secret in the file at `path` (named `shown` in a problem), stripped."""
    text = _read(path, shown, read).strip()
    if not text:
        raise ValueError(f"{shown} is empty")
    return text


def read_secret_lines(path: Path, shown: str, read: ReadText = read_text) -> tuple[str, ...]:
    """The lines of the file at `path`, as they are; it must hold one that is not blank nor a
    comment."""
    lines = _read(path, shown, read).splitlines()
    if not any(is_content(line) for line in lines):
        raise ValueError(f"{shown} is empty")
    return tuple(lines)


def is_content(line: str) -> bool:
    """Whether a line of a list file says something: it is not blank nor a comment."""
    return bool(line.strip()) and not line.strip().startswith(COMMENT)


def _read(path: Path, shown: str, read: ReadText) -> str:
    try:
        return read(path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ValueError(f"cannot read {shown} ({reason or exc})") from None
