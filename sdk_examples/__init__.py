"""Device-side examples: what 1NCE SDK / blueprint firmware sends, in plain Python (stdlib)."""
