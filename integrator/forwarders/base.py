"""What every sink (webhook, AWS IoT MQTT, AWS IoT HTTPS, plugins) implements.

The dispatcher (`integrator.forwarders.dispatcher`) reads an integration's outbox, turns each
item into a `Delivery` and calls `Sink.deliver`; a sink raises `DeliveryError` when the
receiver did not take the event (the dispatcher retries on the integration's schedule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event for one integration, as the sink sends it."""

    event_id: str
    """The envelope's `id`: the idempotency key receivers deduplicate on."""
    type: str
    """Envelope type: TELEMETRY_DATA, LIFECYCLE, ERROR, GEOFENCE, LOCATION, TEST_MESSAGE."""
    iccid: str | None
    source: str | None
    """UDP, COAP or LWM2M for TELEMETRY_DATA, else None."""
    topic: str | None
    """The CoAP `t=` topic, if any."""
    body: bytes
    """The JSON envelope, exactly as sent."""


class DeliveryError(Exception):
    """The receiver did not take the event (refused, failed, timed out, unreachable).

    The message is shown to users (integration `error`, admin logs): it never contains
    secrets."""


class Sink(Protocol):
    async def deliver(self, delivery: Delivery) -> None:
        """Send one event; return once the receiver took it, raise DeliveryError if not.
        Called concurrently (for different devices) up to the integration's concurrency."""
        ...

    async def close(self) -> None:
        """Release connections; no `deliver` is running or follows."""
        ...
