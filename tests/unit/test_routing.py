from collections import Counter

from server.routing import Backend, Router, rank
from tests.helpers import FakeEngine

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


def test_a_hot_version_spills_to_the_next_engines_in_its_ranking_under_the_load_bound():
    router = Router(backends(4), load_factor=1.25)
    hot = "hot@1"
    ranking = sorted(router.backends, key=lambda b: -rank(hot, b.engine.url))
    chosen = []
    for _ in range(40):  # requests that stay in flight: each choice sees the load of the ones before
        b = router.choose(hot)
        b.in_flight += 1
        chosen.append(b)
    loads = [b.in_flight for b in router.backends]
    assert max(loads) <= 1.25 * (sum(loads) / len(loads)) + 1
    assert chosen[0] is ranking[0] and chosen.count(ranking[0]) == max(loads)
    for b in router.backends:
        b.in_flight = 0
    assert router.choose(hot) is ranking[0]  # back home once the load is gone


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
