"""How an exchange with the upstream can fail.

ClientError                         any failed exchange
├── ConnectError                    no connection: refused, name unknown, TLS not verified
├── ConnectTimeout (TimeoutError)   no connection within the connect timeout
├── ReadTimeout (TimeoutError)      no bytes within the read timeout
├── ServerDisconnected              the connection ended before the answer's headers
├── PayloadError                    the answer's body broke off (cut short, reset)
├── ProtocolError                   the answer is not HTTP/1.x as RFC 9112 has it
└── SendError                       the request could not be sent whole
"""

from __future__ import annotations


class ClientError(Exception):
    """An exchange with the upstream failed."""


class ConnectError(ClientError):
    def __init__(self, host: str, port: int, reason: str, *, errno: int | None = None) -> None:
        super().__init__(f"cannot connect to {host}:{port}: {reason}")
        self.host = host
        self.port = port
        self.reason = reason
        self.errno = errno  # the OSError's, when there was one


class ConnectTimeout(ClientError, TimeoutError):
    pass


class ReadTimeout(ClientError, TimeoutError):
    pass


class ServerDisconnected(ClientError):
    pass


class PayloadError(ClientError):
    pass


class ProtocolError(ClientError):
    pass


class SendError(ClientError):
    pass
