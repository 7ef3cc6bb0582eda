"""Typed errors every layer raises; the gateway maps them to HTTP in one place.

Each carries the OpenAI error `type` and `code` it should surface as, and its HTTP status.
"""

from __future__ import annotations


class StreamError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(StreamError):
    status = 400
    type = "invalid_request_error"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"
    reason = "too-small"  # as a fallback reason: the tier's window could not hold it


class CloudNotAllowed(InvalidRequest):
    status = 403
    type = "permission_error"
    code = "cloud_not_allowed"


class PermissionDenied(StreamError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class TierNotAllowed(StreamError):
    """The caller's key may not use the tier it named."""

    status = 403
    type = "permission_error"
    code = "tier_not_allowed"


class AuthenticationFailed(StreamError):
    """No API key, or one this server does not know (OpenAI's wording and code)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(StreamError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(StreamError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(StreamError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class BackendFailed(StreamError):
    """A tier's backend failed (refused, timed out, answered 5xx, broke mid-stream)."""

    status = 502
    type = "upstream_error"
    code = "backend_error"
    reason = "down"  # how x-stream-route-reason names a fallback it caused

    def __init__(self, message: str, *, tier: str = "", **kw):
        super().__init__(message, **kw)
        self.tier = tier


class BackendRateLimited(BackendFailed):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class LimitExceeded(StreamError):
    """The caller is over its request rate or concurrent streams (429, retry later)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class BudgetExhausted(LimitExceeded):
    """The caller's (or everyone's) budget cannot cover this request (OpenAI's quota error)."""

    type = "insufficient_quota"
    code = "insufficient_quota"
    reason = "over-budget"


class ServiceUnavailable(StreamError):
    """Something STREAM depends on for this request (an identity provider) cannot be reached."""

    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class BackendRejected(StreamError):
    """The backend said the request itself is bad (4xx): trying another tier will not help."""

    status = 400
    type = "invalid_request_error"


class TierUnavailable(StreamError):
    """No candidate tier could serve the request; the message says what each one answered."""

    status = 503
    type = "service_unavailable"
    code = "tier_unavailable"


class ConfigError(Exception):
    """The configuration file or environment is invalid; the message says where and why."""


class RelayError(StreamError):
    """Something about the relay channel is wrong; the backstop result may still save the day."""

    status = 502
    type = "upstream_error"
    code = "relay_error"


class RelayFrameInvalid(RelayError):
    """A frame that is not a well-formed frame of this protocol (or over the size limit)."""


class RelayTampered(RelayError):
    """A sealed frame failed authentication: its bytes or header were changed."""


class RelayReplayed(RelayError):
    """A frame arrived a second time (its sequence number was already accepted)."""


class RelayReordered(RelayError):
    """A frame arrived ahead of its turn: an earlier one is missing or was moved."""


class RelayTruncated(RelayError):
    """The stream ended without its final frame, or the final frame's count disagrees."""


class RelaySpliced(RelayError):
    """A frame belonging to another channel was inserted into this one."""


class RelayPlaintext(RelayError):
    """An unsealed frame arrived on a channel that requires encryption."""


class TokenRejected(StreamError):
    """A relay capability token is malformed, forged, for another channel or role, expired or
    already used."""

    status = 401
    type = "authentication_error"
    code = "invalid_relay_token"
