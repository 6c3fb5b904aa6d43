"""Background tasks: the periodic loop of the services' `run_forever` (`every`) and how
every service's `stop()` (and simwire.app's exit stack) ends the tasks it started
(`cancel`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any


async def every(interval_s: float, step: Callable[[], Awaitable[Any]],
                failed: Callable[[Exception], None]) -> None:
    """Run `step`, then sleep `interval_s` (real time), forever. A step that raises is
    reported to `failed` (called inside the `except`, so `log.exception` has the
    traceback) and the next one runs on time: one failure never ends the loop."""
    while True:
        try:
            await step()
        except Exception as exc:
            failed(exc)
        await asyncio.sleep(interval_s)


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended (its CancelledError is swallowed); None:
    nothing to stop."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
