import asyncio

import pytest

from server.engine_client import EngineError
from server.residency import Residency
from tests.helpers import FakeEngine


async def use(res: Residency, key: str, entered: asyncio.Event | None = None,
              release: asyncio.Event | None = None) -> None:
    """One request on `key`: holds the lease until `release` is set, telling `entered` once it holds it."""
    async with res.lease(key, f"/r/{key}"):
        assert key in res.engine.loaded
        if entered:
            entered.set()
        if release:
            await release.wait()


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
    entered, release = asyncio.Event(), asyncio.Event()
    long_request = asyncio.create_task(use(res, "a@1", entered, release))
    await entered.wait()
    await use(res, "a@2")  # a new version arrives while the old one is still serving
    assert "a@1" in engine.loaded and not long_request.done()
    release.set()
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
    engine = FakeEngine(gated=True)
    res = Residency(engine, capacity=2)
    first = asyncio.create_task(use(res, "a@1"))
    await engine.loading.wait()
    first.cancel()
    engine.gate.set()
    await use(res, "a@1")
    assert engine.calls == [("load", "a@1")]


async def test_reload_waits_for_pending_unload():
    engine = FakeEngine(delay=0.05)
    res = Residency(engine, capacity=1)
    await use(res, "a@1")
    # b's load evicts a while a is asked for again: a must be loaded for its request and the books must agree.
    await asyncio.gather(use(res, "b@1"), use(res, "a@1"), use(res, "b@1"), use(res, "a@1"))
    assert set(res._leases) == engine.loaded and len(engine.loaded) == 1


async def test_engine_restart_forgets_everything_and_old_leases_do_not_count():
    engine = FakeEngine()
    res = Residency(engine, capacity=2)
    entered, release = asyncio.Event(), asyncio.Event()
    old = asyncio.create_task(use(res, "a@1", entered, release))
    await entered.wait()
    res.forget_all()
    engine.loaded.clear()  # the restarted engine is empty
    await use(res, "a@1")  # loads again
    release.set()
    await old  # finishing the request from before the restart must not release the new lease
    assert engine.calls.count(("load", "a@1")) == 2 and res._leases["a@1"] == 0


async def test_retire_after_a_failed_load_does_not_wait_for_other_traffic():
    """A version deleted while its load fails is retired at once, not when some other request ends."""
    engine = FakeEngine(fail={"gone@1"}, gated=True)
    res = Residency(engine, capacity=4)
    load = asyncio.create_task(use(res, "gone@1"))
    await engine.loading.wait()
    retire = asyncio.create_task(res.retire("gone@1"))
    engine.gate.set()
    with pytest.raises(EngineError):
        await load
    await asyncio.wait_for(retire, 1)
