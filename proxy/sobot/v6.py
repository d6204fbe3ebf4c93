"""The V6 call centre's credential kind (a stub: to be written)."""

from __future__ import annotations

from typing import ClassVar

from multidict import CIMultiDict

from proxy.sobot.credential import ClientTokenRequest, IssuedToken, LocalAnswer, TokenRequest

TOKEN_PATH = "/tokens/company"


class V6Credential:
    kind: ClassVar[str] = "v6"
    token_path: ClassVar[str] = TOKEN_PATH
    reads_client_body: ClassVar[bool] = True
    renewal_fraction: ClassVar[float] = 0.5
    uses_refresh_margin: ClassVar[bool] = False
    store_namespace: ClassVar[str] = "sobot-proxy-v6"

    def __init__(self, appid: str, secret: str, *, authorization_scheme: str = "Bearer") -> None:
        self.appid = appid
        self._secret = secret
        self._scheme = authorization_scheme

    def token_request(self, now: float) -> TokenRequest:
        raise NotImplementedError

    def parse_token_answer(self, status: int, body: bytes, now: float) -> IssuedToken:
        raise NotImplementedError

    def inject(self, headers: CIMultiDict[str], token: str) -> None:
        headers["Authorization"] = f"{self._scheme} {token}" if self._scheme else token

    def rejected(self, status: int, ret_code: str | None) -> bool:
        return status == 401

    def is_token_path(self, path: str) -> bool:
        raise NotImplementedError

    def claimed_appid(self, request: ClientTokenRequest) -> str | None:
        raise NotImplementedError

    def check(self, request: ClientTokenRequest, now: float) -> str | None:
        raise NotImplementedError

    def grant(self, token: str, seconds_left: float) -> LocalAnswer:
        raise NotImplementedError

    def refuse(self, code: str | None) -> LocalAnswer:
        raise NotImplementedError

    def describe(self, code: str) -> str:
        return code
