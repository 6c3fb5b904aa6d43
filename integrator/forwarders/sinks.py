"""Builds the sink of an integration (simwire.app hands `build` to the dispatcher).

AWS IoT Core topics are 1NCE's: TELEMETRY_DATA -> `{iccid}/messages` (UDP, LwM2M),
`{iccid}/{t}` (CoAP with a `t=` topic) or `{iccid}` (CoAP without); `lifecycle`, `error`,
`geofence`, `location`; TEST_MESSAGE -> `integration-status`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from integrator.forwarders.base import Delivery, DeliveryError, Sink
from integrator.forwarders.webhook import WebhookSink
from simwire.clock import Clock
from simwire.model import Integration, IntegrationType

_FIXED_TOPICS = {
    "LIFECYCLE": "lifecycle", "ERROR": "error", "GEOFENCE": "geofence",
    "LOCATION": "location", "TEST_MESSAGE": "integration-status",
}


def aws_topic(d: Delivery) -> str:
    fixed = _FIXED_TOPICS.get(d.type)
    if fixed is not None:
        return fixed
    iccid = d.iccid or "unknown"
    if d.source == "COAP":
        return f"{iccid}/{d.topic}" if d.topic else iccid
    return f"{iccid}/messages"


class _Publisher(Protocol):
    async def start(self) -> None: ...

    async def publish(self, topic: str, payload: bytes) -> None: ...

    async def close(self) -> None: ...


class AwsSink:
    """Publishes each event on its 1NCE topic, through MQTT or HTTPS (see `publisher`).
    Connects on the first delivery; a failed connect is a failed delivery (retried)."""

    def __init__(self, make: Callable[[], _Publisher]) -> None:
        self._make = make
        self._publisher: _Publisher | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> _Publisher:
        async with self._lock:
            if self._publisher is None:
                publisher = self._make()
                try:
                    await publisher.start()
                except BaseException:
                    await publisher.close()
                    raise
                self._publisher = publisher
            return self._publisher

    async def deliver(self, delivery: Delivery) -> None:
        publisher = self._publisher or await self._ready()
        await publisher.publish(aws_topic(delivery), delivery.body)

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None


@dataclass(frozen=True, slots=True)
class SinkSettings:
    timeout_s: float = 20.0
    concurrency: int = 8
    ca_file: Path | None = None
    """Extra CA certificates trusted for webhooks (besides the system's)."""


class SinkFactory:
    """`build(integration)` -> a new sink for it (the dispatcher owns and closes it)."""

    def __init__(self, clock: Clock, settings: SinkSettings | None = None) -> None:
        self._clock = clock
        self._settings = settings or SinkSettings()
        self._ssl = ssl.create_default_context()
        if self._settings.ca_file is not None:
            self._ssl.load_verify_locations(cafile=str(self._settings.ca_file))

    def build(self, integration: Integration) -> Sink:
        s = integration.settings
        if integration.type is IntegrationType.WEBHOOK:
            return WebhookSink(
                s["url"], s.get("headers", {}), integration.secret, self._clock,
                ssl_context=self._ssl, timeout_s=self._settings.timeout_s,
                concurrency=self._settings.concurrency,
            )
        return AwsSink(lambda: self._aws_publisher(integration))

    def _aws_publisher(self, integration: Integration) -> _Publisher:
        s: dict[str, Any] = integration.settings
        timeout = self._settings.timeout_s
        if s.get("transport", "MQTT") == "MQTT":
            from integrator.forwarders.mqtt import MqttPool

            return MqttPool(
                s["endpoint"], s.get("port", 8883), client_cert_pem=s["certificate"],
                client_key_pem=s["privateKey"], ca_pem=s.get("caCertificate"),
                client_id=s.get("clientId", f"simwire-{integration.id[:8]}"),
                connections=s.get("connections", 2), qos=s.get("qos", 1), timeout_s=timeout,
            )
        try:
            from integrator.forwarders.aws_https import IotDataPublisher
        except ImportError as exc:  # boto3 is the optional extra simwire[aws]
            raise DeliveryError("the HTTPS transport needs boto3: pip install "
                                "'simwire[aws]'") from exc
        return IotDataPublisher(
            region=s["region"], endpoint_url=s.get("endpointUrl") or (
                f"https://{s['endpoint']}" if "endpoint" in s else None),
            access_key_id=s.get("accessKeyId"), secret_access_key=s.get("secretAccessKey"),
            session_token=s.get("sessionToken"), role_arn=s.get("roleArn"),
            external_id=s.get("externalId"), sts_endpoint_url=s.get("stsEndpointUrl"),
            iot_endpoint_url=s.get("iotEndpointUrl"), qos=s.get("qos", 1), timeout_s=timeout,
            max_workers=self._settings.concurrency,
        )


