"""The least a Python relay in front of vLLM can cost: uvicorn and aiohttp, as in the gateway, and nothing else (no
validation, routing, metrics, usage or disconnect handling). The benchmark measures its CPU per request beside the
gateway's and vLLM's front end's, as the floor the gateway's cost is judged against.

    LORAPLEX_RELAY_ENGINE=http://127.0.0.1:8100 LORAPLEX_RELAY_KEY=... uvicorn loadtest.bare_relay:app --port 8200
"""

import os

import aiohttp
from starlette.types import Receive, Scope, Send

ENGINE = os.environ.get("LORAPLEX_RELAY_ENGINE", "http://127.0.0.1:8100")
HEADERS = {"content-type": "application/json", "authorization": f"Bearer {os.environ.get('LORAPLEX_RELAY_KEY', '')}"}
session: aiohttp.ClientSession | None = None


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    global session
    if scope["type"] == "lifespan":
        await receive()  # startup
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        await send({"type": "lifespan.startup.complete"})
        await receive()  # shutdown
        await session.close()
        return await send({"type": "lifespan.shutdown.complete"})
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    async with session.request(scope["method"], ENGINE + scope["path"], data=body, headers=HEADERS) as upstream:
        await send({"type": "http.response.start", "status": upstream.status,
                    "headers": [(b"content-type", upstream.headers.get("content-type", "").encode())]})
        async for chunk in upstream.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
