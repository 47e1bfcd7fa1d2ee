import asyncio
import http.client
import json
import re
import shutil
import time

import httpx
import pytest

from tests.helpers.calls import CHATS, MAX_TOKENS, PROMPTS, chat, complete, same, streamed_text
from tests.helpers.e2e import ENGINE_AUTH
from tests.helpers.polling import wait_until

def test_health_answers_before_ready(server):
    assert server.startup[0][0] == 200
    assert any(ready == 503 for _, ready in server.startup), server.startup


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_completions_equal_peft(client, server, reference, name):
    for prompt in PROMPTS:
        got = complete(client, prompt, adapter=f"{name}@1")
        assert got["model"] == f"{name}@1"
        assert got["usage"]["completion_tokens"] > 0
        assert same(got["choices"][0], reference.complete(server.adapter_dirs[name], prompt, MAX_TOKENS))


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_chat_equals_peft(client, server, reference, name):
    for messages in CHATS:
        got = chat(client, messages, adapter=name)
        assert same(got["choices"][0], reference.chat(server.adapter_dirs[name], messages, MAX_TOKENS))


def test_base_answers_without_adapter_and_differs(client, server, reference):
    for prompt in PROMPTS:
        base = complete(client, prompt)["choices"][0]
        assert same(base, reference.complete(None, prompt, MAX_TOKENS))
        for name in ("alpha", "beta"):
            assert complete(client, prompt, adapter=f"{name}@1")["choices"][0]["token_ids"] != base["token_ids"]
    base_model = complete(client, PROMPTS[0], model=server.env["LORAPLEX_BASE_MODEL"].rsplit("/", 1)[-1])
    assert base_model["choices"][0]["text"] == complete(client, PROMPTS[0])["choices"][0]["text"]


def test_model_field_names_adapter(client, server, reference):
    got = complete(client, PROMPTS[1], model="beta@1")
    assert got["model"] == "beta@1"
    assert same(got["choices"][0], reference.complete(server.adapter_dirs["beta"], PROMPTS[1], MAX_TOKENS))
    # `adapter` wins over `model`
    assert complete(client, PROMPTS[1], model="alpha", adapter="beta@1")["model"] == "beta@1"


@pytest.mark.parametrize("adapter", [None, "alpha@1", "beta"])
def test_stream_equals_non_stream(client, adapter):
    extra = {"adapter": adapter} if adapter else {}
    for prompt in PROMPTS[:2]:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
        assert streamed_text(client, "/v1/completions", body) == complete(client, prompt, **extra)["choices"][0]["text"]
    body = {"messages": CHATS[0], "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    assert streamed_text(client, "/v1/chat/completions", body) == \
        chat(client, CHATS[0], **extra)["choices"][0]["message"]["content"]


def test_openai_client(server, reference):
    import openai

    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    base_name = server.env["LORAPLEX_BASE_MODEL"].rsplit("/", 1)[-1]
    c = oa.completions.create(model=base_name, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                              extra_body={"adapter": "alpha@1", "return_token_ids": True})
    assert same(c.choices[0].model_dump(), reference.complete(server.adapter_dirs["alpha"], PROMPTS[0], MAX_TOKENS))
    assert c.usage.completion_tokens > 0
    ch = oa.chat.completions.create(model=base_name, messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"adapter": "beta@1", "return_token_ids": True})
    assert same(ch.choices[0].model_dump(), reference.chat(server.adapter_dirs["beta"], CHATS[0], MAX_TOKENS))
    stream = oa.chat.completions.create(model="beta@1", messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0,
                                        stream=True)
    assert "".join(ev.choices[0].delta.content or "" for ev in stream if ev.choices) == ch.choices[0].message.content
    models = {m.id for m in oa.models.list()}
    assert {base_name, "alpha", "beta"} <= models
    with pytest.raises(openai.NotFoundError) as e:
        oa.completions.create(model=base_name, prompt="x", extra_body={"adapter": "ghost"})
    assert e.value.code == "adapter_not_found"


