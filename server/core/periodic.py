"""Background work repeated at an interval, which a failure does not stop."""

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("loraplex")


async def every(seconds: float, work: Callable[[], Awaitable[None]], failed: str) -> None:
    """Awaits `work()` every `seconds`, for ever; a failure is logged with the message `failed`, and the next round
    runs."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except Exception:
            log.exception(failed)
