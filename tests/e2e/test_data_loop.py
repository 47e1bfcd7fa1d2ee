"""The data loop on real servers: stored completions read with the official `openai` client on the directory store
(in front of the session's vLLM engine) and on SeaweedFS with two gateway replicas; then feedback → export → DPO
and SFT training on the demo model → evaluation against stable → canary, the rollout promoting the candidate
callers rate better and rolling back the one they rate worse."""

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import openai
import pytest
from openai import OpenAI

from loadtest.adapters import AdapterFactory
from server.core.examples import parse_row
from tests.helpers.e2e import ADMIN_AUTH, LOADER, start_gateway
from tests.helpers.polling import wait_until
from tests.helpers.training import DEMO_DATA, write_job

EMAIL = "maria.garcia@example.org"
ANSWER_ID = re.compile(r"chatcmpl-[0-9a-f]{31}")


def cli(env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*LOADER, *args], env=env, capture_output=True, text=True, timeout=timeout)


def new_key(env: dict, tenant: str, role: str = "inference") -> str:
    r = cli(env, "keys", "create", "--tenant", tenant, "--role", role)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[-1]


def ask(api: OpenAI, text: str, **extra) -> tuple[str, str]:
    """A greedy chat answer: its id and text, from a stream when `stream` is set."""
    messages = [{"role": "user", "content": text}]
    if extra.pop("stream", False):
        chunks = list(api.chat.completions.create(model=extra.pop("model", "demo-base"), messages=messages,
                                                  max_tokens=8, temperature=0, stream=True, **extra))
        return chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = api.chat.completions.create(model=extra.pop("model", "demo-base"), messages=messages, max_tokens=8,
                                         temperature=0, **extra)
    return answer.id, answer.choices[0].message.content


def policy_seen(url: str, tenant: str, capture: str) -> None:
    """Waits until the gateway at `url` applies a policy set with the CLI (gateways read policies every
    LORAPLEX_REGISTRY_POLL seconds; this reading makes it read now)."""
    assert wait_until(lambda: httpx.get(f"{url}/admin/tenants/{tenant}/data-policy",
                                        headers=ADMIN_AUTH).json().get("capture") == capture, 10)


def listed(api: OpenAI, **filters) -> list:
    return list(api.chat.completions.list(**filters))


def until_listed(api: OpenAI, count: int, **filters) -> list:
    """The list once it holds `count` records (records are written within moments of their answers)."""
    found: list = []

    def enough() -> bool:
        found[:] = listed(api, **filters)
        return len(found) >= count

    assert wait_until(enough, 10), found
    return found


@pytest.fixture
def gateway(server, tmp_path) -> Iterator[tuple[str, dict]]:
    """A gateway of the test's own (its state: keys, policies, stored completions) in front of the session's
    engine and registry; its URL and the environment its CLI uses."""
    env = {**server.env, "LORAPLEX_STATE_DIR": str(tmp_path / "state"), "LORAPLEX_RETENTION_INTERVAL": "0.5",
           "LORAPLEX_REGISTRY_POLL": "0.2"}
    proc, url = start_gateway(server, tmp_path, **{k: v for k, v in env.items() if k.startswith("LORAPLEX_R")})
    try:
        yield url, env
    finally:
        proc.terminate()
        proc.wait(30)


