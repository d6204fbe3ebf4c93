"""Answers whose head reaches the client byte for byte as Sobot sent it.

Header bytes that are not UTF-8 (a GBK file name in `Content-Disposition`, say) arrive from the
upstream client as lone surrogates (`surrogateescape`, as aiohttp decodes). aiohttp writes a head
as UTF-8 and cannot write those: its C writer silently drops them, its pure-Python writer raises.
RFC 9110 section 5.5 asks a recipient to treat such bytes (obs-text) as opaque, so these classes
write the head themselves, with `surrogateescape`, whenever a header is not plain ASCII; an ASCII
head (nearly all) is left to aiohttp.

This overrides aiohttp's private `StreamResponse._write_headers` (the one place a head is
written, after `_prepare_headers` has added Date, Server, Connection and the framing headers)
and reads `_req` and `_payload_writer`. tests/test_exact_head.py pins that behaviour, so an
aiohttp upgrade that changes it fails the tests.
"""

from __future__ import annotations

import re
from typing import Final

from aiohttp import ClientConnectionResetError, web
from multidict import CIMultiDict

# What aiohttp refuses in a head too (RFC 9110 section 5.5, RFC 9112 section 4): a CR or LF
# would start a header of its own.
_FORBIDDEN: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def encode_head(status_line: str, headers: CIMultiDict[str]) -> bytes:
    """The head as bytes: UTF-8, with the surrogates of undecodable bytes turned back into them."""
    lines = [status_line, *(f"{name}: {value}" for name, value in headers.items())]
    if any(_FORBIDDEN.search(line) for line in lines):
        raise ValueError("a control character in a header: refused, as aiohttp refuses it")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


class _ExactHead(web.StreamResponse):
    async def _write_headers(self) -> None:
        headers = self.headers
        if all(name.isascii() and value.isascii() for name, value in headers.items()):
            await super()._write_headers()
            return
        request, writer = self._req, self._payload_writer
        # Both set by prepare(), before this is called.
        assert request is not None
        assert writer is not None
        version = request.version
        head = encode_head(
            f"HTTP/{version.major}.{version.minor} {self.status} {self.reason}", headers
        )
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")  # as aiohttp
        # Straight to the transport: the writer has nothing buffered yet, and sends only the
        # body (framed as _prepare_headers told it) after this.
        transport.write(head)
        writer.output_size += len(head)


class ExactHeadStreamResponse(_ExactHead):
    """A web.StreamResponse whose head goes out as the upstream's bytes."""


class ExactHeadResponse(_ExactHead, web.Response):
    """A web.Response whose head goes out as the upstream's bytes."""


# A body read whole and larger than this goes to the client in pieces of this size, each once
# the socket has taken the last ones (aiohttp waits for it to drain every 64 KiB): a client that
# stops reading then holds the body and a piece or two, not the body twice (ours, and a copy of
# its unsent rest in the transport's buffer).
WRITE_PIECE: Final = 64 * 1024


async def write_in_pieces(response: web.StreamResponse, body: bytes) -> None:
    view = memoryview(body)
    for start in range(0, len(view), WRITE_PIECE):
        await response.write(view[start : start + WRITE_PIECE])


class PiecewiseResponse(ExactHeadStreamResponse):
    """An answer read whole (larger than WRITE_PIECE), written a piece at a time by whoever
    writes it (handler.write_whole: after the forwarder has let Sobot's connection go), and let
    go of once written."""

    def __init__(self, *, status: int, body: bytes, headers: CIMultiDict[str]) -> None:
        super().__init__(status=status, headers=headers)
        self.content_length = len(body)
        self._unwritten = body

    async def write_body(self) -> None:
        """Write the body (once prepared); the answer keeps no reference to it afterwards."""
        body, self._unwritten = self._unwritten, b""
        await write_in_pieces(self, body)
