"""Integrations management: validation, persistence, and telling the dispatcher.

Called by the integrations API (`integrator.forwarders.api`). Tenants only ever see their
organisation's integrations (another organisation's id answers 404).
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

from integrator.forwarders.dispatcher import Dispatcher
from simwire.clock import Clock
from simwire.errors import Conflict, NotFound, Problems
from simwire.model import (
    ENVELOPE_VERSION,
    EventType,
    Integration,
    IntegrationType,
    iso_ms,
)
from simwire.ports import IntegrationRepository, Outbox, Page

NAME_MAX = 128
MAX_HEADERS = 50
HEADER_VALUE_MAX = 4096
URL_MAX = 2048
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_RESERVED_HEADERS = frozenset({
    "content-type", "content-length", "host", "transfer-encoding", "connection",
    "idempotency-key", "user-agent",
})
SUBSCRIBABLE = tuple(t.value for t in EventType if t is not EventType.TEST_MESSAGE)
AWS_TRANSPORTS = ("MQTT", "HTTPS")
AWS_SECRETS = ("privateKey", "secretAccessKey", "sessionToken")
_AWS_STRINGS = (
    "region", "endpoint", "certificate", "privateKey", "caCertificate", "clientId",
    "accessKeyId", "secretAccessKey", "sessionToken", "roleArn", "externalId",
    "endpointUrl", "stsEndpointUrl", "iotEndpointUrl",
)

EVENT_DESCRIPTIONS = {
    "TELEMETRY_DATA": "A device message (UDP, CoAP, LwM2M), translated or raw",
    "LIFECYCLE": "A device registered for the first time",
    "ERROR": "A device, translation, location or integration error",
    "GEOFENCE": "A device entered or left a geofence",
    "LOCATION": "A new device position (GPS or cell tower)",
    "TEST_MESSAGE": "Sent by the test and restart endpoints of an integration",
}


@dataclass(frozen=True, slots=True)
class Limits:
    allow_http: bool = False
    """Plain-HTTP webhook URLs (development only)."""


class _Repo(IntegrationRepository, Outbox, Protocol):
    pass


class Integrations:
    def __init__(
        self, repo: _Repo, dispatcher: Dispatcher, clock: Clock, limits: Limits | None = None,
    ) -> None:
        self._repo = repo
        self._dispatcher = dispatcher
        self._clock = clock
        self._limits = limits or Limits()

    # -- queries ---------------------------------------------------------------------------

    async def get(self, integration_id: str, org: str) -> Integration:
        i = await self._repo.get_integration(integration_id)
        if i is None or i.org != org:
            raise NotFound(f"integration {integration_id} not found")
        return i

    async def list(self, org: str, page: int, page_size: int) -> Page[Integration]:
        return await self._repo.list_integrations(org, page, page_size)

    async def queue_depth(self, integration: Integration) -> int:
        return await self._repo.outbox_depth(integration.id)

    # -- commands --------------------------------------------------------------------------

    async def create_webhook(self, body: Any, org: str) -> Integration:
        errors = Problems()
        body = _object(body, errors)
        name, types, json_payload = _common(body, errors, required=True)
        url = _url(body.get("url"), errors, self._limits.allow_http, required=True)
        headers = _headers(body.get("headers", {}), errors)
        errors.raise_any()
        await self._unique_url(org, str(url), None)
        return await self._create(org, IntegrationType.WEBHOOK, str(name), types or (),
                                  bool(json_payload), {"url": url, "headers": headers or {}})

    async def create_aws(self, body: Any, org: str) -> Integration:
        errors = Problems()
        body = _object(body, errors)
        name, types, json_payload = _common(body, errors, required=True)
        settings = _aws_settings(body, errors, {})
        errors.raise_any()
        return await self._create(org, IntegrationType.AWS, str(name), types or (),
                                  bool(json_payload), settings)

    async def update(self, integration_id: str, body: Any, org: str,
                     only: IntegrationType | None = None) -> tuple[Integration, str | None]:
        """PATCH: the given fields change. Returns the integration and, when
        `rotateSigningSecret` was true, the new secret (shown once)."""
        current = await self.get(integration_id, org)
        if only is not None and current.type is not only:
            raise NotFound(f"{only.value.lower()} integration {integration_id} not found")
        errors = Problems()
        body = _object(body, errors)
        name, types, json_payload = _common(body, errors, required=False)
        settings = dict(current.settings)
        if current.type is IntegrationType.WEBHOOK:
            if "url" in body:
                settings["url"] = _url(body["url"], errors, self._limits.allow_http,
                                       required=True)
            if "headers" in body:
                settings["headers"] = _headers(body["headers"], errors)
        else:
            settings = _aws_settings(body, errors, settings)
        rotate = body.get("rotateSigningSecret", False)
        if not isinstance(rotate, bool):
            errors.add("rotateSigningSecret", "must be a boolean")
        errors.raise_any()
        if current.type is IntegrationType.WEBHOOK and settings["url"] != current.settings["url"]:
            await self._unique_url(org, settings["url"], current.id)
        secret = secrets.token_urlsafe(32) if rotate else current.secret
        changed = replace(
            current,
            name=current.name if name is None else name,
            event_types=current.event_types if types is None else types,
            json_payload=current.json_payload if json_payload is None else json_payload,
            settings=settings, secret=secret, updated_ms=self._clock.now_ms(),
        )
        stored = await self._repo.update_integration(changed)
        if stored is None:
            raise NotFound(f"integration {integration_id} not found")
        await self._dispatcher.changed(stored)
        return stored, (secret if rotate else None)

    async def delete(self, integration_id: str, org: str) -> None:
        await self.get(integration_id, org)
        await self._dispatcher.removed(integration_id)
        await self._repo.delete_integration(integration_id)

    async def test(self, integration_id: str, org: str) -> tuple[bool, str]:
        return await self._dispatcher.test(await self.get(integration_id, org))

    async def restart(self, integration_id: str, org: str) -> tuple[bool, str, Integration]:
        return await self._dispatcher.restart(await self.get(integration_id, org))

    async def _create(
        self, org: str, type_: IntegrationType, name: str, types: tuple[str, ...],
        json_payload: bool, settings: dict[str, Any],
    ) -> Integration:
        now = self._clock.now_ms()
        integration = Integration(
            id=str(uuid.uuid4()), org=org, type=type_, name=name, event_types=types,
            json_payload=json_payload, settings=settings, secret=secrets.token_urlsafe(32),
            created_ms=now, updated_ms=now,
        )
        await self._repo.create_integration(integration)
        await self._dispatcher.changed(integration)
        return integration

    async def _unique_url(self, org: str, url: str, own_id: str | None) -> None:
        page, amount = 1, 1
        while page <= amount:
            listing = await self._repo.list_integrations(org, page, 100)
            for other in listing.items:
                if other.id != own_id and other.settings.get("url") == url:
                    raise Conflict(f"integration {other.id} already delivers to this URL")
            amount = listing.page_amount
            page += 1


# -- rendering ---------------------------------------------------------------------------


def to_api(i: Integration, *, queue_depth: int | None = None,
           signing_secret: str | None = None) -> dict[str, Any]:
    """The API shape (1NCE fields, secrets of AWS settings redacted)."""
    out: dict[str, Any] = {
        "id": i.id, "name": i.name, "type": i.type.value, "state": i.state.value,
        "eventTypes": [{"type": t, "version": ENVELOPE_VERSION} for t in i.event_types],
        "jsonPayloadEnabled": i.json_payload,
        "createdTime": iso_ms(i.created_ms), "updatedTime": iso_ms(i.updated_ms),
        "lastSuccessfulMessageDelivery": (
            iso_ms(i.first_delivery_ms) if i.first_delivery_ms is not None else None),
        "error": i.error,
    }
    if i.type is IntegrationType.WEBHOOK:
        out["url"] = i.settings["url"]
        out["headers"] = i.settings.get("headers", {})
    else:
        aws = {k: ("********" if k in AWS_SECRETS and v else v)
               for k, v in i.settings.items()}
        out.update(aws)
    if queue_depth is not None:
        out["queueDepth"] = queue_depth
    if signing_secret is not None:
        out["signingSecret"] = signing_secret
    return out


def event_types() -> dict[str, Any]:
    """`GET /v1/integrate/clouds/eventTypes`."""
    return {"eventTypes": [
        {"name": t.value, "description": EVENT_DESCRIPTIONS[t.value],
         "version": ENVELOPE_VERSION, "payload": _EXAMPLES[t.value]}
        for t in EventType
    ]}


_DEVICE = {"iccid": "8988280666000002864", "imsi": "901405100002864", "ip": "10.0.0.1"}
_EXAMPLES: dict[str, dict[str, Any]] = {
    "TELEMETRY_DATA": {"id": "1-6393505d-67fa8489fb9c791fcddd43f0", "type": "TELEMETRY_DATA",
                       "version": ENVELOPE_VERSION, "received": "1670598749915",
                       "device": _DEVICE, "source": "COAP",
                       "payload": {"type": "STRING", "value": "aGVsbG8=",
                                   "encoding": "base64", "topic": "sensors/temp"}},
    "LIFECYCLE": {"type": "LIFECYCLE", "device": _DEVICE,
                  "lifecycle": {"type": "DEVICE_FIRST_TIME_REGISTERED",
                                "message": "Device registered"}},
    "ERROR": {"type": "ERROR", "error": {"id": "1-6393505d-67fa8489fb9c791fcddd43f0",
                                         "type": "INTEGRATION",
                                         "message": "CloudIntegrator[IntegrationDisabled]",
                                         "description": "...", "payloadExists": False}},
    "GEOFENCE": {"type": "GEOFENCE", "device": _DEVICE,
                 "geofence": {"id": "g1", "name": "depot", "coordinates": ["13.4", "52.5"],
                              "source": "GPS", "type": "ENTER"}},
    "LOCATION": {"type": "LOCATION", "device": _DEVICE,
                 "location": {"source": "GPS", "coordinates": ["13.4", "52.5"]}},
    "TEST_MESSAGE": {"type": "TEST_MESSAGE", "integration": {"id": "...", "name": "..."}},
}


# -- validation --------------------------------------------------------------------------


def _object(body: Any, errors: Problems) -> dict[str, Any]:
    if not isinstance(body, dict):
        errors.add("body", "must be a JSON object")
        errors.raise_any()
    return body  # type: ignore[no-any-return]


def _common(
    body: dict[str, Any], errors: Problems, *, required: bool
) -> tuple[str | None, tuple[str, ...] | None, bool | None]:
    name = body.get("name")
    if (name is not None or required) and (
        not isinstance(name, str) or not 1 <= len(name.strip()) <= NAME_MAX
    ):
        errors.add("name", f"must be a string of 1 to {NAME_MAX} characters")
        name = None
    types: tuple[str, ...] | None = None
    raw = body.get("eventTypes")
    if raw is not None or required:
        if not isinstance(raw, list) or not raw:
            errors.add("eventTypes", "must be a non-empty list of {type, version}")
        else:
            seen: list[str] = []
            for n, entry in enumerate(raw):
                prop = f"eventTypes[{n}]"
                t = entry.get("type") if isinstance(entry, dict) else None
                if t not in SUBSCRIBABLE:
                    errors.add(f"{prop}.type", f"must be one of {', '.join(SUBSCRIBABLE)}")
                    continue
                version = entry.get("version", ENVELOPE_VERSION)
                if version != ENVELOPE_VERSION:
                    errors.add(f"{prop}.version", f"only {ENVELOPE_VERSION} is supported")
                if t not in seen:
                    seen.append(t)
            types = tuple(seen)
    json_payload = body.get("jsonPayloadEnabled")
    if json_payload is None and required:
        json_payload = False
    if json_payload is not None and not isinstance(json_payload, bool):
        errors.add("jsonPayloadEnabled", "must be a boolean")
        json_payload = None
    return (name.strip() if isinstance(name, str) else None), types, json_payload


def _url(raw: Any, errors: Problems, allow_http: bool, *, required: bool) -> str | None:
    if raw is None and not required:
        return None
    if not isinstance(raw, str) or not raw or len(raw) > URL_MAX:
        errors.add("url", f"must be an https URL of at most {URL_MAX} characters")
        return None
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        errors.add("url", "is not a valid URL")
        return None
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        errors.add("url", "must use https" + ("" if allow_http else
                   " (plain http needs webhook_allow_http, for development only)"))
    elif not parts.hostname:
        errors.add("url", "must name a host")
    elif any(c.isspace() for c in raw):
        errors.add("url", "must not contain whitespace")
    return raw


def _headers(raw: Any, errors: Problems) -> dict[str, str] | None:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.add("headers", "must be an object of string values")
        return None
    if len(raw) > MAX_HEADERS:
        errors.add("headers", f"at most {MAX_HEADERS} headers")
    out: dict[str, str] = {}
    for key, value in raw.items():
        prop = f"headers.{key}"
        if not _TOKEN.match(key):
            errors.add(prop, "is not a valid header name")
        elif key.lower() in _RESERVED_HEADERS or key.lower().startswith("x-simwire-"):
            errors.add(prop, "is set by Simwire and cannot be overridden")
        elif not isinstance(value, str):
            errors.add(prop, "must be a string (no nesting)")
        elif len(value) > HEADER_VALUE_MAX or any(c in value for c in "\r\n\x00"):
            errors.add(prop, f"must be one line of at most {HEADER_VALUE_MAX} characters")
        else:
            out[key] = value
    return out


def _aws_settings(body: dict[str, Any], errors: Problems, current: dict[str, Any]
                  ) -> dict[str, Any]:
    """Validate the AWS fields present in `body` over `current` (creation: `{}`)."""
    s = dict(current)
    for key in _AWS_STRINGS:
        if key in body:
            value = body[key]
            if value is not None and (not isinstance(value, str) or not value):
                errors.add(key, "must be a non-empty string or null")
            elif value is None:
                s.pop(key, None)
            else:
                s[key] = value
    if "transport" in body:
        s["transport"] = body["transport"]
    s.setdefault("transport", "MQTT")
    for key, lo, hi in (("port", 1, 65535), ("connections", 1, 16), ("qos", 0, 1)):
        if key in body:
            value = body[key]
            if type(value) is not int or not lo <= value <= hi:
                errors.add(key, f"must be an integer from {lo} to {hi}")
            else:
                s[key] = value
    if s["transport"] not in AWS_TRANSPORTS:
        errors.add("transport", "must be MQTT or HTTPS")
        return s
    if "region" not in s:
        errors.add("region", "is required")
    if s["transport"] == "MQTT":
        for key in ("endpoint", "certificate", "privateKey"):
            if key not in s:
                errors.add(key, "is required for the MQTT transport")
        for key in ("certificate", "caCertificate"):
            if key in s and "BEGIN CERTIFICATE" not in s[key]:
                errors.add(key, "must be a PEM certificate")
        if "privateKey" in s and "PRIVATE KEY" not in s["privateKey"]:
            errors.add("privateKey", "must be a PEM private key")
    else:
        if ("accessKeyId" in s) != ("secretAccessKey" in s):
            errors.add("secretAccessKey", "accessKeyId and secretAccessKey go together")
        if "externalId" in s and "roleArn" not in s:
            errors.add("externalId", "needs roleArn")
    return s
