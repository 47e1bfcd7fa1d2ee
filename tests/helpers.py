"""Shared test helpers: a stand-in vLLM engine served over real HTTP, and an in-process gateway in front of it."""

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from aiohttp import web

from server.app import create_app
from server.config import Settings
from server.engine_client import EngineError
from server.engine_process import free_port


class FakeEngine:
    """An engine's adapter API in memory: records loads and unloads; `fail` names adapters it refuses.

    With `gated`, a load waits for `gate` after setting `loading`, so a test can act while it is in flight."""

    def __init__(self, delay: float = 0.01, fail: set[str] = frozenset(), gated: bool = False):
        self.delay, self.fail = delay, set(fail)
        self.loaded: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.loading, self.gate = asyncio.Event(), asyncio.Event()
        if not gated:
            self.gate.set()

    async def load_lora(self, name: str, path: str) -> None:
        self.calls.append(("load", name))
        self.loading.set()
        await self.gate.wait()
        await asyncio.sleep(self.delay)  # the engine's latency, so concurrent callers overlap
        if name in self.fail:
            raise EngineError(400, "bad adapter")
        self.loaded.add(name)

    async def unload_lora(self, name: str) -> None:
        self.calls.append(("unload", name))
        await asyncio.sleep(self.delay)
        self.loaded.discard(name)


@dataclass
class StubEngine:
    """Answers /health, /v1/completions (streamed or not) and /metrics like vLLM, computing nothing.

    `event_bytes` pads one streamed event (or the non-streamed answer) to that size; `requests` counts completions."""

    event_bytes: int = 0
    port: int = field(default_factory=free_port)
    requests: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "StubEngine":
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/load_lora_adapter", self._refuse_load)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
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
    async def _refuse_load(request: web.Request) -> web.Response:
        """Refuses every adapter the way vLLM refuses a broken one: naming the path it was given."""
        body = await request.json()
        message = f"Loading lora {body['lora_name']} failed: No adapter found for {body['lora_path']}"
        return web.json_response({"error": {"message": message, "type": "BadRequestError", "code": 400}},
                                 status=400)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.json()
        text = "x" * self.event_bytes
        usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        head = {"id": "cmpl-stub", "object": "text_completion", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            return web.json_response({**head, "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                                      "usage": usage, "kv_transfer_params": None})
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        chunk = {**head, "choices": [{"index": 0, "text": text, "finish_reason": None}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: " + json.dumps({**head, "choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


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


@asynccontextmanager
async def gateway_over(engine_urls: list[str], base_model: str, tmp_path, **settings):
    """The real gateway app, lifespan and supervisor included, over the given engines; yields an HTTP client."""
    app = create_app(Settings(base_model=base_model, registry=tmp_path / "registry", state_dir=tmp_path / "state",
                              engine_urls=engine_urls, admin_token="admin-token", **settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as client:
            client.app = app
            yield client


async def ready(client: httpx.AsyncClient, engines: int = 1) -> bool:
    r = await client.get("/ready")
    return r.status_code == 200 and sum(r.json()["engines"]) >= engines
