from collections import Counter

from server.engine.routing import Backend, Router, rank
from tests.helpers.in_process import FakeEngine

KEYS = [f"tenant{i}@{i % 7 + 1}" for i in range(2000)]


def backends(n: int, start: int = 0) -> list[Backend]:
    return [Backend(FakeEngine(f"http://engine-{i}:8000"), up=True) for i in range(start, start + n)]


def homes(router: Router) -> dict[str, str]:
    return {k: router.choose(k).engine.url for k in KEYS}


def test_every_gateway_sends_a_version_to_the_same_engine():
    """Two routers built apart (two gateway replicas), engines listed in another order, agree on every version."""
    first, second = Router(backends(8)), Router(list(reversed(backends(8))))
    assert homes(first) == homes(second)


def test_versions_spread_evenly_over_the_engines():
    shares = Counter(homes(Router(backends(8))).values())
    assert len(shares) == 8 and max(shares.values()) / (len(KEYS) / 8) < 1.2


def test_an_engine_joining_or_leaving_moves_only_its_share():
    before = homes(Router(backends(8)))
    joined = homes(Router(backends(9)))
    moved = [k for k in KEYS if before[k] != joined[k]]
    assert all(joined[k] == "http://engine-8:8000" for k in moved)
    assert 0.5 * len(KEYS) / 9 < len(moved) < 1.5 * len(KEYS) / 9
    left = homes(Router([b for b in backends(8) if b.engine.url != "http://engine-3:8000"]))
    assert [k for k in KEYS if before[k] != left[k]] == [k for k in KEYS if before[k] == "http://engine-3:8000"]


def test_a_hot_version_spreads_over_more_engines_as_its_traffic_grows():
    """Requests that stay in flight, so each choice sees the load of the ones before: a version with most of the
    traffic uses several engines in its ranking order; one with a small share stays on its first."""
    router = Router(backends(8))
    ranking = {k: sorted(router.backends, key=lambda b: -rank(k, b.engine.url)) for k in ("hot@1", "cold@1")}
    used = {"hot@1": set(), "cold@1": set()}
    for i in range(400):
        key = "cold@1" if i % 40 == 0 else "hot@1"  # 2.5% of the traffic: less than a quarter of one engine's
        b = router.choose(key)
        b.in_flight += 1
        used[key].add(b)
    assert used["cold@1"] == {ranking["cold@1"][0]}
    assert len(used["hot@1"]) >= 4 and set(ranking["hot@1"][:len(used["hot@1"])]) == used["hot@1"]


def test_an_engine_past_the_load_bound_passes_requests_down_the_ranking():
    router = Router(backends(4), load_factor=2.0)
    key = "tail@1"
    first, second = sorted(router.backends, key=lambda b: -rank(key, b.engine.url))[:2]
    for b in router.backends:
        b.in_flight = 10
    first.in_flight = 30  # past twice the mean of the others
    assert router.choose(key) is second
    first.in_flight = 10
    assert router.choose(key) is first


def test_the_base_model_goes_to_the_least_busy_engine_and_down_engines_to_none():
    b1, b2 = backends(2)
    router = Router([b1, b2])
    b1.in_flight = 3
    assert router.choose(None) is b2
    b2.up = False
    assert router.choose(None) is b1 and router.choose("a@1") is b1
    b1.up = False
    assert router.choose(None) is None and router.choose("a@1") is None


def test_router_passes_over_an_engine_whose_requests_fail():
    failing, healthy = backends(2)
    healthy.in_flight = 3
    router = Router([failing, healthy])
    assert router.choose(None) is failing
    failing.unreachable()
    assert router.choose(None) is healthy
    failing.up = True  # its health probe passed again, but its requests failed a moment ago
    assert router.choose(None) is healthy and router.choose(None, exclude=(healthy,)) is failing
    for k in KEYS[:50]:
        assert router.choose(k) is healthy  # whatever the ranking, while it fails
