"""Warnings that a flood would repeat, logged once per kind per interval with a count.

A thousand slowloris connections timing out together must not write a thousand lines: the
first occurrence of a kind is logged at once, with its details; later ones within INTERVAL
seconds are only counted, and when the interval ends one more line of the same event says how
many there were (`repeated`, over `interval_s`) and starts another quiet interval. An interval
with nothing to report ends the kind's silence: its next occurrence is logged at once again.
The metrics count every occurrence; the log says that, and when, it happens.
"""

from __future__ import annotations

import asyncio
from typing import Final

import structlog

INTERVAL: Final = 60.0


class Occurrences:
    __slots__ = ("_interval", "_log", "_quiet")

    def __init__(
        self, log: structlog.typing.FilteringBoundLogger, *, interval: float = INTERVAL
    ) -> None:
        self._log = log
        self._interval = interval
        # (event, kind) -> occurrences not logged in its current quiet interval
        self._quiet: dict[tuple[str, str], int] = {}

    def warn(self, event: str, kind: str, **details: object) -> None:
        """One occurrence of `event` of `kind` (logged as the field `kind`)."""
        key = (event, kind)
        unlogged = self._quiet.get(key)
        if unlogged is not None:
            self._quiet[key] = unlogged + 1
            return
        self._log.warning(event, kind=kind, **details)
        self._start_quiet(key)

    def _start_quiet(self, key: tuple[str, str]) -> None:
        self._quiet[key] = 0
        asyncio.get_running_loop().call_later(self._interval, self._end_quiet, key)

    def _end_quiet(self, key: tuple[str, str]) -> None:
        unlogged = self._quiet.pop(key)
        if unlogged:
            event, kind = key
            self._log.warning(event, kind=kind, repeated=unlogged, interval_s=self._interval)
            self._start_quiet(key)
