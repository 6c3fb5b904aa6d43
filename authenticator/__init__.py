"""Device Authenticator: the SIM registry (lookup on the hot path, management via API/CLI)."""
