"""The upstream client: pooled HTTP/1.1 keep-alive connections to Sobot (client.py), and how an
exchange can fail (errors.py). Everything a caller needs is importable from here."""

from proxy.upstream.client import HIGH_WATER, KEEPALIVE, MAX_HEAD, Client, Origin, Response
from proxy.upstream.errors import (
    ClientError,
    ConnectError,
    ConnectTimeout,
    PayloadError,
    ProtocolError,
    ReadTimeout,
    SendError,
    ServerDisconnected,
)

__all__ = [
    "HIGH_WATER",
    "KEEPALIVE",
    "MAX_HEAD",
    "Client",
    "ClientError",
    "ConnectError",
    "ConnectTimeout",
    "Origin",
    "PayloadError",
    "ProtocolError",
    "ReadTimeout",
    "Response",
    "SendError",
    "ServerDisconnected",
]