def test_adapter_added_while_running_is_served(client, server, reference):
    r = client.post("/v1/completions", json={"prompt": "x", "adapter": "gamma"})
    assert r.status_code == 404
    cli = server.cli("adapters", "add", "gamma", str(server.adapter_dirs["gamma"]))
    assert cli.returncode == 0, cli.stderr
    got = complete(client, PROMPTS[0], adapter="gamma")
    assert got["model"] == "gamma@1"
    assert same(got["choices"][0], reference.complete(server.adapter_dirs["gamma"], PROMPTS[0], MAX_TOKENS))
    # A second version: the bare name moves to it, the first version still answers as before.
    assert server.cli("adapters", "add", "gamma", str(server.adapter_dirs["beta"])).returncode == 0
    # Added outside the gateway: the bare name moves with the gateway's next reading of the registry (REGISTRY_POLL).
    assert wait_until(lambda: complete(client, PROMPTS[0], 1, adapter="gamma")["model"] == "gamma@2", timeout=2)
    v2 = complete(client, PROMPTS[0], adapter="gamma")
    assert v2["model"] == "gamma@2"
    assert same(v2["choices"][0], reference.complete(server.adapter_dirs["beta"], PROMPTS[0], MAX_TOKENS))
    assert complete(client, PROMPTS[0], adapter="gamma@1")["choices"][0]["token_ids"] == got["choices"][0]["token_ids"]


def test_alias_resolves(client, server):
    from server.registry.directory import DirectoryRegistry

    DirectoryRegistry(server.env["LORAPLEX_REGISTRY"]).set_alias("beta", "stable", 1)
    assert complete(client, PROMPTS[0], adapter="beta@stable")["model"] == "beta@1"
    r = client.post("/v1/completions", json={"prompt": "x", "adapter": "beta@canary"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


@pytest.fixture(scope="module")
def third(server) -> str:
    """A third adapter registered here, so no test depends on another having registered one."""
    r = server.cli("adapters", "add", "third", str(server.adapter_dirs["gamma"]))
    assert r.returncode == 0, r.stderr
    return "third@1"


async def test_concurrent_first_requests_all_succeed_with_equal_output(server, third):
    """Many first requests for versions not resident race the load and the LRU; all must answer the same."""
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
        async def one(adapter):
            r = await ac.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0,
                                                       "adapter": adapter})
            assert r.status_code == 200, r.text
            return adapter, r.json()["choices"][0]["text"]

        results = await asyncio.gather(*(one(a) for a in ["alpha@1", "beta@1", third] * 4))
    by_adapter = {}
    for adapter, text in results:
        by_adapter.setdefault(adapter, set()).add(text)
    assert all(len(texts) == 1 for texts in by_adapter.values()), by_adapter


async def test_base_and_adapters_in_one_batch_each_equal_peft(server, reference):
    """Requests for the base model and for each adapter, decoded in the same engine steps: every output must be
    what PEFT computes for it alone; a base request must not pick up an adapter from a neighbouring slot."""
    assert "loraplex grouped LoRA ops in use" in server.log.read_text()
    jobs = [(adapter, prompt) for prompt in PROMPTS for adapter in (None, "alpha@1", "beta@1")] * 2
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
        for adapter in ("alpha@1", "beta@1"):  # both resident before the batch, so both slots are full
            r = await ac.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "adapter": adapter})
            assert r.status_code == 200, r.text

        async def one(adapter, prompt):
            r = await ac.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True,
                **({"adapter": adapter} if adapter else {})})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        results = await asyncio.gather(*(one(a, p) for a, p in jobs))
    for (adapter, prompt), choice in zip(jobs, results):
        src = server.adapter_dirs[adapter.split("@")[0]] if adapter else None
        assert same(choice, reference.complete(src, prompt, MAX_TOKENS)), (adapter, prompt)


