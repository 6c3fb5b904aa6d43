"""Device Integrator (device-facing endpoints, pipeline) and Cloud Integrator (forwarders)."""
