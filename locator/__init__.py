"""Device Locator: cell-tower and GPS positions, geofences -> LOCATION/GEOFENCE events."""

from __future__ import annotations

from simwire.model import DeviceIdentity


class NoLocator:
    """Implements `simwire.ports.PositionSink` until the Device Locator lands: positions
    decoded by Energy Saver templates are accepted and dropped."""

    def report_position(
        self, device: DeviceIdentity, lat: float, lon: float, received_ms: int,
    ) -> None:
        return None
