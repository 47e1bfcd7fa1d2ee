from loadtest.stub_engine import StubEngine
from server.engine.discovery import Discovery
from server.engine.routing import Backend, Router
from tests.helpers.in_process import FakeEngine, gateway_over, ready
from tests.helpers.polling import wait_for


def discovery(answers: list[list[str]]) -> tuple[Discovery, Router]:
    router = Router([])

    async def lookup(host: str, port: int) -> list[str]:
        assert (host, port) == ("loraplex-engine", 8100)
        return answers.pop(0)

    return Discovery("http://loraplex-engine:8100", router, lambda url: Backend(FakeEngine(url)), lookup=lookup), \
        router


async def test_engines_that_join_are_added_and_those_that_leave_removed():
    d, router = discovery([["10.0.0.2", "10.0.0.1"], ["10.0.0.1", "10.0.0.3", "fd00::7"], []])
    await d.update()
    first = {b.engine.url: b for b in router.backends}
    assert set(first) == {"http://10.0.0.1:8100", "http://10.0.0.2:8100"}
    assert not any(b.up for b in router.backends)  # until the supervisor's first good probe
    await d.update()
    urls = [b.engine.url for b in router.backends]
    assert set(urls) == {"http://10.0.0.1:8100", "http://10.0.0.3:8100", "http://[fd00::7]:8100"}
    assert next(b for b in router.backends if b.engine.url == "http://10.0.0.1:8100") is first["http://10.0.0.1:8100"]
    await d.update()
    assert router.backends == []


async def test_a_gateway_finds_its_engine_by_a_real_dns_name(base, tmp_path):
    """`localhost` through the system resolver: the gateway adds what it resolves to, probes it and serves."""
    engine = await StubEngine().start()
    async with gateway_over([], str(base.path), tmp_path, engine_dns=f"http://localhost:{engine.port}",
                            engine_dns_interval=0.2) as client:
        assert await wait_for(lambda: ready(client), 10)
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and engine.requests == 1
        assert "http://127.0.0.1:" in str([b.engine.url for b in client.app.state.router.backends])
    await engine.stop()
