"""The usage ledger: its record shared by replicas beside an object-store registry, and budgets held across them."""

import time

import pytest

from server.core.config import Budget
from server.core.errors import APIError
from server.tenancy.usage import usage_ledger


async def test_replicas_share_usage_and_budgets_through_the_store(s3_url, tmp_path):
    budgets = {"acme": Budget(tokens_per_day=100)}
    a, b = (usage_ledger(s3_url, tmp_path / name, budgets) for name in "ab")
    for _ in range(6):
        a.add("acme", 3, 5)  # 48 tokens
    await a.arefresh()
    await b.arefresh()
    b.check("acme")
    for _ in range(7):
        b.add("acme", 3, 5)  # 104 in all: past the budget only with both replicas' tokens
    with pytest.raises(APIError) as refused:
        b.check("acme")
    assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 1
    await b.arefresh()  # each replica's poll writes its counts and reads everyone's
    a.check("acme")  # before its own poll, replica a knows only its own 48
    await a.arefresh()
    with pytest.raises(APIError):
        a.check("acme")
    b.check("globex")  # no budget, never held
    totals = await a.totals("acme", time.time() - 3600, time.time())
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (13, 39, 65)
    assert (await usage_ledger(s3_url, tmp_path / "c", {}).totals("acme", 0, time.time()))["requests"] == 13


def test_requests_in_flight_reserve_their_bound_and_settle_to_what_they_used(tmp_path):
    ledger = usage_ledger(str(tmp_path / "registry"), tmp_path, {"acme": Budget(tokens_per_minute=200)})
    held = ledger.admit("acme", 8 * 300 + 40)  # n=8, max_tokens=300, a 40-byte request
    assert held == 2440
    for _ in range(7):  # the rest of a burst at the minute's start: the first's reservation already covers it
        with pytest.raises(APIError) as refused:
            ledger.admit("acme", 2440)
        assert refused.value.status == 429
    ledger.add("acme", 10, 20, held)  # settled to the real count: 30 of 200 used, nothing reserved
    assert ledger.admit("acme", 100) == 100 and ledger.admit("acme", 100) == 100
    with pytest.raises(APIError):
        ledger.admit("acme", 1)  # 30 used and 200 reserved
    assert ledger.admit("globex", 10 ** 9) == 0  # no budget: nothing held
