"""A request body streamed to Sobot as it arrives, and kept for the one replay after a rejected
token (v5: 900002; V6: 401).

The first attempt reads the client's body chunk by chunk, sending each chunk on and appending it
to a spool: in memory up to SPOOL_MEMORY_LIMIT, beyond that (the whole body) in an anonymous
temporary file (unlinked from the start, so nothing is left behind on any path, a crash
included). Memory stays bounded whatever the size. A replay first reads whatever the first
attempt left unread, then sends the spool.

The disk is bounded too: a SpoolBudget hands out room before a body is read (a Reservation), as
much as the body can put on disk, so an admitted body always has room and one that would not
fit is refused at once. If writing the spool fails all the same (the disk full for other
reasons, the directory gone), the body fails with SpoolFailed: the proxy's fault, not the
client's.

While a request is being sent, a Deadline is attached: moving bytes push it back, a failure to
read the client's body ends it at once, and `waiting_for_client` says whose fault a timeout was.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import tempfile
from collections.abc import AsyncGenerator, Callable
from typing import IO, Final

from aiohttp import StreamReader

from proxy.config.settings import BODY_IN_MEMORY, spool_need
from proxy.errors import BodyTooLarge, SpoolFailed, SpoolFull

SPOOL_MEMORY_LIMIT: Final = BODY_IN_MEMORY
CHUNK_SIZE: Final = 64 * 1024


class SpoolBudget:
    """The room on disk that the spools of admitted request bodies may take at once.

    A body reserves, before it is read, the most it can put on disk: its Content-Length when
    that is over SPOOL_MEMORY_LIMIT (a spooled body is on disk whole), nothing when it is not,
    and max_body when its length is unknown (chunked), given back down to what it took once it
    is in. Room is never taken later, so nothing admitted can run out of it.
    """

    def __init__(
        self, limit: int, *, max_body: int, on_change: Callable[[int], None] | None = None
    ) -> None:
        self.limit = limit
        self.reserved = 0
        self._unknown_length_need = spool_need(max_body)
        self._on_change = on_change

    def reserve(self, content_length: int | None) -> Reservation:
        """Room for a body of `content_length` (None: unknown), or SpoolFull."""
        need = self._unknown_length_need if content_length is None else spool_need(content_length)
        if not need:
            return NOTHING_RESERVED
        if self.reserved + need > self.limit:
            raise SpoolFull(
                "the proxy is keeping as many large request bodies as it has room for "
                "(SOBOT_SPOOL_LIMIT); try again shortly"
            )
        self._change(need)
        return Reservation(self, need)

    def _change(self, delta: int) -> None:
        self.reserved += delta
        if self._on_change is not None:
            self._on_change(self.reserved)


class Reservation:
    """Room in a SpoolBudget, held until released (releasing twice is harmless)."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: SpoolBudget | None, size: int) -> None:
        self._budget = budget
        self.size = size

    def shrink_to(self, size: int) -> None:
        if size < self.size and self._budget is not None:
            self._budget._change(size - self.size)
            self.size = size

    def release(self) -> None:
        self.shrink_to(0)


NOTHING_RESERVED: Final = Reservation(None, 0)  # a body kept in memory needs no room


def spool_failed(exc: OSError) -> SpoolFailed:
    name = errno.errorcode.get(exc.errno or 0, "unknown error")
    return SpoolFailed(
        f"the proxy could not keep the request body for a replay: its temporary storage "
        f"failed ({name}); see its log",
        cause=exc,
    )


class Deadline:
    """An asyncio.timeout pushed back to `period` from now whenever bytes move.

    Rescheduling replaces a timer, so it is only done once less than half the period is left:
    at most a couple of times a period, however small and many the chunks.
    """

    def __init__(self, timeout: asyncio.Timeout, period: float) -> None:
        self._timeout = timeout
        self._period = period
        self._loop = asyncio.get_running_loop()

    def progress(self) -> None:
        when = self._timeout.when()
        now = self._loop.time()
        if when is not None and when - now < self._period / 2:
            self._timeout.reschedule(now + self._period)

    def expire_now(self) -> None:
        self._timeout.reschedule(self._loop.time())


