import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from server.gateway.body_limit import BodyLimit


async def echo(request: Request):
    return JSONResponse({"size": len(await request.body())})


def client():
    app = BodyLimit(Starlette(routes=[Route("/v1/x", echo, methods=["POST"]), Route("/up", echo, methods=["POST"])]),
                    default=100, per_path={"/up": 1000})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_under_limit_passes():
    async with client() as c:
        assert (await c.post("/v1/x", content=b"a" * 100)).json() == {"size": 100}
        assert (await c.post("/up", content=b"a" * 900)).json() == {"size": 900}


async def test_declared_length_over_limit_is_413():
    async with client() as c:
        r = await c.post("/v1/x", content=b"a" * 101)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


async def test_streamed_body_without_length_is_counted():
    async def chunks():
        for _ in range(50):
            yield b"a" * 64

    async with client() as c:
        r = await c.post("/up", content=chunks())
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]
