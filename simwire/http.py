"""The management API's aiohttp application: auth, the 1NCE error boundary, shared helpers.

simwire.app builds it with `build_api(...)`; each service contributes a route table
(authenticator.api, inspector.api). Every `/v1/...` handler must be wrapped by `requires`
(the middleware refuses a `/v1` route without a declared role: fail closed).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from simwire.auth import Principal, TokenService, role_allows
from simwire.errors import (
    BadRequest,
    ErrorKind,
    Forbidden,
    SimwireError,
    Unauthorized,
    error_body,
)
from simwire.metrics import Metrics
from simwire.ports import Page

T = TypeVar("T")

log = logging.getLogger("simwire.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PRINCIPAL = web.RequestKey("simwire.principal", Principal)
MAX_BODY = 64 * 1024
"""Request bodies (1NCE's limit); routes that take bulk lists pass `read_json(limit=)`."""
MAX_BULK_BODY = 1024 * 1024
_HTTP_KINDS = {k.http_status: k for k in ErrorKind}


def requires(role: str) -> Callable[[Handler], Handler]:
    """Declare the least role a route needs (viewer, operator, admin)."""

    def mark(handler: Handler) -> Handler:
        handler.required_role = role  # type: ignore[attr-defined]
        return handler

    return mark


def principal(request: web.Request) -> Principal:
    p: Principal = request[PRINCIPAL]
    return p


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, separators=(",", ":"), ensure_ascii=False), status=status,
        content_type="application/json",
    )


def page_response(page: Page[T], render: Callable[[T], Any]) -> web.Response:
    """A page-number page as 1NCE lists answer it: `{items, page, pageAmount}`."""
    return json_response({"items": [render(i) for i in page.items], "page": page.page,
                          "pageAmount": page.page_amount})


def error_response(kind: ErrorKind, errors: list[dict[str, Any]]) -> web.Response:
    return json_response(error_body(kind, errors), kind.http_status)


async def read_json(request: web.Request, limit: int = MAX_BODY) -> Any:
    if request.content_type not in ("application/json", ""):
        raise SimwireError(ErrorKind.UNSUPPORTED_MEDIA, "Content-Type must be application/json")
    if request.content_length is not None and request.content_length > limit:
        raise SimwireError(ErrorKind.TOO_LARGE, f"body larger than {limit} bytes")
    try:
        raw = await request.read()  # at most MAX_BULK_BODY (aiohttp answers 413 beyond)
        if len(raw) > limit:
            raise SimwireError(ErrorKind.TOO_LARGE, f"body larger than {limit} bytes")
        return json.loads(raw)
    except web.HTTPRequestEntityTooLarge:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("body is not valid JSON", [{"message": f"invalid JSON: {exc}"}]) from exc


def page_params(request: web.Request, max_page_size: int = 100) -> tuple[int, int]:
    """`page` (from 1) and `pageSize` (default 10) of a 1NCE list request; 400 otherwise."""
    return (query_int(request, "page", 1, 1, 1_000_000),
            query_int(request, "pageSize", 10, 1, max_page_size))


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be an integer from {lo} to {hi}",
                         [{"property": name, "message": f"must be an integer from {lo} to {hi}"}])
    return value


def parse_time(name: str, raw: str) -> tuple[int, int]:
    """ISO 8601 -> (epoch ms, UTC offset in minutes); naive times are UTC."""
    try:
        dt = datetime.fromisoformat(raw.replace(" ", "+") if raw.count(" ") == 1 else raw)
    except ValueError as exc:
        raise BadRequest(f"{name} is not an ISO 8601 date-time",
                         [{"property": name, "message": "must be an ISO 8601 date-time"}]) from exc
    offset = dt.utcoffset()
    if offset is None:
        dt = dt.replace(tzinfo=UTC)
        offset_min = 0
    else:
        offset_min = int(offset.total_seconds() // 60)
    return int(dt.timestamp() * 1000), offset_min


def _basic_credentials(request: web.Request) -> tuple[str, str]:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        raise Unauthorized("HTTP Basic client credentials required")
    try:
        user, sep, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise Unauthorized("malformed Basic credentials") from exc
    if not sep or not user:
        raise Unauthorized("malformed Basic credentials")
    return user, secret


class RateLimiter:
    """A token bucket per key (client IP): `/oauth/token` allows 600/min like 1NCE."""

    def __init__(self, per_minute: int, max_keys: int = 100_000) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(per_minute)
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        if len(self._buckets) >= self._max_keys:
            self._buckets.clear()
        self._buckets[key] = (tokens - 1, now)
        return True


def build_api(
    tokens: TokenService, metrics: Metrics, route_tables: list[web.RouteTableDef],
    health: Callable[[], Awaitable[dict[str, Any]]],
) -> web.Application:
    @web.middleware
    async def boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
        """The one place errors become HTTP responses (1NCE error body)."""
        try:
            resp = await _authorize(request, handler)
        except SimwireError as exc:
            resp = json_response(exc.to_body(), exc.kind.http_status)
            if exc.kind is ErrorKind.UNAUTHORIZED:
                resp.headers["WWW-Authenticate"] = "Bearer"
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = _HTTP_KINDS.get(exc.status)
            if kind is None:
                raise
            resp = error_response(kind, [{"message": exc.reason}])
        except Exception:
            log.exception("unhandled API error on %s %s", request.method, request.path)
            resp = error_response(ErrorKind.INTERNAL, [{"message": "internal error"}])
        metrics.api_requests.labels(request.method, str(resp.status)).inc()
        return resp

    async def _authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            need = getattr(handler, "required_role", None)
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthorized("Bearer token required")
            who = tokens.verify(token.strip())
            if request.match_info.http_exception is not None:
                raise request.match_info.http_exception  # 404/405, after authentication
            if need is None or not role_allows(who.role, need):
                raise Forbidden(f"role {who.role} may not call this route")
            request[PRINCIPAL] = who
        return await handler(request)

    oauth_limit = RateLimiter(600)

    async def token(request: web.Request) -> web.Response:
        if not oauth_limit.allow(request.remote or "?"):
            return json_response({"statusCode": 429, "statusText": "Too Many Requests",
                                  "errors": [{"message": "rate limit exceeded"}]}, 429)
        client_id, secret = _basic_credentials(request)
        body = await read_json(request)
        if not isinstance(body, dict) or body.get("grant_type") != "client_credentials":
            raise BadRequest("grant_type must be client_credentials",
                             [{"property": "grant_type",
                               "message": "must be client_credentials"}])
        access, client = await tokens.issue(client_id, secret)
        return json_response({
            "status_code": 200, "access_token": access, "token_type": "bearer",
            "expires_in": 3600, "userId": client.client_id, "scope": "all",
        })

    async def healthz(request: web.Request) -> web.Response:
        return json_response(await health())

    async def metrics_route(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application(middlewares=[boundary], client_max_size=MAX_BULK_BODY)
    app.router.add_post("/oauth/token", token)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_route)
    for table in route_tables:
        app.add_routes(table)
    return app
