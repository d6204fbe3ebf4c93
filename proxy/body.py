"""A request body streamed to Sobot as it arrives, and kept for the one 900002 replay.

The first attempt reads the client's body chunk by chunk, sending each chunk on and appending it
to a spool: in memory up to SPOOL_MEMORY_LIMIT, beyond that in an anonymous temporary file
(unlinked from the start, so nothing is left behind on any path, a crash included). Memory stays
bounded whatever the size. A replay first reads whatever the first attempt left unread, then
sends the spool.

`progress` is called whenever bytes move, so the forwarder can extend its deadline: a slow but
moving upload is never cut, a stalled one is, and `waiting_for_client` says whose fault it was.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import IO, Final

from aiohttp import StreamReader

from proxy.errors import BodyTooLarge

SPOOL_MEMORY_LIMIT: Final = 1024 * 1024
CHUNK_SIZE: Final = 64 * 1024


def _no_progress() -> None:
    pass


class ReplayableBody:
    def __init__(
        self,
        content: StreamReader,
        *,
        declared_length: int | None,
        max_size: int,
        temp_dir: str | None,
    ) -> None:
        if declared_length is not None and declared_length > max_size:
            raise BodyTooLarge(f"request body over the limit of {max_size} bytes")
        self._content = content
        self._max_size = max_size
        self._temp_dir = temp_dir
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        self._reader_done = asyncio.Event()
        self._reader_done.set()
        self.size = 0
        self.progress: Callable[[], None] = _no_progress
        self.waiting_for_client = False
        self.error: BaseException | None = None  # why reading the client's body stopped short

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory = bytearray()

    def first_pass(self) -> AsyncIterator[bytes]:
        """The body as the client sends it, kept as it goes: the first attempt's data."""
        return self._from_client()

    async def replay(self) -> AsyncIterator[bytes]:
        """The whole body again: the replay's data."""
        # The first attempt's sender is cancelled when its answer is released; let it finish
        # before this one reads on from the client.
        await self._reader_done.wait()
        async for _ in self._from_client():
            pass
        if self._file is None:
            if self._memory:
                yield bytes(self._memory)
            return
        self._file.seek(0)
        while chunk := self._file.read(CHUNK_SIZE):
            yield chunk
            self.progress()

    async def _from_client(self) -> AsyncIterator[bytes]:
        self._reader_done.clear()
        self.error = None
        try:
            while True:
                self.waiting_for_client = True
                chunk = await self._content.readany()
                self.waiting_for_client = False
                if not chunk:
                    return
                self._keep(chunk)
                self.progress()
                yield chunk
                self.progress()  # the upstream took it
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.waiting_for_client = False
            self._reader_done.set()

    def _keep(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max_size:
            raise BodyTooLarge(f"request body over the limit of {self._max_size} bytes")
        if self._file is None and len(self._memory) + len(chunk) <= SPOOL_MEMORY_LIMIT:
            self._memory += chunk
            return
        if self._file is None:
            # Anonymous and already unlinked: the OS reclaims it on every path.
            self._file = tempfile.TemporaryFile(dir=self._temp_dir)  # noqa: SIM115
            self._file.write(self._memory)
            self._memory = bytearray()
        # A page-cache write of one chunk takes microseconds: not worth a thread hop each.
        self._file.write(chunk)
