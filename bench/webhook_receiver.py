"""HTTPS webhook receiver for bench/webhook.py (its own process, uvloop, keep-alive).

    webhook_receiver.py PORT CERT KEY

POST anything: 200 (or 503 while paused); records arrival time minus the envelope's
`received` (same host clock) per event. GET /stats -> {count, p50_ms, p99_ms, first, last}
since the last POST /reset; POST /pause, POST /resume.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time

from aiohttp import web


def main() -> None:
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    state: dict[str, object] = {"paused": False}
    lat: list[float] = []
    times: list[float] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        if state["paused"]:
            return web.Response(status=503)
        now = time.time()
        received = json.loads(body).get("received")
        if received is not None:
            lat.append(now * 1000 - int(received))
        times.append(now)
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        s = sorted(lat)

        def pct(p: float) -> float | None:
            return s[min(len(s) - 1, int(p * len(s)))] if s else None

        return web.json_response({"count": len(times), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                                  "first": times[0] if times else None,
                                  "last": times[-1] if times else None})

    async def reset(request: web.Request) -> web.Response:
        lat.clear()
        times.clear()
        return web.Response(text="ok")

    async def pause(request: web.Request) -> web.Response:
        state["paused"] = request.path.endswith("pause")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_post("/pause", pause)
    app.router.add_post("/resume", pause)
    app.router.add_post("/{tail:.*}", hook)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx, backlog=1024).start()
        print(f"receiver ready port={port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
