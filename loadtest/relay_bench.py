"""The gateway's own CPU per streamed request, against a stub engine that computes nothing.

The stub answers every completion with 32 token events, a usage event and [DONE], 5 ms apart, so what is
measured is the gateway's relay alone: CPU seconds of the `loraplex serve` process per request, one request
at a time and at 32 concurrent streams. Run: `python -m loadtest.relay_bench`.
"""

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from loadtest.servers import Gateway
from server.engine.process import free_port

TOKENS = 32  # events per answer, as `python -m loadtest.stub_engine` streams by default


async def measure(url: str, pid: int, requests: int, concurrency: int) -> dict:
    gateway = psutil.Process(pid)
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        async def one():
            async with gate:
                start = time.perf_counter()
                async with session.post(f"{url}/v1/completions",
                                        json={"prompt": "Ada", "max_tokens": TOKENS, "stream": True}) as r:
                    if r.status != 200:
                        raise RuntimeError(f"gateway answered {r.status}: {await r.text()}")
                    async for _ in r.content:
                        pass
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(one() for _ in range(min(requests, 20))))  # warm the pools up
        latencies.clear()
        cpu0, t0 = sum(gateway.cpu_times()[:2]), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        cpu1, t1 = sum(gateway.cpu_times()[:2]), time.perf_counter()
    latencies.sort()
    return {"concurrency": concurrency, "requests": requests,
            "gateway_cpu_ms_per_request": 1000 * (cpu1 - cpu0) / requests,
            "e2e_p50_ms": 1000 * latencies[len(latencies) // 2], "wall_s": t1 - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default="models/demo-base", help="read for its config only; never loaded")
    p.add_argument("--requests", type=int, default=640)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    stub_port = free_port()
    stub = subprocess.Popen([sys.executable, "-m", "loadtest.stub_engine", "--port", str(stub_port)])
    work = Path(tempfile.mkdtemp(prefix="loraplex-relay-"))
    gateway = None
    try:
        gateway = Gateway({"LORAPLEX_ENGINE_URLS": f"http://127.0.0.1:{stub_port}",
                           "LORAPLEX_BASE_MODEL": args.base_model, "LORAPLEX_REGISTRY": str(work / "adapters"),
                           "LORAPLEX_STATE_DIR": str(work / "state"), "LORAPLEX_LOG_LEVEL": "warning"},
                          work / "gateway.log", timeout=60)
        for concurrency, requests in ((1, max(args.requests // 8, 20)), (32, args.requests)):
            runs = [asyncio.run(measure(gateway.url, gateway.proc.pid, requests, concurrency))
                    for _ in range(args.repeats)]
            cpu = sorted(r["gateway_cpu_ms_per_request"] for r in runs)
            print(f"concurrency {concurrency}: gateway CPU per request {cpu[len(cpu) // 2]:.2f} ms (median of "
                  f"{[round(c, 2) for c in cpu]}), e2e p50 {runs[0]['e2e_p50_ms']:.1f} ms")
    finally:
        if gateway is not None:
            gateway.stop()
        stub.terminate()
        stub.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
