"""Device Inspector: history (7-day retention), device state, admin logs, query API."""
