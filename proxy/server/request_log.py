"""What one request did, gathered while it is handled and logged as one line when it ends."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    request_id: str  # logged through the logging context, with every line of the request
    tenant: str | None = None  # once known (a request refused before has none)
    route: str | None = None  # the prefix of the route it went along (a token request's own)
    credentials: str | None = None  # the credential set injected or asked for, or "none"
    status: int | None = None
    ret_code: str | None = None
    attempts: int = 0  # 0: answered by the proxy itself; 2: after the replay (900002, 401)
    upstream_s: float = 0.0
    error: str | None = None

    def fields(self, duration_s: float) -> dict[str, object]:
        fields: dict[str, object] = {
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "attempts": self.attempts,
            "duration_ms": round(duration_s * 1000, 2),
        }
        if self.tenant is not None:
            fields["tenant"] = self.tenant
        if self.route is not None:
            fields["route"] = self.route
        if self.credentials is not None:
            fields["credentials"] = self.credentials
        if self.ret_code is not None:
            fields["ret_code"] = self.ret_code
        if self.attempts:
            fields["upstream_ms"] = round(self.upstream_s * 1000, 2)
        if self.error is not None:
            fields["error"] = self.error
        return fields
