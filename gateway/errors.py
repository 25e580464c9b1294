"""The gateway's exception hierarchy. Each class maps to exactly one HTTP status (see the table below).

Routes and services raise these; one handler (registered by the app factory) renders every one of them as
`{"error": {"message", "type", "param", "code"}}`. Engine errors and the scheduler's domain errors
(core.errors) are translated here too, so routes never catch bare `Exception`.
"""

from __future__ import annotations

from core import errors as domain
from engines.base import EngineError, EngineFailure, EngineTimeout, EngineUnavailable

# Client values quoted back in an error message are cut to about this many characters: a 5 MB `model` name
# must not come back as a 5 MB 404 (or go into the log).
ECHO_CHARS = 100


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters (the full length is said)."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class GatewayError(Exception):
    """Base class: an error with an HTTP status and a message that tells the caller what to change."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.error_type

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(GatewayError):
    """The request is malformed or out of range (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class RequestTimeout(GatewayError):
    """The client did not send the whole request in time (408)."""

    status_code = 408
    error_type = "request_timeout"

    def headers(self) -> dict[str, str]:
        # The rest of the body may still come: this connection cannot carry another request.
        return {"Connection": "close"}


class UnsupportedMediaType(GatewayError):
    """The body is not declared as JSON (415)."""

    status_code = 415
    error_type = "unsupported_media_type"


class Unauthorized(GatewayError):
    """The Bearer key is missing or wrong (401)."""

    status_code = 401
    error_type = "authentication_error"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ModelNotFound(GatewayError):
    """The request names a model this gateway does not serve (404)."""

    status_code = 404
    error_type = "model_not_found"


class PayloadTooLarge(GatewayError):
    """Too many documents or too large a body (413)."""

    status_code = 413
    error_type = "payload_too_large"


class BodyTooLarge(PayloadTooLarge):
    """The body is over RERANK_MAX_BODY_BYTES (413); the connection closes, since the rest is not read."""

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class Overloaded(GatewayError):
    """The queue is full; retry after `retry_after_s` (429)."""

    status_code = 429
    error_type = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float, **kw) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, int(-(-self.retry_after_s // 1))))}


class ServiceUnavailable(GatewayError):
    """No engine can answer now, or a request's deadline passed while queued (503)."""

    status_code = 503
    error_type = "service_unavailable"


class UpstreamFailure(GatewayError):
    """The engine answered with an error (502)."""

    status_code = 502
    error_type = "upstream_error"


class ShuttingDown(ServiceUnavailable):
    """The drain deadline passed before the request was answered (503 with Retry-After)."""

    error_type = "shutting_down"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1", "Connection": "close"}


class GatewayTimeout(ServiceUnavailable):
    """The request's deadline passed before it was scored (503, as issue 4 asks)."""

    error_type = "timeout"


def from_engine_error(exc: EngineError) -> GatewayError:
    """Translate an engine failure at the boundary to the HTTP status table."""
    if isinstance(exc, EngineTimeout):
        return GatewayTimeout(f"the engine did not answer in time: {exc}")
    if isinstance(exc, EngineUnavailable):
        return ServiceUnavailable(f"no engine is available: {exc}")
    if isinstance(exc, EngineFailure):
        return UpstreamFailure(f"the engine failed: {exc}")
    return UpstreamFailure(f"the engine failed: {exc}")


def from_domain_error(exc: domain.DomainError) -> GatewayError:
    """Translate a scheduling outcome (core.errors) to the HTTP status table."""
    if isinstance(exc, domain.InputTooLarge):
        return PayloadTooLarge(exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, domain.InputRejected):
        return InvalidRequest(exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, domain.Overloaded):
        return Overloaded(exc.message, retry_after_s=exc.retry_after_s)
    if isinstance(exc, domain.DeadlineExceeded):
        return GatewayTimeout(exc.message)
    if isinstance(exc, domain.ShuttingDown):
        return ShuttingDown(exc.message)
    return ServiceUnavailable(exc.message)
