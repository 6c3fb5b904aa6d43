"""`simwire serve --workers N` (simwire.workers): the kernel steers each source address to
one worker, notices reach their worker, and a worker killed with SIGKILL loses nothing that
was ACKed (a real supervisor with two workers, real HTTPS webhook receiver)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from integrator import coap
from simwire.workers import Peers, bind_group, owner_index
from tests.support.net import UdpClient
from tests.support.pki import make_pki
from tests.support.serve import clean_env, created, start, stop, telemetry_webhook, token
from tests.support.simwire import eventually
from tests.support.webhook import receiver

ADMIN, SECRET = "workers-admin", "workers-admin-secret-0123456789"


def test_owner_index_matches_the_address_arithmetic() -> None:
    assert owner_index("127.0.0.40", 2) == 0
    assert owner_index("127.0.0.41", 2) == 1
    assert owner_index("10.0.0.7", 3) == int(ipaddress.IPv4Address("10.0.0.7")) % 3
    assert owner_index("::ffff:127.0.0.41", 2) == 1  # v4-mapped: the IPv4 address
    assert owner_index("2001:db8::5", 4) == 5 % 4  # IPv6: the low 32 bits
    assert owner_index("127.0.0.41", 1) == 0


def test_the_kernel_steers_each_source_address_to_its_owner() -> None:
    """Every datagram from 127.0.0.x reaches socket `owner_index(x, 4)`, from any source
    port: the BPF program and `owner_index` agree."""
    port, socks = bind_group("127.0.0.1", 0, 4)
    try:
        for sock in socks:
            sock.settimeout(2)
        sent: list[tuple[str, int]] = []
        for last in range(1, 33):
            ip = f"127.0.0.{last}"
            for _ in range(2):  # two source ports per address
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                    client.bind((ip, 0))
                    client.sendto(ip.encode(), ("127.0.0.1", port))
                    sent.append((ip, client.getsockname()[1]))
        received: list[tuple[str, int]] = []
        for index, sock in enumerate(socks):
            sock.setblocking(False)
            while True:
                try:
                    data, addr = sock.recvfrom(64)
                except BlockingIOError:
                    break
                assert data.decode() == addr[0]
                assert owner_index(addr[0], 4) == index, (addr, index)
                received.append(addr)
        assert sorted(received) == sorted(sent)
        assert {owner_index(ip, 4) for ip, _ in sent} == {0, 1, 2, 3}
    finally:
        for sock in socks:
            sock.close()


async def test_peers_deliver_notices_to_their_worker_once_per_loop_pass() -> None:
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        first = Peers(0, pairs[0][0], [b for _, b in pairs])
        second = Peers(1, pairs[1][0], [b for _, b in pairs])
        got: list[dict[str, Any]] = []
        first.handlers["outbox"] = got.append
        first.handlers["sim"] = got.append
        first.start()
        try:
            for _ in range(5):
                second.send_soon(0, "outbox")  # coalesced: one notice
            second.broadcast("sim", ips=["127.0.0.9"])  # to worker 0 only (not itself)
            second.send_soon(1, "outbox")  # to itself: nothing
            await eventually(lambda: len(got) == 2)
            await asyncio.sleep(0.05)
            assert got == [{"t": "sim", "ips": ["127.0.0.9"]}, {"t": "outbox"}]
        finally:
            first.stop()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


DEVICES = 16  # 127.0.0.40 .. 127.0.0.55: even addresses on worker 0, odd on worker 1
PER_DEVICE = 40


@pytest.mark.timeout(180)
async def test_sigkill_one_of_two_workers_loses_no_acked_message(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    env = clean_env(SIMWIRE_ADMIN_CLIENT_ID=ADMIN, SIMWIRE_ADMIN_CLIENT_SECRET=SECRET,
                    SIMWIRE_WEBHOOK_CA_FILE=str(pki.ca_cert))
    async with receiver(pki) as hook, aiohttp.ClientSession() as http:
        proc, ports, printed = await start(tmp_path / "data", env, "--workers", "2")
        try:
            pids = [int(p) for p in printed.split("pids=")[1].split()[0].split(",")]
            assert "workers=2" in printed and len(pids) == 2
            base = f"http://127.0.0.1:{ports['http']}"
            bearer = {"Authorization": f"Bearer {await token(http, ports['http'], ADMIN, SECRET)}"}

            async def health() -> dict[str, Any]:  # a new connection: any worker accepts
                async with http.get(f"{base}/healthz", headers={"Connection": "close"}) as r:
                    return dict((await r.json())["worker"])

            seen: set[tuple[int, int]] = set()
            for _ in range(200):  # both workers accept API connections
                worker = await health()
                seen.add((worker["index"], worker["pid"]))
                if len(seen) == 2:
                    break
            assert seen == {(0, pids[0]), (1, pids[1])}

            iccids = [f"89882806660000004{n:02d}" for n in range(DEVICES)]
            for n, iccid in enumerate(iccids):  # SIMs created through either worker
                await created(http, f"{base}/v1/sims", bearer, {
                    "iccid": iccid, "imsi": f"9014051000004{n:02d}", "ip": f"127.0.0.{40 + n}"})
            await telemetry_webhook(http, base, bearer, "workers", hook.url)

            acked: dict[int, list[bytes]] = {n: [] for n in range(DEVICES)}
            retransmitted = 0
            halfway = asyncio.Event()

            async def device(n: int) -> None:
                """CON POSTs one after the other; an unanswered one is retransmitted (same
                message ID) until ACKed, as a device would."""
                nonlocal retransmitted
                link = await UdpClient.open(("127.0.0.1", ports["coap"]), f"127.0.0.{40 + n}")
                try:
                    for k in range(PER_DEVICE):
                        payload = f"{n}-{k}".encode()
                        datagram = coap.serialize(coap.Message(
                            coap.CON, coap.POST, k + 1, b"", [], payload))
                        for _attempt in range(20):
                            try:
                                reply = await link.request(datagram, timeout=1.0)
                            except TimeoutError:
                                retransmitted += 1
                                continue
                            assert coap.parse(reply).code == coap.CHANGED
                            acked[n].append(payload)
                            break
                        else:
                            raise AssertionError(f"device {n}: message {k} never ACKed")
                        if k == PER_DEVICE // 4 and n == 1:
                            halfway.set()
                finally:
                    link.close()

            senders = asyncio.gather(*(device(n) for n in range(DEVICES)))
            await halfway.wait()
            os.kill(pids[1], signal.SIGKILL)  # mid-stream: worker 1 holds the odd addresses
            await senders

            # the supervisor started worker 1 again, and it serves its addresses
            await eventually(lambda: _restarted(health, pids[1]), timeout=30)
            expected = {p for sent in acked.values() for p in sent}
            assert len(expected) == DEVICES * PER_DEVICE
            assert retransmitted > 0, "the kill came too late: nothing had to be retransmitted"

            # every ACKed message is in history (read through either worker) ...
            for n, iccid in enumerate(iccids):
                async with http.get(f"{base}/v1/inspect/devices/{iccid}/history",
                                    headers=bearer, params={"pageSize": "100"}) as r:
                    assert r.status == 200
                    stored = {base64.b64decode(item["payload"])
                              for item in (await r.json())["items"]}
                assert set(acked[n]) <= stored, n

            # ... and delivered to the webhook (worker 0 delivers what both stored)
            def delivered() -> set[bytes]:
                return {base64.b64decode(r.json["payload"]["value"]) for r in hook.accepted}

            await eventually(lambda: expected <= delivered(), timeout=60)

            # /metrics, answered by either worker, has both workers' series: worker 0 (never
            # killed, deduplicating retransmissions) stored exactly the even devices' messages
            async def stored_by_worker() -> dict[str, float] | None:
                async with http.get(f"{base}/metrics", headers={"Connection": "close"}) as r:
                    text = await r.text()
                counts = {}
                for line in text.splitlines():
                    if (line.startswith("simwire_uplinks_total{")
                            and 'outcome="stored"' in line and 'protocol="COAP"' in line):
                        counts[line.split('worker="')[1].split('"')[0]] = float(line.split()[-1])
                return counts if set(counts) == {"0", "1"} else None

            counts = await eventually(stored_by_worker, timeout=10)
            assert counts["0"] == DEVICES // 2 * PER_DEVICE
        finally:
            assert await stop(proc) == 0


async def _restarted(health: Any, old_pid: int) -> bool:
    for _ in range(10):
        worker = await health()
        if worker["index"] == 1:
            return bool(worker["pid"] != old_pid)
    return False


@pytest.mark.timeout(120)
async def test_lwm2m_downlinks_reach_the_worker_holding_the_registration(
        tmp_path: Path) -> None:
    """A device on worker 1 registers; read actions created through either worker all
    succeed: worker 0 stores its requests SCHEDULED and hands them to worker 1, which
    sends them from the device's socket. Each request is a new API connection, taken by
    either worker: 12 of them all landing on worker 1 has a chance of 1 in 4096."""
    from sdk_examples.lwm2m_client import Lwm2mClient

    env = clean_env(SIMWIRE_ADMIN_CLIENT_ID=ADMIN, SIMWIRE_ADMIN_CLIENT_SECRET=SECRET)
    iccid, ip = "8988280666000000499", "127.0.0.43"
    assert owner_index(ip, 2) == 1
    async with aiohttp.ClientSession() as http:
        proc, ports, _ = await start(tmp_path / "data", env, "--workers", "2")
        try:
            base = f"http://127.0.0.1:{ports['http']}"
            bearer = {"Authorization": f"Bearer {await token(http, ports['http'], ADMIN, SECRET)}",
                      "Connection": "close"}
            await created(http, f"{base}/v1/sims", bearer,
                          {"iccid": iccid, "imsi": "901405100000499", "ip": ip})
            async with Lwm2mClient(iccid, ("127.0.0.1", ports["coap"]), bind=(ip, 0)) as dev:
                assert await dev.register() == "2.01"
                for _ in range(12):
                    async with http.post(
                            f"{base}/v1/integrate/devices/{iccid}/actions/LWM2M",
                            headers=bearer, json={"action": "read",
                                                  "resourceAddress": "/3/0/9"}) as r:
                        assert r.status == 202, await r.text()
                        request_id = (await r.json())["id"]

                    async def outcome(rid: str = request_id) -> dict[str, Any] | None:
                        async with http.get(f"{base}/v1/integrate/devices/actions/requests/{rid}",
                                            headers=bearer) as r:
                            body = dict(await r.json())
                        return body if body["status"] not in ("SCHEDULED",
                                                              "IN_PROGRESS") else None

                    done = await eventually(outcome, timeout=10)
                    assert done["status"] == "SUCCEEDED", done
                    assert done["resultData"]["code"] == "205"
        finally:
            assert await stop(proc) == 0


@pytest.mark.timeout(120)
async def test_leader_fail_over_between_two_servers_sharing_a_store(tmp_path: Path) -> None:
    """Two `simwire serve` processes on one store (SQLite here; machines share MongoDB the
    same way), a 1 s leader lease: the first leads and delivers; after it is SIGKILLed the
    other takes the lease by itself and delivers what it stores and what was queued."""
    pki = make_pki(tmp_path / "pki")
    env = clean_env(SIMWIRE_ADMIN_CLIENT_ID=ADMIN, SIMWIRE_ADMIN_CLIENT_SECRET=SECRET,
                    SIMWIRE_WEBHOOK_CA_FILE=str(pki.ca_cert), SIMWIRE_LEADER_LEASE_S="1")
    iccid, ip = "8988280666000000498", "127.0.0.44"
    async with receiver(pki) as hook, aiohttp.ClientSession() as http:
        first, first_ports, _ = await start(tmp_path / "data", env)
        second, ports, _ = await start(tmp_path / "data", env)
        try:
            async def leads(port: int) -> bool:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    return bool((await r.json())["leader"])

            assert (await leads(first_ports["http"]), await leads(ports["http"])) == (True, False)
            base = f"http://127.0.0.1:{ports['http']}"  # managed through the follower
            bearer = {"Authorization": f"Bearer {await token(http, ports['http'], ADMIN, SECRET)}"}
            await created(http, f"{base}/v1/sims", bearer,
                          {"iccid": iccid, "imsi": "901405100000498", "ip": ip})
            await telemetry_webhook(http, base, bearer, "fail-over", hook.url)

            def delivered() -> set[bytes]:
                """Payloads delivered. At least once: the killed leader may have delivered
                "before" without committing that, so the new leader delivers it again."""
                return {base64.b64decode(r.json["payload"]["value"]) for r in hook.accepted}

            link = await UdpClient.open(("127.0.0.1", ports["udp"]), ip)
            try:
                link.send(b"before")  # stored by the follower, delivered by the leader
                await eventually(lambda: delivered() == {b"before"}, timeout=15)
                os.kill(first.pid, signal.SIGKILL)
                await first.wait()
                link.send(b"after")  # queued while nobody leads, then delivered
                await eventually(lambda: leads(ports["http"]), timeout=10)
                await eventually(lambda: delivered() == {b"before", b"after"}, timeout=15)
                ids: dict[bytes, set[str]] = {b"before": set(), b"after": set()}
                for req in hook.accepted:  # a repeat carries the same event id
                    ids[base64.b64decode(req.json["payload"]["value"])].add(req.json["id"])
                assert [len(v) for v in ids.values()] == [1, 1], hook.accepted
            finally:
                link.close()
        finally:
            if first.returncode is None:
                await stop(first)
            assert await stop(second) == 0
