"""Device Locator: cell-tower and GPS positions, geofences -> LOCATION/GEOFENCE events."""
