"""Optional Bearer API keys (RERANK_API_KEYS). With no keys configured, every route is open."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.errors import Unauthorized

# auto_error=False: a missing or malformed header is our 401 in our error shape, not FastAPI's 403.
bearer_scheme = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <key>`, one of RERANK_API_KEYS (only when keys are configured).",
)


def check_api_key(keys: list[str], authorization: str | None) -> None:
    """Raise Unauthorized unless `authorization` is `Bearer <one of keys>` (no keys: always passes)."""
    if not keys:
        return
    if not authorization:
        raise Unauthorized(
            "missing API key: send the header `Authorization: Bearer <key>`",
            param="Authorization",
            code="missing_api_key",
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "malformed Authorization header: send `Authorization: Bearer <key>`",
            param="Authorization",
            code="invalid_api_key",
        )
    # Compare against every key in constant time, so timing says nothing about which key nearly matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if not matched:
        raise Unauthorized("invalid API key", param="Authorization", code="invalid_api_key")


async def require_api_key(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """Route dependency: the request's Bearer key must be one of the configured keys."""
    check_api_key(request.app.state.settings.api_keys, request.headers.get("authorization"))


ApiKeyDep = Annotated[None, Depends(require_api_key)]
