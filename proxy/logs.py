"""Structured logging: configured once at start-up, one line per event.

In `json` format stdout carries nothing but JSON objects, one a line, for a log shipper. In
`console` format lines are laid out for people at a terminal. Records from libraries (the
standard `logging` module) go the same way.

Credentials never reach a line. The code never logs them; a processor masks any field with a
credential's name; and every line passes through a scrubber that replaces the known secret
values (the app_key, client keys, recent tokens and signatures) wherever they appear, in an
exception's text included, as they are and as JSON and repr() escape them. The scrubber is
the last line of defence, not the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping
from typing import Any, BinaryIO, Final, TextIO, cast

import ahocorasick_rs
import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError

# Field names that could carry a credential; their values are masked whatever they are.
SECRET_FIELDS: Final = frozenset({"token", "app_key", "sign", "authorization", "password"})
REDACTED: Final = "[redacted]"
_REDACTED_BYTES: Final = REDACTED.encode()
# Shorter values are not scrubbed: they would mangle ordinary text and guard little.
MIN_SECRET_LENGTH: Final = 8
# The short-lived secrets watched per owner: a token manager's current token and the one before
# it (a late line may still quote it); a token source's last two signatures.
OWNED_KEPT: Final = 2
UNOWNED_KEPT: Final = 16
# Values added one by one, searched one by one, before the automaton is rebuilt with them.
PENDING_LIMIT: Final = 16
_LONGEST: Final = ahocorasick_rs.MatchKind.LeftmostLongest
# Of the library's automata, the one quickest to build (5 ms for 2,000 secrets) that searches
# nearly as fast as its DFA (which takes six times as long to build).
_AUTOMATON: Final = ahocorasick_rs.Implementation.ContiguousNFA


class Secrets:
    """The secret values the process knows now; the logs never show any of them.

    Two kinds, kept apart so that one never costs the other: lasting ones (app keys, client
    keys, the store's password), added all at once at start-up (`add_lasting`), and short-lived
    ones (tokens, signatures), each added by its `owner` (a token manager, a token source), of
    which the last OWNED_KEPT are watched for: a credential set's current token stays watched
    however many other sets fetch theirs. A value an owner let go stays watched until the next
    rebuild, which does no harm.

    Found with Aho-Corasick automata (ahocorasick-rs): one pass over a line finds every secret,
    whatever their number. With 2,000 secrets, one regular expression alternating them took
    0.4-1 ms a line and 30-50 ms to compile, at every add (1,000 tenants with a client key each
    started in 104 s); an automaton takes about 1 us a line and 5 ms to build. ahocorasick-rs
    rather than pyahocorasick (2.9 us a line, builds alike): it searches bytes as the lines are
    (pyahocorasick's wheels search str: a decode per line), has leftmost-longest matching built
    in, and ships type hints. An automaton cannot grow: a value added alone waits in a short
    list, searched value by value, until PENDING_LIMIT of them make a rebuild worth it, and the
    short-lived values have an automaton of their own, so a token fetched never rebuilds the
    thousands of keys.
    """

    def __init__(self, fixed: Iterable[str] = ()) -> None:
        self._lasting: set[bytes] = set()
        self._lasting_watch = _Watch()
        # A short-lived value is kept as its forms (see _forms), watched and let go together.
        self._owned: weakref.WeakKeyDictionary[object, deque[tuple[bytes, ...]]] = (
            weakref.WeakKeyDictionary()
        )
        self._unowned: deque[tuple[bytes, ...]] = deque(maxlen=UNOWNED_KEPT)
        self._short_watch = _Watch()
        self.add_lasting(fixed)

    def add_lasting(self, values: Iterable[str]) -> None:
        """Watch for each of `values` for good (keys): all at once, one rebuild."""
        self._lasting.update(form for value in values for form in _forms(value))
        self._lasting_watch.rebuild(self._lasting)

    def add(self, value: str, *, owner: object = None) -> None:
        """Watch for the short-lived `value` (a token, a signature) as one of the last values
        `owner` added (an object, weakly referenced: its values go with it), or, without an
        owner, as one of the last few added so. Keys: add_lasting."""
        forms = _forms(value)
        if not forms:
            return
        kept = self._unowned if owner is None else self._owned.get(owner)
        if kept is None:
            kept = self._owned[owner] = deque(maxlen=OWNED_KEPT)
        if forms in kept:
            return
        kept.append(forms)
        for form in forms:
            self._short_watch.add(form, self._short_lived)

    def _short_lived(self) -> set[bytes]:
        return {
            form
            for kept in (self._unowned, *self._owned.values())
            for forms in kept
            for form in forms
        }

    def scrub(self, data: bytes) -> bytes:
        spans = self._lasting_watch.spans(data)
        spans += self._short_watch.spans(data)
        if not spans:
            return data
        # Spans from several automata may overlap or nest: each run of them goes whole.
        spans.sort()
        parts: list[bytes] = []
        written = 0
        run_start, run_end = spans[0]
        for start, end in spans[1:]:
            if start > run_end:
                parts += (data[written:run_start], _REDACTED_BYTES)
                written = run_end
                run_start = start
            run_end = max(run_end, end)
        parts += (data[written:run_start], _REDACTED_BYTES, data[run_end:])
        return b"".join(parts)


class _Watch:
    """An automaton over some secret values, and the values added since it was built."""

    __slots__ = ("_automaton", "_pending")

    def __init__(self) -> None:
        self._automaton: ahocorasick_rs.BytesAhoCorasick | None = None
        self._pending: list[bytes] = []

    def rebuild(self, values: Collection[bytes]) -> None:
        self._automaton = (
            ahocorasick_rs.BytesAhoCorasick(values, matchkind=_LONGEST, implementation=_AUTOMATON)
            if values
            else None
        )
        self._pending = []

    def add(self, value: bytes, values: Callable[[], Collection[bytes]]) -> None:
        """`value` watched from now on; `values`: every value, should it be time to rebuild."""
        if len(self._pending) < PENDING_LIMIT:
            self._pending = [*self._pending, value]  # a new list: a scrub may be reading it
        else:
            self.rebuild(values())

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """(start, end) of every secret found in `data` (leftmost longest, not overlapping
        within the automaton's own)."""
        automaton = self._automaton
        found = automaton.find_matches_as_indexes(data) if automaton is not None else ()
        spans = [(start, end) for _, start, end in found] if found else []
        for value in self._pending:
            at = data.find(value)
            while at >= 0:
                spans.append((at, at + len(value)))
                at = data.find(value, at + len(value))
        return spans


def _forms(value: str) -> tuple[bytes, ...]:
    """`value` in every form a rendered line can carry it, each once: as it is; JSON-escaped
    (a string field of a JSON line); as repr() shows it (an exception's args in a traceback, a
    KeyError's message); and that repr JSON-escaped (a traceback in a JSON line). A secret with
    a quote, a backslash or a control character differs in each. None if the value is too short
    to scrub safely."""
    if len(value) < MIN_SECRET_LENGTH:
        return ()
    # repr() quotes with ' unless the text holds ' and no ": as the secret alone, and inside a
    # longer text that holds both (its ' then escaped). Without the quotes.
    shown = (repr(value)[1:-1], repr(f'{value}"')[1:-2])
    forms = [value.encode("utf-8", "surrogateescape"), *(text.encode() for text in shown)]
    with contextlib.suppress(TypeError):  # lone surrogates: orjson refuses them, lines too
        forms += (orjson.dumps(text)[1:-1] for text in (value, *shown))
    return tuple(dict.fromkeys(forms))


def redact_secret_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in SECRET_FIELDS.intersection(event_dict):
        event_dict[key] = REDACTED
    return event_dict


class _UtcTimestamp:
    """`timestamp` in ISO 8601 UTC with microseconds, as structlog's TimeStamper(fmt="iso",
    utc=True) writes it, for a third of the cost: the part up to the second is formatted once
    a second, not on every line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


def _orjson_bytes(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> bytes:
    # default=str: an unexpected value type becomes text rather than losing the line.
    try:
        return orjson.dumps(event_dict, default=str)
    except TypeError:
        # Text with lone surrogates: bytes a client sent that are not UTF-8 (aiohttp decodes
        # with surrogateescape), which orjson refuses. Rare, so only then is every value mended.
        return orjson.dumps(_without_surrogates(event_dict), default=str)


def _without_surrogates(value: Any) -> Any:
    """`value` with every string's undecodable bytes shown as `\\xNN` escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, Mapping):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_surrogates(item) for item in value]
    return value


class _ScrubbedOutput:
    """The output stream, with every secret value replaced before it is written.

    Loggers flush after every line. In the event loop the flush is put off to the end of the
    loop's current pass: the lines of every request finished in one pass leave in one write
    instead of one system call each (a few percent of a request's CPU under load), and a line
    still leaves within microseconds. Outside the loop, a flush is a flush.
    """

    def __init__(self, out: BinaryIO, secrets: Secrets) -> None:
        self._out = out
        self._secrets = secrets
        self._flush_pending = False

    def write(self, data: bytes | str) -> None:
        # backslashreplace: a console line may quote a client's bytes that are not UTF-8.
        raw = data.encode("utf-8", "backslashreplace") if isinstance(data, str) else data
        self._out.write(self._secrets.scrub(raw))

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # No loop (any more): nothing else will flush it, nor run a flush it left pending.
            self._flush_pending = False
            self._out.flush()
            return
        if not self._flush_pending:
            self._flush_pending = True
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        self._out.flush()


def configure_logging(
    level: str, fmt: str, stream: BinaryIO | None = None, secrets: Secrets | None = None
) -> Secrets:
    """Configure logging for the whole process; call once, before the server starts.

    Returns the registry of secret values to scrub; hand it to the components that learn new
    ones (tokens, signatures).
    """
    secrets = secrets if secrets is not None else Secrets()
    out = _ScrubbedOutput(stream if stream is not None else sys.stdout.buffer, secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _UtcTimestamp(),
        redact_secret_fields,
        # A plain-text traceback: no local variables, which could hold a credential.
        structlog.processors.format_exc_info,
    ]
    renderer: Any
    if fmt == "json":
        renderer = _orjson_bytes
        factory: Any = structlog.BytesLoggerFactory(cast(BinaryIO, out))
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.WriteLoggerFactory(cast(TextIO, out))
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _route_standard_logging(out, shared, fmt, numeric_level)
    return secrets


def _route_standard_logging(out: _ScrubbedOutput, shared: list[Any], fmt: str, level: int) -> None:
    """Send libraries' records (aiohttp's, asyncio's) through the same processors and output."""

    def render(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
        if fmt == "json":
            return _orjson_bytes(_logger, _method, event_dict).decode()
        return str(structlog.dev.ConsoleRenderer(colors=False)(_logger, _method, event_dict))

    handler = logging.StreamHandler(cast(TextIO, out))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, render],
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(allow=["reason"]), *shared],
        )
    )
    handler.addFilter(_bad_requests_in_one_line)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, logging.INFO))  # libraries' debug chatter stays out


_QUOTES_REQUEST: Final = re.compile(r"[:'\"/]")


def _bad_requests_in_one_line(record: logging.LogRecord) -> bool:
    """A client that does not speak valid HTTP is refused by aiohttp's parser, which logs it as
    an error with a traceback quoting the request's bytes. That is the client's mistake, not
    ours: keep one warning line with the parser's reason, and none of the bytes."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError) and record.name == "aiohttp.server":
        # The reason alone, cut where the parser starts quoting the request's bytes: at a colon
        # or a quote (C parser, and most pure-Python messages), or a target's slash (the
        # pure-Python parser's "invalid URL" names only the target).
        reason = (
            type(exc).__name__  # its message is the bare target
            if isinstance(exc, InvalidURLError)
            else _QUOTES_REQUEST.split(str(exc.message), 1)[0].strip() or type(exc).__name__
        )
        record.msg, record.args, record.exc_info, record.exc_text = (
            "bad_http_request",
            (),
            None,
            None,
        )
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.__dict__["reason"] = f"{exc.code}: {reason}"
    return True


def get_logger(**context: Any) -> structlog.typing.FilteringBoundLogger:
    """A logger bound now, under the configuration in force now (components take it at build)."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger().bind(**context)
    return logger
