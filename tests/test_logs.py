"""Log output: lines written in one pass of the event loop leave in one write (the autouse
`logs` fixture restores the usual configuration for the next test)."""

from __future__ import annotations

import asyncio
import io

from proxy.logs import configure_logging, get_logger


class CountedFlushes(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


async def test_the_lines_of_one_loop_pass_are_flushed_once_at_its_end():
    out = CountedFlushes()
    configure_logging("info", "json", stream=out)
    log = get_logger()
    for number in range(5):
        log.info("line", number=number)
    assert out.flushes == 0  # not one a line
    await asyncio.sleep(0)  # the end of this pass
    assert out.flushes == 1
    assert len(out.getvalue().splitlines()) == 5


def test_outside_the_event_loop_every_line_is_flushed_at_once():
    out = CountedFlushes()
    configure_logging("info", "json", stream=out)
    get_logger().info("before the loop")
    assert out.flushes == 1
