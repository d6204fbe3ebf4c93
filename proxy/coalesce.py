"""Writes gathered to the end of the event loop's pass while the proxy is busy.

Under load one pass of the event loop finishes many requests. Written as each is finished, every
answer wakes its client on its own, and every forwarded request wakes the upstream: on a shared
host each wake-up is a context switch that the application and the kernel pay for. Gathered to
the end of the pass, they leave one after another, and a peer woken by the first finds the rest
already there. The number of writes is the same; the peers' work shrinks, and so does ours,
since their answers then come back in batches too (measured in the README's Performance section:
wrk and the upstream beside the proxy spend less than half the CPU per request they did).

A write waits only while `busy()` says another request is in flight: with nothing to gather it
with, it leaves at once, so a lone request never waits. Bytes for one connection always leave in
the order they were written, and a connection's gathered bytes are bounded (`limit`): past it
they leave at once, so a streamed body is not held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

# A connection's gathered bytes leave at once past this: a streamed body is never held whole.
LIMIT: Final = 64 * 1024


class WriteCoalescer:
    """Writes to many transports, put off to the end of the loop's pass while `busy()`."""

    __slots__ = ("_busy", "_limit", "_pending", "_scheduled")

    def __init__(self, busy: Callable[[], bool], *, limit: int = LIMIT) -> None:
        self._busy = busy
        self._limit = limit
        self._pending: dict[asyncio.WriteTransport, _Gathered] = {}
        self._scheduled = False

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        self.write_parts(transport, (data,))

    def write_parts(self, transport: asyncio.WriteTransport, parts: Sequence[bytes]) -> None:
        gathered = self._pending.get(transport)
        if gathered is None:
            if not self._busy():
                _write(transport, parts)
                return
            gathered = self._pending[transport] = _Gathered()
            if not self._scheduled:
                # Runs after every callback already queued, that is, after the rest of the pass.
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self.flush_all)
        gathered.add(parts)
        if gathered.size >= self._limit:
            self.flush(transport)

    def flush(self, transport: asyncio.WriteTransport) -> None:
        """Send what is gathered for `transport` now (before it closes or half-closes)."""
        gathered = self._pending.pop(transport, None)
        if gathered is not None and not transport.is_closing():
            _write(transport, gathered.parts)

    def discard(self, transport: asyncio.WriteTransport) -> None:
        """Drop what is gathered for `transport` (it is being aborted)."""
        self._pending.pop(transport, None)

    def flush_all(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for transport, gathered in pending.items():
            # A connection aborted or lost meanwhile drops its bytes, as its transport would.
            if transport.is_closing():
                continue
            # One connection's failure must not keep the others' bytes waiting: it is aborted
            # (its peer learns at once) and the flush goes on.
            try:
                _write(transport, gathered.parts)
            except Exception:
                with contextlib.suppress(Exception):
                    transport.abort()


class _Gathered:
    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, parts: Iterable[bytes]) -> None:
        for part in parts:
            if part:
                # A caller's bytearray or memoryview may change once we return: keep a copy.
                self.parts.append(part if type(part) is bytes else bytes(part))
                self.size += len(part)


# CVE-2024-12254: the stdlib loop's writelines() never pauses the protocol on Python 3.12 before
# 3.12.9 and 3.13 before 3.13.2, so a peer that stops reading grows our memory without bound
# (aiohttp's http_writer.py avoids it the same way: SKIP_WRITELINES). Before 3.12 it joins the
# parts anyway. uvloop's own writelines pauses (tests/test_coalesce_writelines.py) and writes
# the parts with one writev.
_STDLIB_WRITELINES_UNSAFE: Final = sys.version_info < (3, 12, 9) or (
    (3, 13) <= sys.version_info < (3, 13, 2)
)


def _write(transport: asyncio.WriteTransport, parts: Sequence[bytes]) -> None:
    if len(parts) == 1:
        transport.write(parts[0])
    elif not parts:
        return
    elif not _STDLIB_WRITELINES_UNSAFE or type(transport).__module__.startswith("uvloop."):
        transport.writelines(parts)  # one system call for all
    else:
        transport.write(b"".join(parts))


class CoalescedTransport(asyncio.Transport):
    """A server connection's transport whose writes go through a WriteCoalescer: what aiohttp's
    request handler is given instead of the socket's own transport.

    It counts the bytes written (`written`), so the connection's send watchdog can tell whether
    the client took any; `cut_because` says why the proxy cut the connection, if it did;
    `on_close` hears a close or a half-close, once what was gathered has gone to the socket."""

    def __init__(
        self,
        transport: asyncio.Transport,
        coalescer: WriteCoalescer,
        *,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self._transport = transport
        self._coalescer = coalescer
        self._on_close = on_close
        self.written = 0
        self.cut_because: str | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)
        self._coalescer.write_parts(self._transport, (data,))  # type: ignore[arg-type]

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        parts = list(list_of_data)
        self.written += sum(map(len, parts))
        self._coalescer.write_parts(self._transport, parts)  # type: ignore[arg-type]

    def write_eof(self) -> None:
        self._coalescer.flush(self._transport)
        self._transport.write_eof()
        self._on_close()

    def close(self) -> None:
        self._coalescer.flush(self._transport)  # a polite close sends what was written
        self._transport.close()
        self._on_close()

    def abort(self) -> None:
        self._coalescer.discard(self._transport)
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()
