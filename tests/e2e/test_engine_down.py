import httpx

from server.core.config import Settings
from server.engine.process import free_port
from server.gateway.app import create_app


async def test_unreachable_engine_is_503(base_model, tmp_path):
    settings = Settings(base_model=str(base_model), registry=tmp_path / "reg",
                        engine_urls=[f"http://127.0.0.1:{free_port()}"])
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/ready")).status_code == 503
            for path, body in [("/v1/completions", {"prompt": "x"}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
                r = await c.post(path, json=body)
                assert r.status_code == 503
                assert r.json()["error"]["code"] == "engine_unavailable"
