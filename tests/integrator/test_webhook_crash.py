"""kill -9 mid-delivery: every event ACKed to a device is delivered at least once after a
restart, each device's events in order (a real `simwire serve` process, real HTTPS)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiohttp

from integrator import coap
from tests.support.net import UdpClient
from tests.support.pki import make_pki
from tests.support.serve import clean_env, created, kill, start, stop, telemetry_webhook, token
from tests.support.simwire import eventually
from tests.support.webhook import receiver

ADMIN, SECRET = "crash-admin", "crash-admin-secret-0123456789"
DEVICES = 4
PER_DEVICE = 60


async def test_kill_9_mid_delivery_loses_nothing(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    env = clean_env(SIMWIRE_ADMIN_CLIENT_ID=ADMIN, SIMWIRE_ADMIN_CLIENT_SECRET=SECRET,
                    SIMWIRE_WEBHOOK_CA_FILE=str(pki.ca_cert), SIMWIRE_DELIVERY_CONCURRENCY="2")
    data = tmp_path / "data"
    async with receiver(pki) as hook, aiohttp.ClientSession() as http:
        hook.delay_s = 0.01  # slower than ingest: a backlog builds up in the outbox
        proc, ports, _ = await start(data, env)
        try:
            base = f"http://127.0.0.1:{ports['http']}"
            bearer = {"Authorization": f"Bearer {await token(http, ports['http'], ADMIN, SECRET)}"}
            for n in range(DEVICES):
                await created(http, f"{base}/v1/sims", bearer, {
                    "iccid": f"89882806660000002{n:02d}", "imsi": f"9014051000002{n:02d}",
                    "ip": f"127.0.0.{20 + n}"})
            await telemetry_webhook(http, base, bearer, "crash", hook.url)

            acked: dict[int, list[bytes]] = {n: [] for n in range(DEVICES)}

            async def device(n: int) -> None:
                link = await UdpClient.open(("127.0.0.1", ports["coap"]), f"127.0.0.{20 + n}")
                try:
                    for k in range(PER_DEVICE):
                        payload = f"{n}-{k}".encode()
                        reply = await link.request(coap.serialize(coap.Message(
                            coap.CON, coap.POST, k + 1, b"", [], payload)))
                        assert coap.parse(reply).code == coap.CHANGED
                        acked[n].append(payload)
                finally:
                    link.close()

            await asyncio.gather(*(device(n) for n in range(DEVICES)))
            await hook.wait_for(20, timeout=30)
        finally:
            await kill(proc)
        delivered_before = len(hook.accepted)
        assert delivered_before < DEVICES * PER_DEVICE, "the kill came too late to test much"

        proc, ports, _ = await start(data, env)
        try:
            expected = {p for sent in acked.values() for p in sent}

            def received() -> set[bytes]:
                return {base64.b64decode(r.json["payload"]["value"]) for r in hook.accepted}

            await eventually(lambda: expected <= received(), timeout=60)
        finally:
            assert await stop(proc) == 0

    # per device, first deliveries follow the ACK order (redeliveries may repeat some)
    for n, sent in acked.items():
        firsts: list[bytes] = []
        for r in hook.accepted:
            p = base64.b64decode(r.json["payload"]["value"])
            if p.startswith(f"{n}-".encode()) and p not in firsts:
                firsts.append(p)
        assert firsts == sent
