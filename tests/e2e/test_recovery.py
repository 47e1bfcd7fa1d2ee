"""The engine dies under the gateway: it reports not ready, answers 503 fast, restarts it, and serves again."""

import os
import re
import signal
import time

import httpx

from tests.helpers.calls import PROMPTS, complete, series
from tests.helpers.e2e import ADMIN_AUTH


def test_engine_crash_is_survived(server, client):
    before = complete(client, PROMPTS[0], adapter="alpha@1")["choices"][0]["token_ids"]
    pid = int(re.findall(r"\(APIServer pid=(\d+)\)", server.log.read_text())[-1])
    os.killpg(pid, signal.SIGKILL)  # the engine and its workers, as an OOM kill would
    deadline = time.monotonic() + 15
    while client.get("/ready").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get("/ready").status_code == 503
    t0 = time.monotonic()
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "adapter": "alpha@1"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    assert time.monotonic() - t0 < 2
    assert client.get("/health").status_code == 200
    deadline = time.monotonic() + 300
    while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert client.get("/ready").status_code == 200, server.log.read_text()[-3000:]
    after = complete(client, PROMPTS[0], adapter="alpha@1")["choices"][0]["token_ids"]
    assert after == before  # reloaded on demand into the new engine
    metrics = client.get("/metrics", headers=ADMIN_AUTH).text
    assert series(metrics, "loraplex_engine_restarts_total", engine="0") == [1.0]
    assert series(metrics, "loraplex_engine_up", engine="0") == [1.0]
    assert httpx.get(f"{server.engine_url()}/health").status_code == 200
