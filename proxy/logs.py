"""Structured logging: configured once at start-up, one line per event.

In `json` format stdout carries nothing but JSON objects, one a line, for a log shipper. In
`console` format lines are laid out for people at a terminal. Credentials never reach a line:
the code never logs them, and a last processor masks any field with a credential's name in case
a future change tries.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, BinaryIO, Final, TextIO, cast

import orjson
import structlog

# Field names that could carry a credential; their values are masked whatever they are.
SECRET_FIELDS: Final = frozenset({"token", "app_key", "sign", "authorization", "password"})
REDACTED: Final = "[redacted]"


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in SECRET_FIELDS.intersection(event_dict):
        event_dict[key] = REDACTED
    return event_dict


def _orjson_bytes(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> bytes:
    # default=str: an unexpected value type becomes text rather than losing the line.
    return orjson.dumps(event_dict, default=str)


def configure_logging(level: str, fmt: str, stream: BinaryIO | None = None) -> None:
    """Configure structlog for the whole process; call once, before the server starts."""
    out = stream if stream is not None else sys.stdout.buffer
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
        # A plain-text traceback: no local variables, which could hold a credential.
        structlog.processors.format_exc_info,
    ]
    if fmt == "json":
        processors = [*shared, _orjson_bytes]
        factory: Any = structlog.BytesLoggerFactory(out)
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=False)]
        factory = structlog.WriteLoggerFactory(cast(TextIO, _TextOver(out)))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


class _TextOver:
    """A text stream over a binary one, flushed each line so a terminal sees it at once."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def write(self, text: str) -> None:
        self._out.write(text.encode())

    def flush(self) -> None:
        self._out.flush()


def get_logger(**context: Any) -> structlog.typing.FilteringBoundLogger:
    """A logger bound now, under the configuration in force now (components take it at build)."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger().bind(**context)
    return logger
