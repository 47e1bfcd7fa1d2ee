"""ClientWatch: a departure ends the watched work as the caller's exception, once, and never leaks a cancellation."""

import asyncio

import pytest

from server.gateway.client_watch import ClientLeft, ClientWatch


def receiver(gone: asyncio.Event):
    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


async def test_a_departure_ends_the_watched_work_and_the_next_stretch_at_once():
    gone, ran = asyncio.Event(), []
    watch = ClientWatch(receiver(gone))
    with pytest.raises(ClientLeft):
        async with watch():
            asyncio.get_running_loop().call_later(0.05, gone.set)
            await asyncio.sleep(30)
    with pytest.raises(ValueError):
        async with watch(leaving=lambda: ValueError("left")):
            ran.append(True)
    assert not ran and not asyncio.current_task().cancelling()


async def test_a_departure_outside_a_watched_stretch_cancels_nothing():
    gone = asyncio.Event()
    watch = ClientWatch(receiver(gone))
    async with watch():
        await asyncio.sleep(0)
    gone.set()  # as uvicorn reports once the response is complete
    await asyncio.wait_for(watch.listener, 1)
    await asyncio.sleep(0)  # a cancellation, had one been sent, would land here
    assert watch.left and not asyncio.current_task().cancelling()
