"""Webhook sink: one HTTPS POST of the JSON envelope per event.

Built by the dispatcher for each WEBHOOK integration, with its own connection pool
(`concurrency` kept-alive connections, so a slow receiver only slows its own integration).

Every request carries, besides the integration's custom headers (`:iccid:`, `:imsi:`,
`:ip:` placeholders substituted, as in the URL):

- `Content-Type: application/json`, `User-Agent: Simwire/<version>`;
- `Idempotency-Key` and `X-Simwire-Event-Id`: the event id (retries repeat it);
- `X-Simwire-Timestamp`: Unix seconds when the request was signed;
- `X-Simwire-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`
  (verification recipe: docs/integrations.md).

Any 2xx within the timeout is a delivery; anything else raises `DeliveryError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from integrator.forwarders.base import Delivery, DeliveryError
from simwire import __version__
from simwire.clock import Clock

PLACEHOLDER = re.compile(r":(iccid|imsi|ip):")
USER_AGENT = f"Simwire/{__version__}"
MAX_ERROR_BODY = 200


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Simwire-Signature` value for a request (receivers recompute and compare)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def substitute(template: str, device: Mapping[str, Any] | None, *, in_url: bool) -> str:
    """Replace `:iccid:`, `:imsi:`, `:ip:` by the device's values (`none` when missing);
    unknown placeholders stay as they are. Values are percent-encoded inside URLs."""

    def value(m: re.Match[str]) -> str:
        v = device.get(m.group(1)) if device else None
        text = str(v) if v else "none"
        return quote(text, safe="") if in_url else text

    return PLACEHOLDER.sub(value, template)


class WebhookSink:
    """Posts envelopes to one integration's URL."""

    def __init__(
        self, url: str, headers: Mapping[str, str], secret: str, clock: Clock, *,
        ssl_context: ssl.SSLContext | None, timeout_s: float = 20.0, concurrency: int = 8,
    ) -> None:
        self._url = url
        self._headers = dict(headers)
        self._secret = secret
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._templated = bool(PLACEHOLDER.search(url)) or any(
            PLACEHOLDER.search(v) for v in self._headers.values())
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=concurrency, ssl=ssl_context if ssl_context is not None else True,
                enable_cleanup_closed=True,
            ),
            timeout=self._timeout,
            headers={"User-Agent": USER_AGENT},
            auto_decompress=False,
        )

    async def deliver(self, delivery: Delivery) -> None:
        url, headers = self._url, self._headers
        if self._templated:
            device = json.loads(delivery.body).get("device")
            url = substitute(url, device, in_url=True)
            headers = {k: substitute(v, device, in_url=False) for k, v in headers.items()}
        timestamp = str(self._clock.now_ms() // 1000)
        headers = {
            **headers,
            "Content-Type": "application/json",
            "Idempotency-Key": delivery.event_id,
            "X-Simwire-Event-Id": delivery.event_id,
            "X-Simwire-Timestamp": timestamp,
            "X-Simwire-Signature": sign(self._secret, timestamp, delivery.body),
        }
        try:
            async with self._session.post(url, data=delivery.body, headers=headers,
                                          allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    await resp.read()
                    return
                text = (await resp.content.read(MAX_ERROR_BODY)).decode("utf-8", "replace")
                raise DeliveryError(f"HTTP {resp.status} {resp.reason or ''}".rstrip()
                                    + (f": {text.strip()}" if text.strip() else ""))
        except TimeoutError as exc:
            raise DeliveryError(f"no answer within {self._timeout_s:g} s") from exc
        except aiohttp.ClientSSLError as exc:
            raise DeliveryError(f"TLS error: {exc.__class__.__name__}: {_reason(exc)}") from exc
        except aiohttp.ClientError as exc:
            raise DeliveryError(f"{exc.__class__.__name__}: {_reason(exc)}") from exc
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            raise DeliveryError(f"{exc.__class__.__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._session.close()


def _reason(exc: BaseException) -> str:
    os_error = getattr(exc, "os_error", None)
    return str(os_error or exc)
