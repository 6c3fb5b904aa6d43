"""Stopping background tasks: what every service's `stop()` (and simwire.app's exit
stack) does with the tasks it started."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended (its CancelledError is swallowed); None:
    nothing to stop."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
