"""Typed errors raised by the HTTP clients; none of them ever carries an access token.

Hierarchy::

    ClientError
    ├── APIError                       the API answered with an error envelope
    │   ├── GraphAPIError              Graph {"error": {message, code, error_subcode, fbtrace_id}}
    │   │   ├── BudgetEditLimitError   613/1487632: budget edits on this ad set blocked for 1 h
    │   │   └── CapiRejectedError      Conversions API refused the whole request
    │   └── HubSpotAPIError            HubSpot {status, message, category, correlationId}
    ├── TransportError                 connection failure, timeout, unreadable body
    ├── RetriesExhaustedError          retryable failures outlasted max_attempts / max_total_wait
    └── ThrottledError                 a usage block lasts longer than we are allowed to wait
"""

from __future__ import annotations

import re
from typing import Any

_TOKEN_PARAM = re.compile(r"(access_token|appsecret_proof|token)=([^&\s'\"]+)", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._\-~+/=]+", re.IGNORECASE)
REDACTED = "***"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove tokens from text: `access_token=` style params, bearer headers and known secrets."""
    out = text
    for secret in secrets:
        if secret:
            out = out.replace(secret, REDACTED)
    out = _TOKEN_PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", out)
    return _BEARER.sub(lambda m: f"{m.group(1)}{REDACTED}", out)


class ClientError(Exception):
    """Base of every error the clients raise."""


class APIError(ClientError):
    """The remote API answered with an error; fields come from its error envelope."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: int | None = None,
        subcode: int | None = None,
        category: str | None = None,
        trace_id: str | None = None,
        retryable: bool = False,
        method: str | None = None,
        path: str | None = None,
        body: Any = None,
    ) -> None:
        self.message = message
        self.http_status = http_status
        self.code = code
        self.subcode = subcode
        self.category = category
        self.trace_id = trace_id
        self.retryable = retryable
        self.method = method
        self.path = path
        self.body = body
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = [self.message]
        if self.code is not None:
            parts.append(f"code={self.code}")
        if self.subcode is not None:
            parts.append(f"subcode={self.subcode}")
        if self.category:
            parts.append(f"category={self.category}")
        if self.http_status is not None:
            parts.append(f"http={self.http_status}")
        if self.trace_id:
            parts.append(f"trace_id={self.trace_id}")
        if self.method and self.path:
            parts.append(f"on {self.method} {self.path}")
        return " | ".join(parts)


class GraphAPIError(APIError):
    """A Graph API / Marketing API error (`code`, `subcode`, `fbtrace_id`, `is_transient`)."""

    @property
    def fbtrace_id(self) -> str | None:
        """Meta's trace id for support requests."""
        return self.trace_id

    @property
    def error_subcode(self) -> int | None:
        """Graph's name for the subcode."""
        return self.subcode

    @property
    def error_type(self) -> str | None:
        """Graph's `type` field (e.g. OAuthException)."""
        return self.category


class BudgetEditLimitError(GraphAPIError):
    """613/1487632: more than 4 budget edits in an hour; the ad set's budget is locked for 1 h.

    Never retried: calling again only extends the lock.
    """


class CapiRejectedError(GraphAPIError):
    """The Conversions API rejected the whole request (one bad event rejects all)."""


class HubSpotAPIError(APIError):
    """A HubSpot error (`category`, `correlationId`, per-field `errors`)."""

    def __init__(self, message: str, *, errors: list[Any] | None = None, **kwargs: Any) -> None:
        self.errors = errors or []
        super().__init__(message, **kwargs)

    @property
    def correlation_id(self) -> str | None:
        """HubSpot's correlation id for support requests."""
        return self.trace_id


class TransportError(ClientError):
    """The request did not produce a usable HTTP answer (connect/read timeout, reset, bad JSON)."""

    retryable = True


class RetriesExhaustedError(ClientError):
    """Retryable failures persisted past the retry budget; `last_error` holds the final one."""

    def __init__(self, message: str, *, last_error: ClientError, attempts: int, waited_s: float):
        self.last_error = last_error
        self.attempts = attempts
        self.waited_s = waited_s
        super().__init__(message)


class ThrottledError(ClientError):
    """A usage block (usage headers, Retry-After) outlasts the allowed wait; no call was made."""

    def __init__(self, message: str, *, scope: str, wait_s: float) -> None:
        self.scope = scope
        self.wait_s = wait_s
        super().__init__(message)


class TooManyItemsError(ValueError):
    """More items than one request of this endpoint accepts (batch 50, CAPI 1,000)."""
