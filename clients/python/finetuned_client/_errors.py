"""One exception hierarchy for every failed call, carrying the server's
RFC 9457 problem+json fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import httpx


class FinetunedError(Exception):
    """Base of every error this package raises."""


@dataclass(frozen=True)
class ErrorDetail:
    """One offending input: where it is (`path`) and what is wrong (`reason`)."""

    path: str
    reason: str


class APIError(FinetunedError):
    """The server answered with an error status (a problem+json document)."""

    status: int
    title: str
    detail: str
    type: str
    errors: list[ErrorDetail]
    request_id: Optional[str]
    response: Optional[httpx.Response]

    def __init__(
        self,
        status: int,
        title: str = "",
        detail: str = "",
        type: str = "about:blank",
        errors: Optional[list[ErrorDetail]] = None,
        request_id: Optional[str] = None,
        response: Optional[httpx.Response] = None,
    ) -> None:
        self.status, self.title, self.detail, self.type = status, title, detail, type
        self.errors = errors or []
        self.request_id, self.response = request_id, response
        extra = "; ".join(f"{e.path}: {e.reason}" for e in self.errors)
        super().__init__(f"{status} {title}: {detail}" + (f" ({extra})" if extra else ""))


class BadRequest(APIError): ...
class Unauthorized(APIError): ...
class Forbidden(APIError): ...
class NotFound(APIError): ...
class Conflict(APIError): ...
class PayloadTooLarge(APIError): ...
class UnsupportedMediaType(APIError): ...
class Unprocessable(APIError): ...
class RateLimited(APIError): ...
class ServerError(APIError): ...
class ServiceUnavailable(ServerError): ...
class InsufficientStorage(ServerError): ...


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: PayloadTooLarge, 415: UnsupportedMediaType, 422: Unprocessable, 429: RateLimited,
    503: ServiceUnavailable, 507: InsufficientStorage,
}


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response, filled from its problem document."""
    body: Any = None
    try:
        body = response.json()
    except ValueError:
        pass
    if not isinstance(body, dict):
        body = {"detail": response.text[:500]}
    errors = [
        ErrorDetail(str(e.get("path", "")), str(e.get("reason", "")))
        for e in body.get("errors") or []
        if isinstance(e, dict)
    ]
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(
        status=status,
        title=str(body.get("title", response.reason_phrase)),
        detail=str(body.get("detail", "")),
        type=str(body.get("type", "about:blank")),
        errors=errors,
        request_id=response.headers.get("x-request-id"),
        response=response,
    )
