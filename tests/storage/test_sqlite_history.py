"""The SQLite history query's cost: later pages and protocol filters stay cheap, and a file
written with the earlier history index is upgraded on open."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from simwire.model import Protocol
from simwire.ports import HistoryQuery, IngestRecord
from simwire.storage.sqlite import SqliteStore
from tests.storage.test_contract import T0, b64, iccid, telemetry, walk_history

T = TypeVar("T")
EVENTS = 3000
OLD_INDEX = ("CREATE INDEX events_history ON events (iccid, received_ms, seq) "
             "WHERE type = 'TELEMETRY_DATA'")


class Counted:
    """Runs the store's reads on one connection of its own file and counts the SQLite
    virtual-machine steps they take (a progress handler called every step): a measure of
    rows visited that does not depend on the machine's speed."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.steps = 0
        self.statements: list[str] = []
        """Every statement run, with its values in place."""
        self.conn.set_trace_callback(self.statements.append)

    def _step(self) -> int:
        self.steps += 1
        return 0

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self.conn.set_progress_handler(self._step, 1)
        try:
            return fn(self.conn)
        finally:
            self.conn.set_progress_handler(None, 1)

    def indexes(self) -> dict[str, list[str]]:
        names = [r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'events' "
            "AND sql IS NOT NULL")]
        return {n: [r[2] for r in self.conn.execute(f"PRAGMA index_info({n})")] for n in names}


async def fill(store: SqliteStore, events: int = EVENTS) -> None:
    """Device 1 sends `events` messages (one a ms, UDP but every 100th on CoAP); device 2
    sends as many in between, so device 1's rows are not adjacent."""
    batch: list[Any] = []
    for t in range(events):
        protocol = Protocol.COAP if t % 100 == 0 else Protocol.UDP
        batch += [telemetry(1, T0 + t, f"m{t}".encode(), protocol), telemetry(2, T0 + t)]
        if len(batch) >= 500:
            await store.append(IngestRecord(tuple(batch)))
            batch = []
    if batch:
        await store.append(IngestRecord(tuple(batch)))


async def steps_of(store: SqliteStore, counted: Counted, query: HistoryQuery) -> int:
    counted.steps = 0
    await store.history(query)
    return counted.steps


async def test_later_pages_cost_what_the_first_costs(tmp_path: Path) -> None:
    store = await SqliteStore(tmp_path / "simwire.db").open()
    counted = Counted(tmp_path / "simwire.db")
    try:
        await fill(store)
        store.db.read = counted.read  # type: ignore[method-assign]
        query = HistoryQuery(iccid(1), T0, T0 + EVENTS, page_size=10)
        first = await store.history(query)
        first_steps = counted.steps
        page, depth = first, 1
        while depth < 250:  # 2,500 rows deep
            assert page.next_token is not None
            counted.steps = 0
            page = await store.history(HistoryQuery(
                iccid(1), T0, T0 + EVENTS, page_size=10, token=page.next_token))
            depth += 1
        assert [i.payload for i in page.items] == [
            b64(f"m{t}".encode()) for t in range(EVENTS - 2491, EVENTS - 2501, -1)]
        # an index range that started at the newest entry would visit 2,490 more entries
        assert counted.steps <= first_steps * 1.5, (first_steps, counted.steps)
    finally:
        counted.conn.close()
        await store.close()


async def test_protocol_filter_reads_no_table_row_it_rejects(tmp_path: Path) -> None:
    store = await SqliteStore(tmp_path / "simwire.db").open()
    counted = Counted(tmp_path / "simwire.db")
    try:
        await fill(store)
        assert counted.indexes() == {
            "events_by_device": ["iccid", "received_ms", "seq", "protocol"]}
        store.db.read = counted.read  # type: ignore[method-assign]
        got = await walk_history(store, HistoryQuery(
            iccid(1), T0, T0 + EVENTS, Protocol.COAP, page_size=7))
        assert got == [b64(f"m{t}".encode()) for t in range(EVENTS - 100, -1, -100)]
        counted.statements.clear()
        assert await walk_history(store, HistoryQuery(
            iccid(1), T0, T0 + EVENTS, Protocol.LWM2M, page_size=7)) == []
        # the statement's program: for each index entry in the range, the protocol is read
        # from the index cursor and compared before the table row is ever sought
        (statement,) = counted.statements
        ops = [(r[1], r[2], r[4]) for r in counted.conn.execute("EXPLAIN " + statement)]
        table = next(p1 for op, p1, p4 in ops if op == "OpenRead" and not str(p4).startswith("k("))
        seek = next(i for i, (op, _, _) in enumerate(ops) if op == "DeferredSeek")
        compare = next(i for i, (op, _, _) in enumerate(ops) if i > seek and op in ("Ne", "Eq"))
        assert [(op, p1) for op, p1, _ in ops[seek + 1:compare] if p1 == table] == [], ops
    finally:
        counted.conn.close()
        await store.close()


async def test_file_with_the_earlier_index_is_upgraded_on_open(tmp_path: Path) -> None:
    path = tmp_path / "simwire.db"
    store = await SqliteStore(path).open()
    await fill(store, 300)
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX events_by_device")
    conn.execute(OLD_INDEX)
    conn.commit()
    conn.close()
    assert Counted(path).indexes() == {"events_history": ["iccid", "received_ms", "seq"]}

    again = await SqliteStore(path).open()
    try:
        assert Counted(path).indexes() == {
            "events_by_device": ["iccid", "received_ms", "seq", "protocol"]}
        got = await walk_history(again, HistoryQuery(iccid(1), T0, T0 + 300, Protocol.COAP))
        assert got == [b64(f"m{t}".encode()) for t in (200, 100, 0)]
    finally:
        await again.close()
