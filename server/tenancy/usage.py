"""Per-tenant usage: requests and tokens by minute, in a durable record every gateway replica shares (SQLite in
STATE_DIR beside a directory registry; objects beside an object-store registry), and the token budgets read from it.

The request path never waits on the record: completed requests are written by one thread of the ledger's own, and
budgets are checked against counts kept in memory, which this gateway's requests raise at once and a refresh every
REGISTRY_POLL seconds brings up to what every replica wrote."""

import asyncio
import json
import sqlite3
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from server.core.config import Budget
from server.core.errors import APIError
from server.core.periodic import every
from server.store.documents import SHARED
from server.store.location import is_object_store
from server.store.streams import stream_id

USAGE_PREFIX = f"{SHARED}/usage/"
FIELDS = ("requests", "prompt_tokens", "completion_tokens")


def minute_of(t: float) -> int:
    return int(t // 60)


class SqliteRecord:
    """Usage rows (tenant, minute) in STATE_DIR/usage.db; WAL, so replicas on one state directory share it."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS usage (tenant TEXT, minute INTEGER, requests INTEGER, "
                        "prompt_tokens INTEGER, completion_tokens INTEGER, PRIMARY KEY (tenant, minute))")

    def add(self, tenant: str, minute: int, counts: tuple[int, int, int]) -> None:
        self.db.execute("INSERT INTO usage VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, minute) DO UPDATE SET "
                        "requests = requests + excluded.requests, prompt_tokens = prompt_tokens + "
                        "excluded.prompt_tokens, completion_tokens = completion_tokens + excluded.completion_tokens",
                        (tenant, minute, *counts))

    def minutes(self, tenant: str, first: int, last: int) -> dict[int, tuple[int, int, int]]:
        rows = self.db.execute("SELECT minute, requests, prompt_tokens, completion_tokens FROM usage "
                               "WHERE tenant = ? AND minute BETWEEN ? AND ?", (tenant, first, last))
        return {minute: tuple(counts) for minute, *counts in rows}

    def flush(self) -> None:
        """Each add is committed as it is made."""


class StoreRecord:
    """Usage beside an object-store registry: per process and minute one object of that process's counts
    (`_loraplex/usage/TENANT/MINUTE/STREAM.json`), rewritten as the minute goes on; no two writers share a key."""

    def __init__(self, registry: str):
        from server.store.bucket import Bucket  # imports boto3, which a directory registry never needs

        self.store = Bucket(registry)
        self.stream = stream_id()
        self._mine: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0])
        self._dirty: set[tuple[str, int]] = set()

    def add(self, tenant: str, minute: int, counts: tuple[int, int, int]) -> None:
        mine = self._mine[(tenant, minute)]
        for i, n in enumerate(counts):
            mine[i] += n
        self._dirty.add((tenant, minute))
        if len(self._dirty) > 1 or minute_of(time.time()) > minute:
            self.flush()

    def flush(self) -> None:
        for tenant, minute in sorted(self._dirty):
            counts = dict(zip(FIELDS, self._mine[(tenant, minute)]))
            self.store.put(f"{USAGE_PREFIX}{tenant}/{minute:010d}/{self.stream}.json", json.dumps(counts).encode())
        self._dirty.clear()
        now = minute_of(time.time())
        for key in [k for k in self._mine if k[1] < now - 1]:
            del self._mine[key]  # written for good; only the last two minutes can still grow

    def minutes(self, tenant: str, first: int, last: int) -> dict[int, tuple[int, int, int]]:
        totals: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
        for key, _ in self.store.keys(f"{USAGE_PREFIX}{tenant}/"):
            minute = int(key[len(USAGE_PREFIX) + len(tenant) + 1:].split("/", 1)[0])
            got = self.store.get(key) if first <= minute <= last else None
            if got is not None:
                for i, field in enumerate(FIELDS):
                    totals[minute][i] += json.loads(got[0])[field]
        return {minute: tuple(counts) for minute, counts in totals.items()}


class UsageLedger:
    def __init__(self, record: SqliteRecord | StoreRecord, budgets: dict[str, Budget]):
        self.record, self.budgets = record, budgets
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage")
        self._tokens: dict[str, dict[int, int]] = defaultdict(dict)  # budgeted tenant -> minute -> tokens, today
        self._held: dict[str, int] = defaultdict(int)  # budgeted tenant -> tokens reserved by requests in flight

    def admit(self, tenant: str | None, bound: int, whole: bool = False) -> int:
        """Admits a request that may use up to `bound` tokens, or refuses it (429) when its tenant's tokens used and
        reserved have reached a budget, or with `whole` (an evaluation, whose bound can be millions) when the bound
        does not fit in what is left; returns the tokens reserved (0 for a tenant without a budget)."""
        if tenant is None or tenant not in self.budgets:
            return 0
        self.check(tenant, bound if whole else 0)
        self._held[tenant] += bound
        return bound

    def add(self, tenant: str, prompt_tokens: int, completion_tokens: int, held: int = 0, requests: int = 1) -> None:
        """Counts finished requests (0: one refused, which releases only what it reserved) and their tokens;
        written by the ledger's thread, counted against budgets at once."""
        minute = minute_of(time.time())
        if tenant in self.budgets:
            tokens = self._tokens[tenant]
            tokens[minute] = tokens.get(minute, 0) + prompt_tokens + completion_tokens
            self._held[tenant] -= held
        if requests or prompt_tokens or completion_tokens:
            self._writer.submit(self.record.add, tenant, minute, (requests, prompt_tokens, completion_tokens))

    def check(self, tenant: str | None, more: int = 0) -> None:
        """Refuses a request of a tenant whose tokens used in this minute or day, with those reserved by its
        requests in flight, have reached its budget, or would pass it by `more`: 429."""
        budget = self.budgets.get(tenant) if tenant else None
        if budget is None:
            return
        now = time.time()
        tokens, held = self._tokens[tenant], self._held[tenant]
        day_start = minute_of(now - now % 86400)
        windows = ((budget.tokens_per_minute, minute_of(now), 60 - now % 60, "minute"),
                   (budget.tokens_per_day, day_start, 86400 - now % 86400, "day"))
        for limit, first, wait, what in windows:
            spent = held + sum(n for m, n in tokens.items() if m >= first)
            if limit is not None and (spent >= limit or spent + more > limit):
                retry = max(1, int(wait + 0.999))
                why = f"up to {more} more tokens would pass" if more else "has used or reserved"
                raise APIError(429, f"tenant {tenant!r} {why} its budget of {limit} tokens per {what}; retry after "
                                    f"{retry} s", type="rate_limit_error", code="token_budget_exceeded",
                               headers={"Retry-After": str(retry)})

    async def keep_current(self, poll: float) -> None:
        """Brings the budgeted tenants' counts up to every replica's every `poll` seconds."""
        await every(poll, self.arefresh, "reading the usage record failed; budgets count from the last reading")

    async def arefresh(self) -> None:
        """Brings the budgeted tenants' counts for today up to what every replica wrote, on the ledger's thread."""
        await asyncio.get_running_loop().run_in_executor(self._writer, self._refresh)

    def _refresh(self) -> None:
        now = time.time()
        self.record.flush()
        first, last = minute_of(now - now % 86400), minute_of(now)
        for tenant in self.budgets:
            shared = {m: c[1] + c[2] for m, c in self.record.minutes(tenant, first, last).items()}
            local = self._tokens[tenant]
            # What this gateway added since the read is in both or only here: never count less than either.
            self._tokens[tenant] = {m: max(shared.get(m, 0), local.get(m, 0)) for m in {*shared, *local} if m >= first}

    async def totals(self, tenant: str, since: float, until: float) -> dict:
        """Requests and tokens of `tenant` in the minutes from `since` to `until`, every completed request in."""
        def read() -> dict:
            self.record.flush()
            counts = self.record.minutes(tenant, minute_of(since), minute_of(until))
            sums = [sum(c[i] for c in counts.values()) for i in range(3)]
            return {"tenant": tenant, "since": since, "until": until, **dict(zip(FIELDS, sums))}

        return await asyncio.get_running_loop().run_in_executor(self._writer, read)


def usage_ledger(registry: str, state_dir: Path, budgets: dict[str, Budget]) -> UsageLedger:
    shared = is_object_store(registry)
    return UsageLedger(StoreRecord(registry) if shared else SqliteRecord(Path(state_dir) / "usage.db"), budgets)
