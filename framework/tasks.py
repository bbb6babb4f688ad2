"""Background tasks owned by resources: how they are stopped."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["finish_task"]


async def finish_task(task: asyncio.Task[Any] | None, timeout: float = 10.0) -> None:
    """Wait up to `timeout` for `task` to end by itself (it was told to stop), then cancel it."""
    if task is None:
        return
    try:
        await asyncio.wait_for(task, timeout=timeout)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
