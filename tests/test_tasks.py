"""simwire.tasks.every: the services' periodic loop."""

from __future__ import annotations

import asyncio

from simwire.tasks import cancel, every


async def test_every_reports_a_failed_step_and_keeps_going() -> None:
    calls: list[int] = []
    failures: list[Exception] = []
    third = asyncio.Event()

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("store down")
        if len(calls) == 3:
            third.set()

    task = asyncio.create_task(every(0, step, failures.append))
    await asyncio.wait_for(third.wait(), 5)
    await cancel(task)
    assert calls[:3] == [0, 1, 2]
    assert [str(e) for e in failures] == ["store down"]
    assert task.cancelled()

