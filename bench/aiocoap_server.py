"""Baseline CoAP server for bench/ingest.py: aiocoap with one trivial POST resource.

    python bench/aiocoap_server.py --host 127.0.0.1 --port 5683 [--path telemetry]

POST on the path answers 2.04 Changed (empty payload) without doing any work. Prints
"aiocoap ready <port>" on stdout once bound; exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiocoap
import aiocoap.resource as resource


class Telemetry(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED)


async def main(host: str, port: int, path: str) -> None:
    root = resource.Site()
    root.add_resource([seg for seg in path.strip("/").split("/") if seg], Telemetry())
    ctx = await aiocoap.Context.create_server_context(
        root, bind=(host, port), transports=["udp6"]
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"aiocoap ready {port}", flush=True)
    try:
        await stop.wait()
    finally:
        await ctx.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5683)
    ap.add_argument("--path", default="telemetry")
    a = ap.parse_args()
    asyncio.run(main(a.host, a.port, a.path))
