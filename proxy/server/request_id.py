"""Request ids: the client's `X-Request-Id` when it is a sane one, else a new one.

The id goes upstream to Sobot, back to the client, and into every log line written while the
request is handled (through structlog's context variables), so one call can be followed from
the application's logs to the proxy's and, where Sobot logs it, to Sobot's.
"""

from __future__ import annotations

import re
import uuid
from typing import Final

from multidict import CIMultiDictProxy

HEADER: Final = "X-Request-Id"
# Ids in common use (UUIDs, ULIDs, trace ids, "svc-1234"): printable, no spaces, no quotes, short.
# Anything else is replaced, so a log line or a header never carries what a client made up.
_SANE: Final = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def request_id_for(headers: CIMultiDictProxy[str]) -> str:
    given = headers.get(HEADER)
    if given is not None and _SANE.fullmatch(given):
        return given
    return str(uuid.uuid4())
