"""Bearer API keys -> Principal, checked before any body work. Keys are kept only as sha256 digests and
compared in constant time against every configured digest."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from fastapi import Request

from embedserve.errors import AuthenticationFailed
from embedserve.types import ANONYMOUS, Principal


def key_id(key: str) -> str:
    """A non-secret identifier for logs and usage records."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyChecker:
    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [(hashlib.sha256(k.encode()).digest(), key_id(k)) for k in keys]

    @property
    def open(self) -> bool:
        return not self._digests

    def check(self, authorization: str | None) -> Principal:
        if self.open:
            return ANONYMOUS
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Provide it in an Authorization header using Bearer "
                "auth (Authorization: Bearer YOUR_KEY).")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationFailed("The Authorization header must be 'Bearer YOUR_KEY'.")
        given = hashlib.sha256(key.strip().encode()).digest()
        found: str | None = None
        for digest, ident in self._digests:  # no early exit: time does not depend on which key
            if hmac.compare_digest(given, digest):
                found = ident
        if found is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return Principal(key_id=found)


async def authenticate(request: Request) -> Principal:
    checker: KeyChecker = request.app.state.embedserve.keys
    principal = checker.check(request.headers.get("authorization"))
    request.state.principal = principal
    return principal
