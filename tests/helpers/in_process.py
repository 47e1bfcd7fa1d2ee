"""The real gateway app in process over given engines, and an engine's adapter API in memory. The stand-in engine
over real HTTP is loadtest.stub_engine.StubEngine."""

from contextlib import asynccontextmanager

import httpx

from server.core.config import Settings
from server.gateway.app import create_app


class FakeEngine:
    """An engine's adapter API in memory: the versions it holds, and the unloads it was asked for."""

    def __init__(self, url: str = "http://engine", held: set[str] = frozenset()):
        self.url, self.held = url, set(held)
        self.unloaded: list[str] = []

    async def adapters(self) -> set[str]:
        return set(self.held)

    async def unload_lora(self, name: str) -> None:
        self.unloaded.append(name)
        self.held.discard(name)


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