def test_stored_completions_on_the_directory_store_with_the_official_client(gateway, tmp_path):
    url, env = gateway
    keys = {"k1": new_key(env, "acme"), "k2": new_key(env, "acme"), "admin": new_key(env, "acme", "tenant-admin"),
            "globex": new_key(env, "globex")}
    assert cli(env, "tenants", "policy", "acme", "--capture", "opt-in", "--redact", "email").returncode == 0
    policy_seen(url, "acme", "opt-in")
    api = {name: OpenAI(base_url=f"{url}/v1", api_key=key) for name, key in keys.items()}
    stored, _ = ask(api["k1"], f"Reset password for {EMAIL}", store=True, metadata={"topic": "billing"})
    streamed, text = ask(api["k1"], "Where is my order?", store=True, stream=True)
    ask(api["k1"], "Not stored: no store field")
    legacy = api["k1"].completions.create(model="demo-base", prompt="Ada and", max_tokens=4, extra_body={"store": True})
    assert ANSWER_ID.fullmatch(stored) and ANSWER_ID.fullmatch(streamed), "the gateway's ids, named by vLLM"
    records = until_listed(api["admin"], 2)
    assert [r.id for r in records] == [stored, streamed]
    assert api["k1"].chat.completions.retrieve(streamed).choices[0].message.content == text, "the stream assembled"
    assert listed(api["k2"]) == [] and listed(api["globex"]) == []
    with pytest.raises(openai.NotFoundError) as foreign:
        api["globex"].chat.completions.retrieve(stored)
    with pytest.raises(openai.NotFoundError) as missing:
        api["globex"].chat.completions.retrieve("chatcmpl-" + "0" * 31)
    assert foreign.value.response.json()["error"]["message"].replace(stored, "X") == \
        missing.value.response.json()["error"]["message"].replace("chatcmpl-" + "0" * 31, "X")
    with pytest.raises(openai.NotFoundError):
        api["admin"].chat.completions.retrieve(legacy.id)  # kept, but exported, not listed through the chat API
    api["k1"].chat.completions.update(stored, metadata={"topic": "refund"})
    assert [r.id for r in listed(api["admin"], metadata={"topic": "refund"}, model="demo-base")] == [stored]
    messages = list(api["admin"].chat.completions.messages.list(stored))
    assert [(m.id, m.content) for m in messages] == [(f"{stored}-0", "Reset password for [email]")]
    assert api["k1"].chat.completions.delete(streamed).deleted
    assert [r.id for r in listed(api["admin"])] == [stored]
    leaked = [p for p in (tmp_path / "state").rglob("*") if p.is_file() and EMAIL.encode() in p.read_bytes()]
    assert leaked == [], "a redacted address never reaches storage"


def test_two_replicas_share_stored_completions_on_the_object_store(server, tmp_path, object_store, s3_url):
    env = {**server.env, **object_store.env, "LORAPLEX_REGISTRY": s3_url, "LORAPLEX_STATE_DIR": str(tmp_path / "a")}
    key, admin = new_key(env, "acme"), new_key(env, "acme", "tenant-admin")
    assert cli(env, "tenants", "policy", "acme", "--capture", "on", "--redact", "email,phone").returncode == 0
    for side in ("a", "b"):
        (tmp_path / side).mkdir(exist_ok=True)
    replicas = [start_gateway(server, tmp_path / side, LORAPLEX_REGISTRY=s3_url, **object_store.env)
                for side in ("a", "b")]
    try:
        for _, url in replicas:
            policy_seen(url, "acme", "on")
        a, b = (OpenAI(base_url=f"{url}/v1", api_key=key) for _, url in replicas)
        b_admin = OpenAI(base_url=f"{replicas[1][1]}/v1", api_key=admin)
        kept, _ = ask(a, f"Call me on +1 415 555 0133 or {EMAIL}", metadata={"team": "west"}, user="maria")
        ask(a, "Do not keep this", store=False)
        other, _ = ask(a, "Another question", user="li")
        assert [r.id for r in until_listed(b_admin, 2)] == [kept, other]
        assert b.chat.completions.retrieve(kept).metadata == {"team": "west"}
        b.chat.completions.update(kept, metadata={"team": "east"})
        assert [r.id for r in listed(a, metadata={"team": "east"})] == [kept]
        erased = httpx.delete(f"{replicas[1][1]}/admin/data", params={"tenant": "acme", "user": "maria"},
                              headers={"Authorization": f"Bearer {admin}"})
        assert erased.status_code == 200 and erased.json()["records"] == 1
        assert [r.id for r in listed(a)] == [other]
    finally:
        for proc, _ in replicas:
            proc.terminate()
            proc.wait(30)
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3")
    bodies = [s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
              for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
              for o in page.get("Contents", [])]
    assert bodies and not [b for b in bodies if EMAIL.encode() in b or b"555 0133" in b]


def rate(url: str, key: str, answer: str, rating: str, correction: str | None = None) -> None:
    """Feedback on an answer, once its ledger entry is in (moments after the answer)."""
    body = {"id": answer, "rating": rating, **({"correction": correction} if correction else {})}
    assert wait_until(lambda: httpx.post(f"{url}/v1/feedback", json=body,
                                         headers={"Authorization": f"Bearer {key}"}).status_code == 200, 10)


