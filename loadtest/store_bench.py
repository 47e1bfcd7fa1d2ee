"""The completion store's write rate and list latency: a fresh SqliteStore filled with one tenant's records (varied
models, keys and metadata) in batches of 256 as the record writer sends them, then filtered lists (limit 20) timed,
the median of several; with --s3, the same for S3Store on that location (AWS_ENDPOINT_URL etc. from the environment)
with fewer records.

    .venv/bin/python -m loadtest.store_bench [--records 100000] [--s3 s3://BUCKET/PREFIX] [--s3-records 2000]
"""

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from server.data import CompletionRecord, CompletionStore, ListQuery

TENANT = "bench"
BATCH = 256
T0_MS = 1_700_000_000_000
MODELS = [f"support-{i}@stable" for i in range(8)]
KEYS = [f"key{i:02d}" for i in range(20)]
TOPICS = [f"topic-{i}" for i in range(10)]
CUSTOMERS = 1000


def make_records(count: int, seed: int = 0) -> list[CompletionRecord]:
    """`count` records of one tenant, 5 ms apart, a tenth of them completions, with ids as the gateway makes them."""
    rng = random.Random(seed)
    records = []
    for n in range(count):
        ms = T0_MS + 5 * n
        route = "completions" if n % 10 == 9 else "chat.completions"
        prefix = "cmpl-" if route == "completions" else "chatcmpl-"
        question = " ".join(rng.choice(["order", "refund", "late", "parcel", "invoice", "where", "my"])
                            for _ in range(30))
        records.append(CompletionRecord(
            id=f"{prefix}{ms:011x}{rng.getrandbits(64):016x}", tenant=TENANT, key_id=rng.choice(KEYS), route=route,
            model=rng.choice(MODELS), version="support@3", created=ms / 1000,
            request={"messages": [{"role": "system", "content": "You answer support tickets."},
                                  {"role": "user", "content": question}], "max_tokens": 128},
            response={"choices": [{"index": 0, "message": {"role": "assistant", "content": question[::-1]},
                                   "finish_reason": "stop"}]},
            request_id=f"req-{n}", user=f"user-{rng.randrange(500)}",
            metadata={"topic": rng.choice(TOPICS), "customer": f"c{rng.randrange(CUSTOMERS)}",
                      "env": rng.choice(["prod", "staging"])},
            usage={"prompt_tokens": 60, "completion_tokens": 40, "total_tokens": 100},
            timings={"first_token": 0.05, "total": 0.4}))
    return records


def fill(store: CompletionStore, records: list[CompletionRecord]) -> float:
    """Records per second of `add` in batches of BATCH, with their ledger entries."""
    started = time.perf_counter()
    for start in range(0, len(records), BATCH):
        batch = records[start:start + BATCH]
        store.add(batch, [r.ledger for r in batch])
    return len(records) / (time.perf_counter() - started)


def queries(records: list[CompletionRecord]) -> dict[str, ListQuery]:
    """The lists timed: unfiltered, by each filter, and each from the middle (`after`), ascending and not."""
    chat = [r for r in records if r.route == "chat.completions"]
    middle = chat[len(chat) // 2]
    rare = chat[len(chat) // 3].metadata["customer"]
    return {
        "all": ListQuery(),
        "all, desc": ListQuery(order="desc"),
        "model": ListQuery(model=MODELS[3]),
        "model, after": ListQuery(model=MODELS[3], after=middle.id),
        "model, after, desc": ListQuery(model=MODELS[3], after=middle.id, order="desc"),
        "metadata (1 in 10)": ListQuery(metadata={"topic": TOPICS[4]}),
        "metadata (1 in 10), after": ListQuery(metadata={"topic": TOPICS[4]}, after=middle.id),
        f"metadata (1 in {CUSTOMERS})": ListQuery(metadata={"customer": rare}),
        "two metadata pairs": ListQuery(metadata={"topic": TOPICS[4], "env": "prod"}),
        # the worst case: the first pair, which drives the list, matches half the records and the second few
        "two pairs, the first common": ListQuery(metadata={"env": "prod", "customer": rare}),
        "key": ListQuery(key_id=KEYS[7]),
        "key, after": ListQuery(key_id=KEYS[7], after=middle.id),
        "key and model": ListQuery(key_id=KEYS[7], model=MODELS[3]),
        "completions route": ListQuery(route="completions"),
    }


def median_ms(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def bench(label: str, store: CompletionStore, count: int, repeats: int) -> None:
    """Fills `store` with `count` records and prints the write rate and each list's median time."""
    records = make_records(count)
    print(f"\n{label}: {count} records of one tenant")
    print(f"  add, batches of {BATCH}: {fill(store, records):,.0f} records/s")
    for name, query in queries(records).items():
        found, more = store.page(TENANT, query)
        ms = median_ms(lambda: store.page(TENANT, query), repeats)
        print(f"  list {name:<32} {ms:8.2f} ms  ({len(found)} records, has_more={more})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--s3", help="s3://BUCKET/PREFIX to bench S3Store on as well (a fresh prefix)")
    parser.add_argument("--s3-records", type=int, default=2_000)
    args = parser.parse_args()
    from server.data.sqlite_store import SqliteStore

    with tempfile.TemporaryDirectory() as work:
        bench("SqliteStore", SqliteStore(Path(work) / "completions.sqlite3"), args.records, args.repeats)
    if args.s3:
        from server.data.s3_store import S3Store

        bench(f"S3Store on {args.s3}", S3Store(args.s3), args.s3_records, max(3, args.repeats // 2))


if __name__ == "__main__":
    main()
