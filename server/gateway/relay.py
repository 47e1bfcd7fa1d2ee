"""Relaying an engine's answer to the caller as it arrives: server-sent events passed through with their usage read
(and taken out where the caller did not ask for it), large documents streamed, whole small ones read at once."""

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import NamedTuple, Protocol

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.gateway.client_watch import ClientLeft, ClientWatch
from server.observability.metrics import RequestTimer

log = logging.getLogger("loraplex.api")


class Usage(NamedTuple):
    """The usage events a streaming caller asked for: the final count, and a running count in every event."""

    final: bool
    running: bool


class Tap(Protocol):
    """What sees an answer go by: a whole document or its pieces (kept when it is stored), its normal end, and the
    request's end."""

    stored: bool

    def whole(self, content: bytes) -> None: ...

    def chunk(self, data: bytes) -> None: ...

    def ended(self, streamed: bool) -> None: ...

    def finish(self) -> None: ...


class EngineStream(StreamingResponse):
    """An engine answer relayed as it arrives; it owns the request's admission and upstream connection until it
    ends.

    The request's ClientWatch ends it when the client leaves, in place of the task group and cancel scope that
    Starlette's StreamingResponse spends on every stream."""

    def __init__(self, content: AsyncIterator[bytes], stack: AsyncExitStack, watch: ClientWatch, headers: dict):
        super().__init__(content, status_code=200, headers=headers)
        self.stack, self.watch = stack, watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self.watch():
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientLeft:
            pass  # nobody to send the rest to
        finally:
            # Also when the client went away, even before the first chunk: the admission is released and the upstream
            # connection closed, which is what makes vLLM abort the request. Nothing in the stack waits on I/O, so a
            # cancellation cannot cut it short.
            await self.stack.aclose()


class WholeAnswer(Response):
    """A small engine answer read whole; the request's bookkeeping (its stack: timer, ledger, admission, upstream
    connection) runs once the bytes are sent, so the caller does not wait for it."""

    def __init__(self, content: bytes, stack: AsyncExitStack, headers: dict):
        super().__init__(content, status_code=200, headers=headers)
        self.stack = stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stack.aclose()  # as in EngineStream: also when the send failed


def event_too_large(limit: int) -> bytes:
    error = {"error": {"message": f"an engine event is larger than {limit} bytes (LORAPLEX_MAX_RESPONSE_BYTES)",
                       "type": "server_error", "param": None, "code": "response_too_large"}}
    return b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"


async def relay_events(chunks: AsyncIterator[bytes], timer: RequestTimer, wants: Usage,
                       limit: int, answer: Tap) -> AsyncIterator[bytes]:
    """Passes engine events through as they come, timing them, reading their usage and showing them to `answer`.

    Each byte is searched for the event boundary once, so a large event costs time in proportion to its size."""
    pending, tap = bytearray(), answer.chunk if answer.stored else None
    async for chunk in chunks:
        if not pending and chunk.endswith(b"\n\n"):
            complete = chunk[:-2]  # the usual case: whole events, nothing held back
        else:
            searched = max(len(pending) - 1, 0)
            pending += chunk
            end = pending.rfind(b"\n\n", searched)
            complete = bytes(pending[:end]) if end >= 0 else None
            if end >= 0:
                del pending[:end + 2]
        if complete is not None:
            if tap:
                tap(complete + b"\n\n")
            out, fits = _events(complete.split(b"\n\n"), timer, wants, limit if len(complete) > limit else 0)
            if out:
                if out.endswith(b"data: [DONE]\n\n"):
                    answer.ended(streamed=True)
                yield out
            if not fits:
                yield event_too_large(limit)
                return
        if len(pending) > limit:
            yield event_too_large(limit)
            return
    if pending:
        yield bytes(pending)


# An event's own usage: vLLM writes it after `choices`, where no other key is followed by an object (a completion's
# top_logprobs are keyed by token text, but their values are numbers, and quotes inside strings are escaped).
EVENT_USAGE = re.compile(rb',"usage":(\{(?:[^{}]|\{[^{}]*\})*\})')
CHOICE_INDEX = re.compile(rb'"choices":\[\{"index":(\d+)')


def _events(events: list[bytes], timer: RequestTimer, wants: Usage, limit: int) -> tuple[bytes, bool]:
    """The events to pass on, and whether all of them were within `limit` (0: known to be) and so passed on."""
    out = []
    for event in events:
        if limit and len(event) > limit:
            return b"".join(out), False
        if event.startswith(b"data: {"):
            found = EVENT_USAGE.search(event)
            if b'"choices":[]' in event:  # the final usage event
                if found:
                    timer.usage(json.loads(found[1]))
                if not wants.final:
                    continue
            else:
                timer.chunk()
                if found:
                    index = CHOICE_INDEX.search(event)
                    timer.running(int(index[1]) if index else 0, json.loads(found[1]))
                    if not wants.running:
                        event = event[:found.start()] + event[found.end():]
        out.append(event + b"\n\n")
    return b"".join(out), True


USAGE_KEY = b'"usage":'
USAGE_BYTES = 1024
# A non-streamed answer up to this size is read whole and sent as one response: streaming it through costs a task
# group and a generator per request. Larger ones (logprobs of long answers) stream, so memory stays bounded.
WHOLE_BYTES = 1 << 20


async def relay_body(chunks: AsyncIterator[bytes], timer: RequestTimer, limit: int,
                     answer: Tap) -> AsyncIterator[bytes]:
    """Passes a large non-streamed answer through as it comes, noting its usage; only a stored answer's document is
    held (up to `limit`)."""
    size, tail = 0, UsageTail()
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            log.warning("engine answer over %d bytes cut short (LORAPLEX_MAX_RESPONSE_BYTES)", limit)
            return  # the headers are out: the client sees the answer end early
        tail.feed(chunk)
        if answer.stored:
            answer.chunk(chunk)
        yield chunk
    timer.usage(tail.usage())
    answer.ended(streamed=False)


class UsageTail:
    """The answer's own usage from a document read in chunks. Logprobs are keyed by token text, so `"usage":` also
    appears inside `choices` (a token spelled "usage"); vLLM writes the answer's `usage` after `choices`, and no later
    field has such a key, so the last occurrence is the answer's."""

    def __init__(self) -> None:
        self.found, self.edge = b"", b""  # the text from the last key so far; the end of the chunk before

    def feed(self, chunk: bytes) -> None:
        joined = self.edge + chunk  # a key cut by the chunks' boundary is whole here
        at = joined.rfind(USAGE_KEY)
        if at >= 0:
            self.found = joined[at:at + USAGE_BYTES]
        elif self.found:
            self.found += chunk[:USAGE_BYTES - len(self.found)]
        self.edge = joined[-(len(USAGE_KEY) - 1):]

    def usage(self) -> dict | None:
        try:
            usage, _ = json.JSONDecoder().raw_decode(self.found[len(USAGE_KEY):].decode(errors="replace").lstrip())
        except ValueError:
            return None
        return usage if isinstance(usage, dict) else None


def whole_usage(content: bytes) -> dict | None:
    """The usage object of a whole non-streamed answer, from the parsed document."""
    try:
        usage = json.loads(content).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None
