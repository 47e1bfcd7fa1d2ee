from server.residency import Residency
from server.routing import Backend, Router
from tests.helpers import FakeEngine


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


def test_router_passes_over_an_engine_whose_requests_fail():
    failing, healthy = (Backend(FakeEngine(), Residency(FakeEngine(), 4), up=True) for _ in range(2))
    healthy.in_flight = 3
    router = Router([failing, healthy])
    assert router.choose(None) is failing
    failing.unreachable()
    assert router.choose(None) is healthy
    failing.up = True  # its health probe passed again, but its requests failed a moment ago
    assert router.choose(None) is healthy and router.choose(None, exclude=(healthy,)) is failing

