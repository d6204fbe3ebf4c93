"""SIGHUPs that come before the proxy can reload: noted, and answered by one reload once it can.

From the moment `note_early` is called (`serve`, before it reads the configuration; a worker of
several, before its imports) until the Reloader installs its own handler (server/reload.py), a
SIGHUP is noted rather than ending the process or being lost: the configuration just read may
already be the old one. `Reloader.start` takes the note and reloads once.
"""

from __future__ import annotations

import signal
from types import FrameType

_noted = False


def note_early() -> None:
    """Note every SIGHUP from now on, until a handler of the Reloader's replaces this one."""
    signal.signal(signal.SIGHUP, _note)


def _note(_signum: int, _frame: FrameType | None) -> None:
    global _noted
    _noted = True


def take_noted() -> bool:
    """Whether a SIGHUP was noted since the last call."""
    global _noted
    noted, _noted = _noted, False
    return noted
