"""Request ids and the access log: every response carries `x-request-id`, the caller's if it is well-formed, else
a new one; the gateway writes it in its access log and audit lines, never in an error body, so another tenant's
adapter still answers byte for byte like a missing one. The engine is sent the answer's id instead (the gateway's
own, never the caller's), which the access line names too."""

import contextvars
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("loraplex.access")
HEADER = b"x-request-id"
VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The id of the request being served, for code that has no request at hand (the audit log).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def from_headers(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's id when it matches VALID, else a new random one."""
    for name, value in headers:
        if name == HEADER:
            given = value.decode("latin-1")
            if VALID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


class RequestIds:
    """ASGI middleware, outermost, so refusals by the other middleware carry the id too; one access line per request
    once its response has ended (a stream's at its end), in place of uvicorn's, which cannot show the id."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = from_headers(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        start, status = time.perf_counter(), [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
            client = (scope.get("client") or ("-",))[0]
            answer = scope["state"].get("answer_id")  # the engine's name for the request, set by the /v1 path
            log.info('%s "%s %s" %d %.1f ms request_id=%s%s', client, scope["method"], scope["path"], status[0],
                     (time.perf_counter() - start) * 1000, request_id, f" answer_id={answer}" if answer else "")
