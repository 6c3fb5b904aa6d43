"""API authentication: OAuth2 client-credentials tokens, hashed client secrets, roles.

`TokenService` is used by simwire.http (the `/oauth/token` route and the bearer-token
middleware) and by simwire.app (first admin client). Tokens are HS256 JWTs signed with a
key kept in the store, so they survive restarts and are valid on every worker. Secrets are
stored as scrypt hashes and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

from simwire.clock import Clock
from simwire.errors import Unauthorized
from simwire.model import DEFAULT_ORG, ApiClient
from simwire.ports import ClientRepository

ROLES = ("viewer", "operator", "admin")
"""Ordered by power: viewer reads, operator also writes, admin also manages clients."""
TOKEN_TTL_S = 3600
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_secret(secret: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt$" + _b64(salt) + "$" + _b64(digest)


def verify_secret(secret: str, stored: str) -> bool:
    try:
        scheme, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    got = hashlib.scrypt(secret.encode(), salt=_unb64(salt), dklen=32, **_SCRYPT)
    return hmac.compare_digest(got, _unb64(digest))


def role_allows(have: str, need: str) -> bool:
    return have in ROLES and ROLES.index(have) >= ROLES.index(need)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling the API: set on the request by the auth middleware."""

    client_id: str
    org: str
    role: str


class TokenService:
    def __init__(self, clients: ClientRepository, clock: Clock, signing_key: bytes) -> None:
        self._clients = clients
        self._clock = clock
        self._key = signing_key

    @classmethod
    async def create(cls, clients: ClientRepository, clock: Clock) -> TokenService:
        key = await clients.get_or_create_meta("token_signing_key", secrets.token_hex(32))
        return cls(clients, clock, bytes.fromhex(key))

    async def issue(self, client_id: str, secret: str) -> tuple[str, ApiClient]:
        client = await self._clients.get_client(client_id)
        if client is None:
            verify_secret(secret, hash_secret("x"))  # same cost whether or not it exists
            raise Unauthorized("invalid client credentials")
        if not verify_secret(secret, client.secret_hash):
            raise Unauthorized("invalid client credentials")
        now = self._clock.now_ms() // 1000
        claims = {
            "sub": client.client_id, "org": client.org, "role": client.role,
            "iat": now, "exp": now + TOKEN_TTL_S, "jti": secrets.token_hex(8),
        }
        return self._sign(claims), client

    def verify(self, token: str) -> Principal:
        try:
            head, body, sig = token.split(".")
            expected = hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(sig)):
                raise ValueError("bad signature")
            if json.loads(_unb64(head)) != {"alg": "HS256", "typ": "JWT"}:
                raise ValueError("bad header")
            claims = json.loads(_unb64(body))
        except (ValueError, TypeError) as exc:
            raise Unauthorized("invalid token") from exc
        if not isinstance(claims, dict) or claims.get("exp", 0) <= self._clock.now_ms() // 1000:
            raise Unauthorized("token expired")
        return Principal(str(claims["sub"]), str(claims["org"]), str(claims["role"]))

    def _sign(self, claims: dict[str, Any]) -> str:
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        sig = hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{_b64(sig)}"

    async def ensure_admin(
        self, client_id: str | None, secret: str | None
    ) -> tuple[str, str] | None:
        """On a new store, create the first admin client (from env, else generated).

        Returns (client_id, secret) when a secret was generated, for the CLI to print once.
        """
        if await self._clients.count_clients() > 0:
            return None
        generated = None
        if not client_id or not secret:
            client_id = client_id or "admin"
            secret = secrets.token_urlsafe(24)
            generated = (client_id, secret)
        await self._clients.create_client(
            ApiClient(client_id, hash_secret(secret), "admin", DEFAULT_ORG, self._clock.now_ms())
        )
        return generated


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