class ReplayableBody:
    def __init__(
        self,
        content: StreamReader,
        *,
        max_size: int,
        temp_dir: str | None,
        reservation: Reservation = NOTHING_RESERVED,
    ) -> None:
        self._content = content
        self._max_size = max_size
        self._temp_dir = temp_dir
        self._reservation = reservation  # released by the caller, who made it
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        self._first_pass: AsyncGenerator[bytes] | None = None
        self._first_pass_over = asyncio.Event()
        self.size = 0
        self.deadline: Deadline | None = None  # set while a request is being sent
        self.waiting_for_client = False
        self.error: BaseException | None = None  # why reading the client's body failed

    def close(self) -> None:
        if self._file is not None:
            # A failed flush of the last bytes has been answered for (SpoolFailed), if it
            # mattered; the file is closed either way.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self._memory = bytearray()

    def first_pass(self) -> AsyncGenerator[bytes]:
        """The body as the client sends it, kept as it goes: the first attempt's data."""
        self._first_pass = self._from_client(self._first_pass_over)
        return self._first_pass

    async def replay(self) -> AsyncGenerator[bytes]:
        """The whole body again: the replay's data."""
        await self._end_first_pass()
        async for _ in self._from_client(None):
            pass
        if self._file is None:
            if self._memory:
                yield bytes(self._memory)
            return
        try:
            self._file.seek(0)
            chunk = self._file.read(CHUNK_SIZE)
        except OSError as exc:
            raise self._spool_failed(exc) from exc
        while chunk:
            yield chunk
            self._progress()
            try:
                chunk = self._file.read(CHUNK_SIZE)
            except OSError as exc:
                raise self._spool_failed(exc) from exc

    def _spool_failed(self, exc: OSError) -> SpoolFailed:
        self.error = error = spool_failed(exc)
        if self.deadline is not None:
            self.deadline.expire_now()
        return error

    async def _end_first_pass(self) -> None:
        """The first attempt's reader must stop before the replay reads on from the client.

        Its sender is cancelled when its answer is released. If the reader is inside an await
        it ends with that cancellation; if it is paused at a yield, it is closed here.
        """
        first = self._first_pass
        if first is None:
            return
        if getattr(first, "ag_running", False):  # an async generator object says so
            await self._first_pass_over.wait()
        else:
            await first.aclose()

    async def _from_client(self, over: asyncio.Event | None) -> AsyncGenerator[bytes]:
        try:
            async for chunk in self._read_client():
                yield chunk
        finally:
            if over is not None:
                over.set()

    async def _read_client(self) -> AsyncGenerator[bytes]:
        while True:
            self.waiting_for_client = True
            try:
                chunk = await self._content.readany()
                self.waiting_for_client = False
                if not chunk:
                    # All in: what it did not put on disk goes back to the budget.
                    self._reservation.shrink_to(self.size if self._file is not None else 0)
                    return
                self._keep(chunk)
            except Exception as exc:  # malformed, too large, or the client went away
                self.waiting_for_client = False
                self.error = exc
                if self.deadline is not None:
                    self.deadline.expire_now()  # end the exchange now; the forwarder says why
                raise
            self._progress()
            yield chunk
            self._progress()  # the upstream took it

    def _progress(self) -> None:
        if self.deadline is not None:
            self.deadline.progress()

    def _keep(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max_size:
            raise BodyTooLarge(f"request body over the limit of {self._max_size} bytes")
        if self._file is None and len(self._memory) + len(chunk) <= SPOOL_MEMORY_LIMIT:
            self._memory += chunk
            return
        try:
            if self._file is None:
                # Anonymous and already unlinked: the OS reclaims it on every path.
                self._file = tempfile.TemporaryFile(dir=self._temp_dir)  # noqa: SIM115
                self._file.write(self._memory)
                self._memory = bytearray()
            # A page-cache write of one chunk takes microseconds: not worth a thread hop each.
            self._file.write(chunk)
        except OSError as exc:  # the disk is full, or the directory gone: not the client's doing
            raise spool_failed(exc) from exc
