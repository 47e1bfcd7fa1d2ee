"""What capture costs: gateway CPU per request and latency with `capture on` against `off`, in one run, over a
stand-in engine that computes nothing (so the gateway's own work is what is measured); and the records per second
one gateway's record writer sustains with no drops, on the directory store (SQLite) and on SeaweedFS.

    .venv/bin/python -m loadtest.capture_bench [--requests 400] [--rounds 3] [--records 20000]

Two tenants with their own keys share one gateway: one's policy stores everything, the other's nothing; rounds of
the same requests (chat, half streamed, 16-token answers, 8 at a time) alternate between them, the order flipped
every round. Writes loadtest/results/capture.md."""

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from loadtest.servers import LOADER, Gateway, ObjectStore
from server.engine.process import free_port

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "loadtest" / "results" / "capture.md"
TOKENS = 16


def cli(env: dict, *args: str) -> str:
    return subprocess.run([LOADER, *args], env=env, check=True, capture_output=True, text=True).stdout


async def round_of(url: str, key: str, pid: int, requests: int, concurrency: int = 8) -> tuple[float, list[float]]:
    """Gateway CPU seconds per request, and each request's latency, for one round of one tenant's requests."""
    gate, latencies, gateway = asyncio.Semaphore(concurrency), [], psutil.Process(pid)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            body = {"model": "demo-base", "messages": [{"role": "user", "content": f"Question {i}: where is ana@x.io"}],
                    "max_tokens": TOKENS, "stream": i % 2 == 0, "metadata": {"n": str(i % 7)}}
            async with gate:
                start = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
                    async for _ in r.content:
                        pass
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(one(i) for i in range(16)))  # warm up
        latencies.clear()
        before = sum(gateway.cpu_times()[:2])
        await asyncio.gather(*(one(i) for i in range(requests)))
        return (sum(gateway.cpu_times()[:2]) - before) / requests, latencies


def overhead(work: Path, requests: int, rounds: int) -> dict:
    stub_port = free_port()
    stub = subprocess.Popen([sys.executable, "-m", "loadtest.stub_engine", "--port", str(stub_port), "--tokens",
                             str(TOKENS), "--gap", "0"])
    env = {**os.environ, "LORAPLEX_BASE_MODEL": str(ROOT / "models" / "demo-base"),
           "LORAPLEX_REGISTRY": str(work / "registry"), "LORAPLEX_STATE_DIR": str(work / "state"),
           "LORAPLEX_ENGINE_URLS": f"http://127.0.0.1:{stub_port}"}
    keys = {t: cli(env, "keys", "create", "--tenant", t).split()[-1] for t in ("on", "off")}
    cli(env, "tenants", "policy", "on", "--capture", "on", "--redact", "email")
    gateway = Gateway(env, work / "gateway.log", timeout=120)
    cpu, lat = {"on": [], "off": []}, {"on": [], "off": []}
    try:
        for r in range(rounds):
            for tenant in (("on", "off") if r % 2 == 0 else ("off", "on")):
                seconds, latencies = asyncio.run(round_of(gateway.url, keys[tenant], gateway.proc.pid, requests))
                cpu[tenant].append(seconds)
                lat[tenant] += latencies
    finally:
        gateway.stop()
        stub.terminate()
    return {"cpu_ms": {t: 1000 * statistics.median(v) for t, v in cpu.items()},
            "p50_ms": {t: 1000 * statistics.median(v) for t, v in lat.items()}}


def writer_rate(store, records: int) -> tuple[float, int]:
    """Records per second the writer stores (building each record from its raw request and answer, as the
    gateway's writer does), and how many it dropped, with a queue deep enough for all of them."""
    from server.data.writer import RecordWriter

    dropped: list[int] = []
    writer = RecordWriter(store, capacity=records + 1, dropped=dropped.append)
    items = [_pending(i) for i in range(records)]
    start = time.perf_counter()
    for item in items:
        writer.put(item)
    writer.close(timeout=3600)
    return records / (time.perf_counter() - start), sum(dropped)


def _pending(i: int):
    from server.data.records import CompletionRecord, new_answer_id

    class Pending:
        built = None

        @property
        def ledger(self):
            return self.record().ledger

        def record(self):
            self.built = self.built or self._build()
            return self.built

        def _build(self):
            return CompletionRecord(
                id=f"chatcmpl-{new_answer_id()}", tenant="acme", key_id="key-1", route="chat.completions", model="bot@stable",
                version="bot@3", created=time.time(), request_id=f"r{i}", user=f"user-{i % 50}",
                request={"messages": [{"role": "user", "content": f"question {i} " * 20}], "max_tokens": 64},
                response={"choices": [{"index": 0, "message": {"role": "assistant", "content": "answer " * 40}}]},
                metadata={"n": str(i % 7)}, usage={"prompt_tokens": 40, "completion_tokens": 64})

    return Pending()


def report(over: dict, rates: dict) -> str:
    cpu, p50 = over["cpu_ms"], over["p50_ms"]
    lines = ["# Capture: what storing completions costs", "",
             f"`python -m loadtest.capture_bench` on {platform.node()} ({os.cpu_count()} cores): one gateway over "
             f"the stand-in engine, chat requests of {TOKENS} tokens (half streamed), 8 at a time, tenants with "
             "capture on (redacting e-mail) and off in alternating rounds.", "",
             "| measure | capture off | capture on | on / off |", "|---|---|---|---|",
             f"| gateway CPU per request (ms) | {cpu['off']:.3f} | {cpu['on']:.3f} | {cpu['on'] / cpu['off']:.3f} |",
             f"| latency p50 (ms) | {p50['off']:.2f} | {p50['on']:.2f} | +{p50['on'] - p50['off']:.2f} ms |", "",
             "| store | records/s the writer sustains | dropped |", "|---|---|---|"]
    lines += [f"| {name} | {rate:,.0f} | {dropped} |" for name, (rate, dropped) in rates.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--s3-records", type=int, default=1_000)
    args = parser.parse_args()
    from server.data.sqlite_store import SqliteStore

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        over = overhead(work, args.requests, args.rounds)
        rates = {"directory (SQLite)": writer_rate(SqliteStore(work / "bench.sqlite3"), args.records)}
        rates["object store (SeaweedFS, same machine)"] = _s3_rate(work, args.s3_records)
    text = report(over, rates)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(text)


def _s3_rate(work: Path, records: int) -> tuple[float, int]:
    import boto3

    store = ObjectStore(work / "weed", work / "weed.log")
    saved = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    try:
        boto3.client("s3").create_bucket(Bucket="capture-bench")
        from server.data.s3_store import S3Store

        return writer_rate(S3Store("s3://capture-bench/records"), records)
    finally:
        store.stop()
        os.environ.update({k: v for k, v in saved.items() if v is not None})


if __name__ == "__main__":
    main()