def test_engine_holds_at_most_max_resident(client, server):
    """Past MAX_RESIDENT_ADAPTERS the engine drops the least recently used adapters once no request uses them."""
    limit = int(server.env["LORAPLEX_MAX_RESIDENT_ADAPTERS"])
    for adapter in ("alpha@1", "beta@1", "gamma@1", "alpha@1"):
        complete(client, PROMPTS[0], max_tokens=2, adapter=adapter)

    def held() -> list[str]:
        models = httpx.get(f"{server.engine_url()}/v1/models", headers=ENGINE_AUTH).json()["data"]
        return [m["id"] for m in models if m.get("parent")]

    assert wait_until(lambda: 1 <= len(held()) <= limit, 30), held()
    assert "alpha@1" in held()


def test_models_lists_base_and_adapters(client, server):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    cards = {m["id"]: m for m in data["data"]}
    assert server.env["LORAPLEX_BASE_MODEL"].rsplit("/", 1)[-1] in cards
    assert cards["alpha"]["versions"] == [1] and cards["alpha"]["aliases"]["latest"] == 1
    assert cards["alpha"]["owned_by"] == "acme"


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/completions", {"prompt": "x", "adapter": "ghost"}, 404, "adapter", "adapter_not_found"),
    ("/v1/completions", {"prompt": "x", "adapter": "alpha@9"}, 404, "adapter", "adapter_not_found"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "model", "adapter_not_found"),
    ("/v1/completions", {"prompt": "x", "model": "Not/A-Model"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "x", "adapter": "Bad Name"}, 400, "adapter", "invalid_adapter"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "temperature": 9}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role",
     "invalid_value"),
])
def test_error_bodies(client, path, body, status, param, code):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["param"], err["code"]) == (param, code)
    assert err["message"]


def test_malformed_json_is_400(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_engine_error_passes_through(client):
    r = client.post("/v1/completions", json={"prompt": "x" * 20000, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_rank_above_engine_limit_is_refused(server, workdir, base_model):
    from loadtest.adapters import AdapterFactory

    big = AdapterFactory(base_model, 128, ["q_proj"]).write(workdir / "src" / "big", 0)
    r = server.cli("adapters", "add", "big", str(big))
    assert r.returncode == 1 and "rank 128 exceeds the engine's limit of 64" in r.stderr
    assert not (workdir / "registry" / "big" / "1").exists()


def test_adapter_for_another_base_is_refused(client, server):
    from server.registry.directory import DirectoryRegistry

    reg = DirectoryRegistry(server.env["LORAPLEX_REGISTRY"])
    src = reg.resolve("alpha@1").path
    foreign = reg.root / "foreign" / "1"
    shutil.copytree(src, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest.update(base_fingerprint="0" * 64, base_model="other/model")
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    r = client.post("/v1/completions", json={"prompt": "x", "adapter": "foreign"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "adapter_incompatible" and "other/model" in r.json()["error"]["message"]


def test_the_engine_names_its_answer_after_the_gateways_id_never_the_callers(client, server):
    """The caller's x-request-id comes back; vLLM ran the request under the gateway's own answer id (its answer's
    id carries it, unique and unguessable), and the access line names both."""
    ids = []
    for _ in range(2):
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "adapter": "alpha"},
                        headers={"x-request-id": "e2e-trace-7"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "e2e-trace-7"
        assert re.fullmatch(r"cmpl-[0-9a-f]{31}", r.json()["id"]), r.json()["id"]
        ids.append(r.json()["id"])
    assert ids[0] != ids[1]
    assert wait_until(lambda: f"request_id=e2e-trace-7 answer_id={ids[1].removeprefix('cmpl-')}"
                      in server.log.read_text(), 5)


def test_an_idle_connection_outlives_the_clients_keep_alive(server):
    """A pooled connection idle as long as httpx and the openai client keep one (5 s) still takes a request: with
    uvicorn's 5 s keep-alive the server closed it just as a client sent on it (the residency test lost a request
    so, as httpx.ReadError)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        # whole responses, read by their length: a response may arrive in more than one segment
        conn.request("GET", "/health")
        assert conn.getresponse().read() and conn.sock is not None
        sock = conn.sock
        time.sleep(6)  # the idle time is what is tested
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        assert conn.sock is sock, "the request went on a new connection"
    finally:
        conn.close()