def rollout_of(url: str) -> dict:
    return httpx.get(f"{url}/admin/adapters/loop", headers=ADMIN_AUTH).json()["rollouts"][0]


def rate_until_decided(url: str, key: str, worse: str) -> dict:
    """Callers ask loop@stable (each a new `user`, so both sides of the canary answer) and rate the answers of
    version `worse` down and the others up, until the rollout decides."""
    api, n = OpenAI(base_url=f"{url}/v1", api_key=key), 0
    while rollout_of(url)["status"] == "running":
        n += 1
        assert n < 400, rollout_of(url)
        answer = api.chat.completions.create(model="loop@stable", messages=[{"role": "user", "content": f"Hi {n}"}],
                                             max_tokens=4, temperature=0, user=f"caller-{n}")
        rate(url, key, answer.id, "down" if answer.model == worse else "up")
    return rollout_of(url)


def refresh(env: dict, job: Path, method: str, work: Path) -> subprocess.CompletedProcess:
    return cli(env, "refresh", "loop", "--since", "1h", "--job", str(job), "--method", method, "--steps", "50,100",
               "--interval", "1", "--min-requests", "4", "--min-feedback", "4", "--max-down-increase", "0.2",
               "--latency-tolerance", "1000",
               "--work", str(work))


def test_feedback_trains_candidates_the_feedback_gate_promotes_or_rolls_back(gateway, base_model, tmp_path):
    url, env = gateway
    stable = AdapterFactory(base_model, 8, scale=0.1).write(tmp_path / "loop-1", 7)
    assert cli(env, "adapters", "add", "loop", str(stable), "--tenant", "nimbus").returncode == 0
    assert httpx.put(f"{url}/admin/adapters/loop/aliases/stable", json={"version": 1},
                     headers=ADMIN_AUTH).status_code == 200
    key = new_key(env, "nimbus")
    assert cli(env, "tenants", "policy", "nimbus", "--capture", "on").returncode == 0
    policy_seen(url, "nimbus", "on")
    api = OpenAI(base_url=f"{url}/v1", api_key=key)
    lines = (DEMO_DATA / "support.jsonl").read_text().splitlines()[:12]
    for i, example in enumerate(parse_row(json.loads(line), f"support.jsonl:{i + 1}") for i, line in enumerate(lines)):
        answer = api.chat.completions.create(model="loop@stable", messages=example.messages(), max_tokens=8,
                                             temperature=0, user=f"asker-{i}")
        rate(url, key, answer.id, "down", correction=example.completion)
    job = write_job(tmp_path, base_model, "loop", max_steps=10, learning_rate=1e-3, max_forgetting=10.0,
                    eval_generations=0)

    sft = refresh(env, job, "sft", tmp_path / "refresh")
    assert sft.returncode == 0 and "loop@2 trained on" in sft.stdout, sft.stdout[-2000:] + sft.stderr[-2000:]
    promoted = rate_until_decided(url, key, worse="loop@1")
    assert promoted["status"] == "promoted", promoted["decisions"]

    dpo = refresh(env, job, "dpo", tmp_path / "refresh")  # from loop@2, now stable
    assert dpo.returncode == 0 and "loop@3 trained on" in dpo.stdout, dpo.stdout[-2000:] + dpo.stderr[-2000:]
    rolled_back = rate_until_decided(url, key, worse="loop@3")
    assert rolled_back["status"] == "rolled_back" and "down ratings" in rolled_back["decisions"][-1]["why"]

    shown = httpx.get(f"{url}/admin/adapters/loop", headers=ADMIN_AUTH).json()
    assert [v.get("trained_on_erased") for v in shown["versions"]] == [None, 0, 0]
    erased = httpx.delete(f"{url}/admin/data", params={"tenant": "nimbus", "user": "asker-0"}, headers=ADMIN_AUTH)
    assert erased.json()["records"] == 1
    shown = httpx.get(f"{url}/admin/adapters/loop", headers=ADMIN_AUTH).json()
    assert [v.get("trained_on_erased") for v in shown["versions"]] == [None, 1, 1], "the lineage flag"
    assert shown["versions"][2]["training"]["method"] == "dpo"
    assert shown["versions"][2]["training"]["start_from"] == "loop@2"
