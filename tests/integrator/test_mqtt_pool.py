"""MqttPool against a real Mosquitto (TLS, client certificates required), and its token bucket
with a fake clock."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integrator.forwarders.base import DeliveryError
from integrator.forwarders.mqtt import MqttPool, TokenBucket
from tests.support.mqtt import Broker, Subscriber, start_mosquitto
from tests.support.pki import Pki, make_pki

ICCIDS = [f"898828066600000{i:04d}1" for i in range(5)]


class FakeClock:
    """`monotonic` and `sleep` for rate limiters: sleeping only records and advances."""

    def __init__(self, advance: bool = True) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self._advance = advance

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self._advance:
            self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    with start_mosquitto(tmp_path / "mosquitto", pki) as running:
        yield running


@pytest.fixture
async def pools() -> AsyncIterator[list[MqttPool]]:
    """Pools a test made; closed after it."""
    made: list[MqttPool] = []
    yield made
    for pool in made:
        await pool.close()


def make_pool(
    pools: list[MqttPool], broker: Broker, pki: Pki, *, issuer: Pki | None = None,
    name: str = "publisher", **options: Any,
) -> MqttPool:
    """A pool with a client certificate `name` issued by `issuer` (default: the broker's CA)."""
    cert, key = (issuer or pki).client(name)
    pool = MqttPool(
        broker.host, broker.port,
        client_cert_pem=cert.read_text(), client_key_pem=key.read_text(),
        ca_pem=pki.ca_cert.read_text(), **options,
    )
    pools.append(pool)
    return pool


async def poll(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Until `condition()` holds (the broker is another process), or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_200_messages_over_two_connections_arrive_exactly(
    broker: Broker, pki: Pki, pools: list[MqttPool]
) -> None:
    pool = make_pool(pools, broker, pki, connections=2)
    await pool.start()
    assert pool.connected == 2
    sent = [
        (f"{ICCIDS[i % len(ICCIDS)]}/messages", b'{"n":%d}\x00\xff' % i + bytes([i % 256]))
        for i in range(200)
    ]
    async with Subscriber(broker, pki) as sub:
        await asyncio.gather(*(pool.publish(topic, payload) for topic, payload in sent))
        received = await sub.wait_for(len(sent))
    assert sorted(received) == sorted(sent)
    assert pool.in_flight == 0
    log = broker.log()
    assert " as simwire-0 " in log and " as simwire-1 " in log


async def test_certificate_from_another_ca_cannot_connect(
    broker: Broker, pki: Pki, tmp_path: Path, pools: list[MqttPool]
) -> None:
    other = make_pki(tmp_path / "other-ca")
    pool = make_pool(pools, broker, pki, issuer=other, name="intruder", connections=2,
                     timeout_s=5.0)
    with pytest.raises(DeliveryError, match=re.escape(f"MQTT broker 127.0.0.1:{broker.port}: ")):
        await pool.start()
    assert pool.connected == 0
    with pytest.raises(DeliveryError, match="closed"):
        await pool.publish(f"{ICCIDS[0]}/messages", b"x")


async def test_invalid_key_is_reported_without_key_material(pki: Pki) -> None:
    cert, _key = pki.client("publisher")
    pool = MqttPool(
        "127.0.0.1", 1, client_cert_pem=cert.read_text(),
        client_key_pem="-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
        ca_pem=pki.ca_cert.read_text(),
    )
    with pytest.raises(DeliveryError, match="private key") as caught:
        await pool.start()
    assert "c2VjcmV0" not in str(caught.value)
    await pool.close()


def test_token_bucket_spaces_reservations_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(50, monotonic=clock.monotonic)
    waits = [bucket.reserve() for _ in range(60)]
    # one token banked, then each reservation queues 1/50 s behind the previous one
    assert waits == pytest.approx([0.02 * k for k in range(60)])
    clock.now += 60 / 50  # all debt repaid, plus nothing banked beyond the burst
    assert bucket.delay() == 0.0
    assert bucket.reserve() == 0.0
    assert bucket.reserve() == pytest.approx(0.02)


def test_token_bucket_banks_up_to_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, burst=5, monotonic=clock.monotonic)
    assert [bucket.reserve() for _ in range(7)] == pytest.approx([0, 0, 0, 0, 0, 0.1, 0.2])
    clock.now += 10.0
    assert [bucket.reserve() for _ in range(6)] == pytest.approx([0, 0, 0, 0, 0, 0.1])


async def test_concurrent_acquires_queue_behind_each_other() -> None:
    clock = FakeClock(advance=False)
    bucket = TokenBucket(50, monotonic=clock.monotonic, sleep=clock.sleep)
    await asyncio.gather(*(bucket.acquire() for _ in range(60)))
    assert sorted(clock.sleeps) == pytest.approx([0.02 * k for k in range(1, 60)])


async def test_pool_publishes_through_the_rate_limiter(
    broker: Broker, pki: Pki, pools: list[MqttPool]
) -> None:
    clock = FakeClock()
    pool = make_pool(pools, broker, pki, connections=1, max_rate=50.0,
                     monotonic=clock.monotonic, sleep=clock.sleep)
    await pool.start()
    start = clock.now
    for i in range(60):
        await pool.publish(f"{ICCIDS[0]}/messages", b"%d" % i)
    assert clock.sleeps == pytest.approx([0.02] * 59)
    assert clock.now - start == pytest.approx(59 / 50)  # 60 publishes: at most 50/s + 1


async def test_broker_down_fails_publishes_then_reconnects(
    broker: Broker, pki: Pki, pools: list[MqttPool]
) -> None:
    topic = f"{ICCIDS[1]}/messages"
    patient = make_pool(pools, broker, pki, name="patient", client_id="patient",
                        connections=1, timeout_s=10.0, reconnect_max_delay_s=1)
    hasty = make_pool(pools, broker, pki, name="hasty", client_id="hasty",
                      connections=1, timeout_s=0.5, reconnect_max_delay_s=1)
    await patient.start()
    await hasty.start()
    await patient.publish(topic, b"before")

    broker.pause()  # the broker takes the PUBLISH into its socket buffer and never acks
    in_flight = asyncio.create_task(patient.publish(topic, b"in flight"))
    await poll(lambda: patient.in_flight == 1)
    broker.kill()
    with pytest.raises(DeliveryError, match="connection lost"):
        await asyncio.wait_for(in_flight, 5.0)  # well before its 10 s PUBACK timeout

    await poll(lambda: hasty.connected == 0)
    with pytest.raises(DeliveryError, match=re.escape("no connection within 0.5s")):
        await asyncio.wait_for(hasty.publish(topic, b"nowhere"), 5.0)

    broker.start()  # same port: paho reconnects by itself
    async with Subscriber(broker, pki) as sub:
        await poll(lambda: patient.connected == 1 and hasty.connected == 1)
        await patient.publish(topic, b"after 1")
        await hasty.publish(topic, b"after 2")
        expected = {(topic, b"after 1"), (topic, b"after 2")}
        await poll(lambda: expected <= set(sub.messages))
    # paho may also resend the unacknowledged "in flight" (at least once; receivers dedup)
    assert set(sub.messages) <= expected | {(topic, b"in flight")}
