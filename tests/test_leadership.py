"""The leader lease (simwire.leadership): two processes' stores on one SQLite file or one
MongoDB database, a manual clock, `attempt()` called where the real loop would call it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from simwire.clock import ManualClock
from simwire.leadership import LEASE, Leadership
from simwire.ports import Store
from simwire.storage import open_store

TTL = 15.0


class Cut:
    """One process's way to the store, which the test can cut (a network partition:
    every call fails as a dropped connection would)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cut = False

    async def acquire_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        if self.cut:
            raise ConnectionError("store unreachable")
        return await self.store.acquire_lease(name, holder, now_ms, ttl_ms)

    async def release_lease(self, name: str, holder: str) -> None:
        if self.cut:
            raise ConnectionError("store unreachable")
        await self.store.release_lease(name, holder)


class Node:
    """One process contending for the lead: its duties are a list of what happened."""

    def __init__(self, name: str, store: Store, clock: ManualClock) -> None:
        self.events: list[str] = []
        self.failing_gains = 0
        """How many of the next gains fail (their duties raise)."""
        self.link = Cut(store)
        self.leadership = Leadership(self.link, clock, self._gain, self._loss, TTL,
                                     holder=name)

    async def _gain(self) -> None:
        self.events.append("gain")
        if self.failing_gains:
            self.failing_gains -= 1
            raise ConnectionError("store unreachable while starting the duties")

    async def _loss(self) -> None:
        self.events.append("loss")

    @property
    def leading(self) -> bool:
        return self.leadership.leading


@pytest.fixture
async def stores(store_url: str, tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two processes' stores on the same data."""
    a = await open_store(store_url, tmp_path)
    b = await open_store(store_url, tmp_path)
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def nodes(stores: tuple[Store, Store], clock: ManualClock
                ) -> AsyncIterator[tuple[Node, Node]]:
    """Processes a and b, not started yet; stopped after the test (again, if it did)."""
    a, b = Node("a", stores[0], clock), Node("b", stores[1], clock)
    yield a, b
    await a.leadership.stop()
    await b.leadership.stop()


async def start(*nodes: Node) -> None:
    for node in nodes:
        await node.leadership.start()


async def tick(clock: ManualClock, seconds: float, *nodes: Node) -> None:
    """`seconds` pass; then each node's loop makes its attempt, in the order given."""
    clock.advance(seconds)
    for node in nodes:
        await node.leadership.attempt()


async def test_one_leads_the_other_waits_and_renewal_keeps_it(
    nodes: tuple[Node, Node], clock: ManualClock
) -> None:
    a, b = nodes
    await start(a, b)
    assert (a.leading, b.leading) == (True, False)
    for _ in range(10):  # 50 s of renewals every ttl / 3: the lease never lapses
        await tick(clock, TTL / 3, b, a)
    assert (a.events, b.events) == (["gain"], [])
    await b.leadership.stop()
    await a.leadership.stop()
    assert a.events == ["gain", "loss"]


async def test_cut_off_leader_steps_down_before_the_other_takes_over(
    nodes: tuple[Node, Node], clock: ManualClock
) -> None:
    a, b = nodes
    await start(a, b)
    await tick(clock, 5, a, b)  # renewed at t=5: the lease runs to t=20
    a.link.cut = True
    await tick(clock, 5, a, b)  # t=10: a failed once, still within its term
    assert (a.leading, b.leading) == (True, False)
    await tick(clock, 5, a, b)  # t=15: 10 s without a renewal: a stops; the lease runs
    assert (a.leading, b.leading) == (False, False)
    assert a.events == ["gain", "loss"]
    await tick(clock, 4.999, b)
    assert not b.leading
    await tick(clock, 0.001, b)  # t=20: the lease ran out: b takes it
    assert b.leading and b.events == ["gain"]
    a.link.cut = False  # a is back: it finds b's lease and waits
    await tick(clock, 5, a, b)
    assert (a.leading, b.leading) == (False, True)
    assert a.events == ["gain", "loss"]


async def test_paused_leader_that_finds_another_holder_steps_down(
    nodes: tuple[Node, Node], clock: ManualClock
) -> None:
    a, b = nodes
    await start(a, b)
    await tick(clock, TTL, b)  # a paused (no renewal) for the whole term: b takes over
    assert b.leading
    await tick(clock, 0, a)
    assert not a.leading and a.events == ["gain", "loss"]


async def test_clean_stop_hands_over_at_once(
    nodes: tuple[Node, Node], clock: ManualClock
) -> None:
    a, b = nodes
    await start(a, b)
    await a.leadership.stop()  # releases the lease: no waiting for its end
    assert a.events == ["gain", "loss"]
    await tick(clock, 0, b)
    assert b.leading
    assert not await a.link.store.acquire_lease(LEASE, "a", clock.now_ms(), 1000)


async def test_duties_that_fail_to_start_give_the_lease_back(
    nodes: tuple[Node, Node], clock: ManualClock
) -> None:
    a, b = nodes
    a.failing_gains = 1
    await start(a)
    assert not a.leading and a.events == ["gain", "loss"]
    await start(b)  # the lease was released: b need not wait for its end
    assert b.leading and b.events == ["gain"]
    await b.leadership.stop()
    await tick(clock, 0, a)  # b released it on stop: a tries again, and now succeeds
    assert a.leading and a.events == ["gain", "loss", "gain"]
