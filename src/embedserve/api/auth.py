"""Bearer API keys -> Principal, before any body work. The key ring (keys.KeyRing) holds every accepted
key as a peppered digest; this module reads the header, asks the ring, and, for a key with limits,
admits the request against its rate limit and arranges the x-ratelimit-* headers of its response."""

from __future__ import annotations

from fastapi import Request

from embedserve.api.context import context_of
from embedserve.api.state import app_state
from embedserve.errors import AuthenticationFailed, PermissionDenied
from embedserve.types import ANONYMOUS, Principal


def bearer_key(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(
            "You didn't provide an API key. Provide it in an Authorization header using Bearer "
            "auth (Authorization: Bearer YOUR_KEY)."
        )
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationFailed("The Authorization header must be 'Bearer YOUR_KEY'.")
    return key.strip()


async def authenticate(request: Request) -> Principal:
    state, context = app_state(request.app), context_of(request)
    if state.keys.open:
        principal = ANONYMOUS
    else:
        principal = state.keys.authenticate(bearer_key(request.headers.get("authorization")))
    context.principal = principal
    if principal.limited:  # the middleware adds these to whatever response this request gets
        context.response_headers = lambda: state.limiter.headers(principal)
    return principal


async def admit(request: Request) -> Principal:
    """Authenticate, then take one request from the key's requests-per-minute (429 when empty): a
    request refused later, by validation, still counts."""
    principal = await authenticate(request)
    await app_state(request.app).limiter.admit_request(principal)
    return principal


async def require_admin(request: Request) -> Principal:
    principal = await authenticate(request)
    if not principal.admin:
        raise PermissionDenied(
            "This route needs an admin key (--admin-key, or a key created with "
            "`embedserve keys create --admin`)."
        )
    return principal
