import asyncio

import pytest

from server.engine_client import EngineError
from server.residency import Residency
from server.routing import Backend, Router


class FakeEngine:
    def __init__(self, delay: float = 0.01, fail: set[str] = frozenset()):
        self.delay, self.fail = delay, set(fail)
        self.loaded: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    async def load_lora(self, name, path):
        self.calls.append(("load", name))
        await asyncio.sleep(self.delay)
        if name in self.fail:
            raise EngineError(400, "bad adapter")
        self.loaded.add(name)

    async def unload_lora(self, name):
        self.calls.append(("unload", name))
        await asyncio.sleep(self.delay)
        self.loaded.discard(name)


async def use(res: Residency, key: str, hold: float = 0.0):
    async with res.lease(key, f"/r/{key}"):
        assert key in res.engine.loaded
        await asyncio.sleep(hold)


async def test_concurrent_first_use_loads_once():
    engine = FakeEngine(delay=0.05)
    res = Residency(engine, capacity=4)
    await asyncio.gather(*(use(res, "a@1") for _ in range(20)))
    assert engine.calls == [("load", "a@1")]


async def test_lru_unloads_least_recently_used():
    engine = FakeEngine()
    res = Residency(engine, capacity=2)
    for key in ("a@1", "b@1", "a@1", "c@1"):
        await use(res, key)
    assert engine.loaded == {"a@1", "c@1"}
    assert ("unload", "b@1") in engine.calls and len(res) == 2


async def test_version_in_use_is_never_unloaded():
    engine = FakeEngine()
    res = Residency(engine, capacity=1)
    long_request = asyncio.create_task(use(res, "a@1", hold=0.2))
    await asyncio.sleep(0.05)
    await use(res, "a@2")  # a new version arrives while the old one is still serving
    assert "a@1" in engine.loaded and not long_request.done()
    await long_request
    await use(res, "a@2")
    assert engine.loaded == {"a@2"}


async def test_failed_load_reaches_every_waiter_and_is_retried():
    engine = FakeEngine(fail={"bad@1"})
    res = Residency(engine, capacity=2)
    results = await asyncio.gather(*(use(res, "bad@1") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, EngineError) for r in results)
    assert engine.calls.count(("load", "bad@1")) == 1 and "bad@1" not in res
    engine.fail.clear()
    await use(res, "bad@1")
    assert "bad@1" in res


async def test_cancelled_caller_does_not_cancel_the_load():
    engine = FakeEngine(delay=0.1)
    res = Residency(engine, capacity=2)
    first = asyncio.create_task(use(res, "a@1"))
    await asyncio.sleep(0.02)
    first.cancel()
    await use(res, "a@1")
    assert engine.calls == [("load", "a@1")]


async def test_reload_waits_for_pending_unload():
    engine = FakeEngine(delay=0.05)
    res = Residency(engine, capacity=1)
    await use(res, "a@1")
    # b's load evicts a while a is asked for again: a must be loaded for its request and the books must agree.
    await asyncio.gather(use(res, "b@1"), use(res, "a@1"), use(res, "b@1"), use(res, "a@1"))
    assert set(res._leases) == engine.loaded and len(engine.loaded) == 1


def test_router_prefers_resident_then_least_busy():
    e1, e2 = FakeEngine(), FakeEngine()
    b1, b2 = Backend(e1, Residency(e1, 4), up=True), Backend(e2, Residency(e2, 4), up=True)
    router = Router([b1, b2])
    b1.in_flight = 3
    assert router.choose(None) is b2
    assert router.choose("a@1") is b2
    b1.residency._leases["a@1"] = 0
    assert router.choose("a@1") is b1
    b1.up = False
    assert router.choose("a@1") is b2
    b2.up = False
    assert router.choose(None) is None


async def test_engine_restart_forgets_everything_and_old_leases_do_not_count():
    engine = FakeEngine()
    res = Residency(engine, capacity=2)
    old = asyncio.create_task(use(res, "a@1", hold=0.1))
    await asyncio.sleep(0.05)
    res.forget_all()
    engine.loaded.clear()  # the restarted engine is empty
    await use(res, "a@1")  # loads again
    await old  # finishing the request from before the restart must not release the new lease
    assert engine.calls.count(("load", "a@1")) == 2 and res._leases["a@1"] == 0


def test_admission_bounds_engine_and_tenant():
    from server.admission import Admission
    from server.protocol import APIError

    adm = Admission(per_engine=3, per_tenant=2, retry_after=7)
    b = Backend(FakeEngine(), Residency(FakeEngine(), 1), up=True)
    with adm.admit("acme", b), adm.admit("acme", b):
        with pytest.raises(APIError) as e:
            with adm.admit("acme", b):
                pass
        assert e.value.status == 429 and e.value.headers == {"Retry-After": "7"} and "tenant" in e.value.message
        with adm.admit(None, b):  # open mode: no tenant bound, the engine's still holds
            with pytest.raises(APIError, match="engine"):
                with adm.admit("globex", b):
                    pass
    assert b.in_flight == 0 and adm.tenants == {}


async def test_retire_after_a_failed_load_does_not_wait_for_other_traffic():
    """A version deleted while its load fails is retired at once, not when some other request ends."""
    engine = FakeEngine(delay=0.05, fail={"gone@1"})
    res = Residency(engine, capacity=4)
    load = asyncio.create_task(use(res, "gone@1"))
    await asyncio.sleep(0)  # the load is in flight
    retire = asyncio.create_task(res.retire("gone@1"))
    with pytest.raises(EngineError):
        await load
    await asyncio.wait_for(retire, 1)


async def test_router_passes_over_an_engine_whose_requests_fail():
    failing, healthy = (Backend(FakeEngine(), Residency(FakeEngine(), 4), up=True) for _ in range(2))
    healthy.in_flight = 3
    router = Router([failing, healthy])
    assert router.choose(None) is failing
    failing.unreachable()
    assert router.choose(None) is healthy
    failing.up = True  # its health probe passed again, but its requests failed a moment ago
    assert router.choose(None) is healthy and router.choose(None, exclude=(healthy,)) is failing
