"""Noticing a client that leaves: uvicorn (ASGI 2.3) ignores a send to a departed client, so only `receive` tells,
and work done for that client (a generation in the engine) must stop when it does."""

import asyncio
from collections.abc import Callable
from types import TracebackType

from starlette.types import Receive

from server.core.errors import APIError


class ClientLeft(Exception):
    """The client disconnected: what it asked for is no longer wanted."""


def client_left() -> APIError:
    """What a request whose client left answers (nobody reads it; the access log and metrics do)."""
    return APIError(499, "client closed the request", code="client_closed_request")


class ClientWatch:
    """Within `async with watch(leaving):`, a client that disconnects cancels the task that entered, and the
    cancellation leaves as the exception `leaving()` makes (ClientLeft by default); entering after it left raises
    that at once. Enter it
    only around code whose awaits all lie inside, so the cancellation cannot land elsewhere.

    One listener per request, never cancelled: uvicorn's `receive` returns once the response is complete, so on the
    usual path it ends by itself, and a request costs one task and no cancellation."""

    def __init__(self, receive: Receive):
        self.receive = receive
        self.listener: asyncio.Task | None = None
        self.watching = self.left = False
        self.leaving: Callable[[], Exception] = ClientLeft

    def __call__(self, leaving: Callable[[], Exception] = ClientLeft) -> "ClientWatch":
        self.leaving = leaving
        return self

    async def __aenter__(self) -> "ClientWatch":
        if self.left:  # between two watched stretches
            raise self.leaving() from None
        self.task, self.watching = asyncio.current_task(), True
        if self.listener is None:
            self.listener = asyncio.ensure_future(self._listen())
        return self

    async def _listen(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.left = True  # also when the response completed, after which nothing is watched
        if self.watching:
            self.task.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> bool:
        self.watching = False
        if not (self.left and kind is asyncio.CancelledError):
            return False
        self.task.uncancel()  # the client left: that is why the work stops, not a cancellation of the request
        raise self.leaving() from None
