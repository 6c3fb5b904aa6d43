"""Cloud Integrator: delivers the stored event stream to webhooks, AWS IoT Core and plugin
sinks, from the durable outbox the store fills in the same write as the events."""
