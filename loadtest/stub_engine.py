"""A stand-in vLLM engine that computes nothing: /health, /metrics, /v1/completions (streamed or not), and an
adapter it always fails to load. The relay benchmark measures the gateway against it; tests fault-inject with it.

    python -m loadtest.stub_engine --port 8400 [--tokens 32] [--gap 0.005] [--serves name@1,other@2]
"""

import argparse
import asyncio
import json
import ssl
from dataclasses import dataclass, field

from aiohttp import web

from server.engine.process import free_port

USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def _compact(event: dict) -> bytes:
    """An event as vLLM writes it: JSON without spaces."""
    return json.dumps(event, separators=(",", ":")).encode()


@dataclass
class StubEngine:
    """Streams `tokens` events `gap` seconds apart, then a usage event and [DONE]; `event_bytes` pads each event's
    text (or the non-streamed answer's) to that size. `requests` counts completions; `request_ids` holds the
    X-Request-Id each came with, `traceparents` its W3C trace context."""

    tokens: int = 1
    gap: float = 0.0
    event_bytes: int = 0
    port: int = field(default_factory=free_port)
    tls: ssl.SSLContext | None = None  # serves HTTPS with it when given
    requests: int = 0
    request_ids: list[str | None] = field(default_factory=list)
    traceparents: list[str | None] = field(default_factory=list)
    serves: frozenset[str] = frozenset()  # adapter versions (name@version) it answers; others it fails to load
    serves_all: bool = False  # answers every adapter version (names not known in advance: compositions)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        return app

    async def start(self) -> "StubEngine":
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.tls).start()
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    @staticmethod
    async def _health(_: web.Request) -> web.Response:
        return web.Response(text="")

    @staticmethod
    async def _metrics(_: web.Request) -> web.Response:
        return web.Response(text="vllm:stub 1\n")

    @staticmethod
    def _refuse_adapter(model: str) -> web.Response:
        """Fails an adapter the way vLLM fails one its resolver found but could not load, with a server path added
        the way an engine's load error can carry one."""
        message = (f"LoRA adapter '{model}' was found but could not be loaded: no adapter in "
                   f"/srv/loraplex/registry/{model}")
        return web.json_response({"error": {"message": message, "type": "BadRequestError", "code": 400}},
                                 status=400)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        """/v1/completions and /v1/chat/completions alike: `tokens` pieces of text, whole or as events."""
        self.requests += 1
        self.request_ids.append(request.headers.get("x-request-id"))
        self.traceparents.append(request.headers.get("traceparent"))
        body = await request.json()
        if "@" in body["model"] and body["model"] not in self.serves and not self.serves_all:
            return self._refuse_adapter(body["model"])
        chat = request.path.endswith("/chat/completions")
        # Named after x-request-id, as vLLM names its answers.
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request.headers.get('x-request-id', 'stub')}",
                "object": "chat.completion" if chat else "text_completion", "created": 1, "model": body["model"]}
        text = "x" * self.event_bytes or " tok"
        if not body.get("stream"):
            choice = _choice(chat, False, text * self.tokens, "length")
            return web.json_response({**head, "choices": [choice], "usage": USAGE, "kv_transfer_params": None})
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        for i in range(self.tokens):
            if self.gap:
                await asyncio.sleep(self.gap)
            choice = _choice(chat, True, text, "length" if i == self.tokens - 1 else None)
            await response.write(b"data: " + _compact({**head, "choices": [choice], "usage": None})
                                 + b"\n\n")
        await response.write(b"data: " + _compact({**head, "choices": [], "usage": USAGE}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


def _choice(chat: bool, streamed: bool, text: str, finish: str | None) -> dict:
    if not chat:
        return {"index": 0, "text": text, "finish_reason": finish}
    return {"index": 0, ("delta" if streamed else "message"): {"role": "assistant", "content": text},
            "finish_reason": finish}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--gap", type=float, default=0.005, help="seconds between token events")
    p.add_argument("--serves", default="", help="comma-separated adapter versions (name@version) it answers")
    args = p.parse_args()
    engine = StubEngine(args.tokens, args.gap, port=args.port, serves=frozenset(filter(None, args.serves.split(","))))
    web.run_app(engine.app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
