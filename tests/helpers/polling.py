"""Waiting for a condition: in a running event loop, or in plain code."""

import asyncio
import time
from collections.abc import Callable


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Polls an async or plain predicate until it holds or `timeout` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(interval)
    return False


def wait_until(predicate: Callable[[], object], timeout: float) -> bool:
    """Polls `predicate` until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic() < deadline
        time.sleep(0.1)
    return False
