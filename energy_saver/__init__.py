"""Energy Saver: BCL templates translate compact binary UDP/CoAP payloads into JSON.

`bcl` validates a template into an AST, `codec` compiles it (decode on the hot path, encode
for devices and tests), `translator` is the pipeline's step, `service`/`api` manage the
templates under /v1/optimize.
"""
