"""One error taxonomy: each kind names its CoAP code, HTTP status and retryability once.

Endpoints and the HTTP API translate `SimwireError` at exactly one boundary each.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class _Kind:
    http_status: int
    status_text: str
    coap_code: int  # (class << 5) | detail
    retryable: bool


def _coap(cls: int, detail: int) -> int:
    return (cls << 5) | detail


class ErrorKind(enum.Enum):
    BAD_REQUEST = _Kind(400, "Bad Request", _coap(4, 0), False)
    UNAUTHORIZED = _Kind(401, "Unauthorized", _coap(4, 1), False)
    FORBIDDEN = _Kind(403, "Forbidden", _coap(4, 3), False)
    NOT_FOUND = _Kind(404, "Not Found", _coap(4, 4), False)
    METHOD_NOT_ALLOWED = _Kind(405, "Method Not Allowed", _coap(4, 5), False)
    CONFLICT = _Kind(409, "Conflict", _coap(4, 9), False)
    TOO_LARGE = _Kind(413, "Payload Too Large", _coap(4, 13), False)
    UNSUPPORTED_MEDIA = _Kind(415, "Unsupported Media Type", _coap(4, 15), False)
    UNPROCESSABLE = _Kind(422, "Unprocessable Entity", _coap(4, 0), False)
    OVERLOADED = _Kind(503, "Service Unavailable", _coap(5, 3), True)
    INTERNAL = _Kind(500, "Server Error", _coap(5, 0), True)

    @property
    def http_status(self) -> int:
        return self.value.http_status

    @property
    def coap_code(self) -> int:
        return self.value.coap_code

    @property
    def retryable(self) -> bool:
        return self.value.retryable


class SimwireError(Exception):
    """An error with a kind; `errors` become the 1NCE body's `errors` list."""

    def __init__(self, kind: ErrorKind, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.errors = errors if errors is not None else [{"message": message}]

    def to_body(self) -> dict[str, Any]:
        return error_body(self.kind, self.errors)


def error_body(kind: ErrorKind, errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The 1NCE OS error body: `{statusCode, statusText, errors}`."""
    return {"statusCode": kind.http_status, "statusText": kind.value.status_text, "errors": errors}


class BadRequest(SimwireError):
    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(ErrorKind.BAD_REQUEST, message, errors)


class Unauthorized(SimwireError):
    def __init__(self, message: str = "Unauthorized"):
        super().__init__(ErrorKind.UNAUTHORIZED, message)


class Forbidden(SimwireError):
    def __init__(self, message: str = "Forbidden"):
        super().__init__(ErrorKind.FORBIDDEN, message)


class NotFound(SimwireError):
    def __init__(self, message: str = "Not Found"):
        super().__init__(ErrorKind.NOT_FOUND, message)


class Conflict(SimwireError):
    def __init__(self, message: str):
        super().__init__(ErrorKind.CONFLICT, message)


class Unprocessable(SimwireError):
    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(ErrorKind.UNPROCESSABLE, "validation failed", errors)


class Problems:
    """Collects every validation problem of an API body, then raises them together (422)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, prop: str, message: str, **extra: Any) -> None:
        self.items.append({"property": prop, "message": message, **extra})

    def raise_any(self) -> None:
        if self.items:
            raise Unprocessable(self.items)
