import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from loadtest.adapters import AdapterFactory
from tests.helpers.archives import archive
from tests.helpers.calls import MAX_TOKENS, PROMPTS, complete, same, upload
from tests.helpers.e2e import ENGINE_AUTH
from tests.helpers.polling import wait_until


def listing(admin) -> list:
    return admin.get("/admin/adapters").json()["data"]


def test_admin_needs_the_token(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic e2e-admin-token"}):
        for method, path in [("GET", "/admin/adapters"), ("GET", "/admin/adapters/alpha"),
                             ("POST", "/admin/adapters"), ("PUT", "/admin/adapters/alpha/aliases/x"),
                             ("POST", "/admin/adapters/alpha/rollback"), ("DELETE", "/admin/adapters/alpha")]:
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json={"version": 1})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"


def test_uploaded_adapter_is_served_at_once(admin, client, server, reference):
    r = upload(admin, "up-alpha", archive(server.adapter_dirs["alpha"]), tenant="acme")
    assert r.status_code == 201, r.text
    m = r.json()
    assert (m["name"], m["version"], m["tenant"], m["rank"]) == ("up-alpha", 1, "acme", 8)
    assert m["target_modules"] == ["q_proj", "v_proj"] and m["alpha"] == 16.0
    assert m["base_model"] == server.env["LORAPLEX_BASE_MODEL"] and len(m["base_fingerprint"]) == 64
    assert m["source"] == "upload:up-alpha.tar.gz" and m["created"] > 0
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert m["files"][f]["sha256"] and m["files"][f]["size"] == (server.adapter_dirs["alpha"] / f).stat().st_size
    got = complete(client, PROMPTS[0], adapter="up-alpha")
    assert got["model"] == "up-alpha@1"
    assert same(got["choices"][0], reference.complete(server.adapter_dirs["alpha"], PROMPTS[0], MAX_TOKENS))


def test_cli_upload_show_list(server):
    r = server.cli("adapters", "upload", "up-cli", str(server.adapter_dirs["gamma"]), "--tenant", "initech",
                   "--alias", "stable")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 1
    shown = json.loads(server.cli("adapters", "show", "up-cli").stdout)
    assert shown["aliases"] == {"latest": 1, "stable": 1} and shown["tenant"] == "initech"
    listed = json.loads(server.cli("adapters", "list", "--tenant", "initech").stdout)
    assert [a["name"] for a in listed] == ["up-cli"]
    bad = server.cli("adapters", "show", "ghost")
    assert bad.returncode == 1 and "404" in bad.stderr and "not found" in bad.stderr


def _weights(src: Path, change) -> bytes:
    tensors = load_file(src / "adapter_model.safetensors")
    change(tensors)
    tmp = src.parent / f"tmp-{id(change)}.safetensors"
    save_file(tensors, tmp)
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def _first(tensors, kind="lora_A"):
    return next(k for k in tensors if kind in k)


@pytest.fixture(scope="module")
def bad_archives(server, workdir, base_model) -> dict:
    src = server.adapter_dirs["alpha"]
    high = AdapterFactory(base_model, 128, ["q_proj"]).write(workdir / "src" / "rank128", 0)
    nan = _weights(src, lambda t: t[_first(t)].fill_(float("nan")))
    inf = _weights(src, lambda t: t[_first(t, "lora_B")].fill_(float("-inf")))
    f64 = _weights(src, lambda t: t.update({k: v.double() for k, v in t.items()}))
    huge_header = (1 << 40).to_bytes(8, "little") + nan[8:]
    shape = _weights(src, lambda t: t.__setitem__(_first(t), torch.zeros(8, 3)))
    bad_target = _weights(src, lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.nope.lora_A.weight", torch.zeros(8, 256)))
    cfg = json.loads((src / "adapter_config.json").read_text())

    def with_weights(data: bytes) -> bytes:
        return archive(src, {"adapter_model.safetensors": data}, skip=("adapter_model.safetensors",))

    return {
        "path traversal": (archive(src, {"../evil.txt": b"x"}), "outside the archive"),
        "absolute path": (archive(src, {"/tmp/evil": b"x"}), "absolute"),
        "pickle weights": (archive(src, {"adapter_model.bin": b"x"}), "only safetensors"),
        "executable": (archive(src, {"setup.py": b"import os"}), "not part of a PEFT adapter"),
        "missing weights": (archive(src, skip=("adapter_model.safetensors",)), "adapter_model.safetensors is missing"),
        "rank above limit": (archive(high), "rank 128 exceeds the engine's limit of 64"),
        "wrong shapes": (with_weights(shape), "do not fit"),
        "unknown module": (with_weights(bad_target), "lacks lora_A or lora_B|does not exist"),
        "nan values": (with_weights(nan), "NaN"),
        "inf values": (with_weights(inf), "infinite"),
        "float64 weights": (with_weights(f64), "must be F32, F16 or BF16"),
        "huge header": (with_weights(huge_header), "not a valid safetensors file"),
        "truncated weights": (with_weights(nan[:100]), "safetensors"),
        "not lora": (archive(src, {"adapter_config.json": json.dumps({**cfg, "peft_type": "IA3"}).encode()},
                             skip=("adapter_config.json",)), "peft_type"),
        "not an archive": (b"hello, world", "must be a .tar.gz, .tgz or .zip"),
        "other base by name": (archive(src, {"adapter_config.json": json.dumps(
            {**cfg, "base_model_name_or_path": "meta-llama/Llama-3.1-8B"}).encode()}, skip=("adapter_config.json",)),
            "declares base model"),
        "other base by fingerprint": (archive(src, {"manifest.json": json.dumps(
            {"base_fingerprint": "0" * 64}).encode()}), "fingerprint"),
    }


CASES = ["path traversal", "absolute path", "pickle weights", "executable", "missing weights", "rank above limit",
         "wrong shapes", "unknown module", "nan values", "inf values", "float64 weights", "huge header",
         "truncated weights", "not lora", "not an archive", "other base by name", "other base by fingerprint"]


@pytest.mark.parametrize("case", CASES)
def test_bad_uploads_are_refused_and_change_nothing(admin, server, bad_archives, case):
    data, message = bad_archives[case]
    before = listing(admin)
    r = upload(admin, "up-bad", data)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_adapter" and err["param"] == "file"
    assert __import__("re").search(message, err["message"]), err["message"]
    assert listing(admin) == before
    assert not (Path(server.env["LORAPLEX_REGISTRY"]) / "up-bad" / "1").exists()


def test_bad_names_and_oversized_uploads(admin, server):
    data = archive(server.adapter_dirs["alpha"])
    r = upload(admin, "Bad/Name", data)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    r = upload(admin, "ok-name", data, tenant="../root")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tenant"
    r = upload(admin, "up-huge", b"\0" * (9 << 20))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "up-huge" not in {a["name"] for a in listing(admin)}


def test_name_of_another_tenant_is_a_conflict(admin, server):
    data = archive(server.adapter_dirs["alpha"])
    assert upload(admin, "up-owned", data, tenant="acme").status_code == 201
    r = upload(admin, "up-owned", data, tenant="globex")
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_conflict"


def test_concurrent_uploads_get_distinct_versions(admin, server):
    data = archive(server.adapter_dirs["beta"])
    results = []

    def one():
        with httpx.Client(base_url=server.url, timeout=300, headers=dict(admin.headers)) as c:
            results.append(upload(c, "up-race", data))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [201] * 5
    assert sorted(r.json()["version"] for r in results) == [1, 2, 3, 4, 5]
    assert admin.get("/admin/adapters/up-race").json()["aliases"]["latest"] == 5


def test_alias_and_rollback(admin, client, server):
    for name in ("alpha", "beta"):
        assert upload(admin, "up-roll", archive(server.adapter_dirs[name]), tenant="acme").status_code == 201
    assert admin.put("/admin/adapters/up-roll/aliases/stable", json={"version": 1}).status_code == 200
    assert admin.put("/admin/adapters/up-roll/aliases/stable", json={"version": 2}).status_code == 200
    assert complete(client, PROMPTS[0], adapter="up-roll@stable")["model"] == "up-roll@2"
    r = admin.post("/admin/adapters/up-roll/rollback")
    assert r.status_code == 200 and r.json() == {"name": "up-roll", "alias": "stable", "version": 1}
    assert complete(client, PROMPTS[0], adapter="up-roll@stable")["model"] == "up-roll@1"
    assert admin.post("/admin/adapters/up-roll/rollback").status_code == 404  # nothing earlier
    assert admin.put("/admin/adapters/up-roll/aliases/stable", json={"version": 9}).status_code == 404
    assert admin.put("/admin/adapters/up-roll/aliases/latest", json={"version": 1}).status_code == 400
    assert admin.put("/admin/adapters/up-roll/aliases/stable", json={"version": 0}).status_code == 400
    cli = server.cli("adapters", "alias", "up-roll", "stable", "2")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(server.cli("adapters", "rollback", "up-roll").stdout)["version"] == 1


def _engine_loras(server) -> set[str]:
    models = httpx.get(f"{server.engine_url()}/v1/models", headers=ENGINE_AUTH).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def test_delete_lets_running_requests_finish(admin, client, server):
    assert upload(admin, "up-del", archive(server.adapter_dirs["beta"])).status_code == 201
    body = {"prompt": PROMPTS[0], "max_tokens": 300, "temperature": 0, "adapter": "up-del@1", "stream": True,
            "ignore_eos": True}
    chunks, deleted_during = [], None
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line)
            if len(chunks) == 3 and deleted_during is None:
                d = admin.delete("/admin/adapters/up-del/versions/1")
                assert d.status_code == 200, d.text
                deleted_during = len(chunks)
                assert client.post("/v1/completions", json={"prompt": "x", "adapter": "up-del@1"}).status_code == 404
    assert deleted_during == 3 and chunks[-1] == "data: [DONE]"
    assert len(chunks) == 300 + 1, "the request running on the deleted version was cut short"
    deadline = time.monotonic() + 20
    while "up-del@1" in _engine_loras(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "up-del@1" not in _engine_loras(server)
    # The files go right after the unload, in a thread of their own: poll rather than race it.
    trash = Path(server.env["LORAPLEX_REGISTRY"]) / "up-del"
    assert wait_until(lambda: not any(trash.glob(".trash-*")), 20)
    # deleting the whole adapter
    assert upload(admin, "up-del", archive(server.adapter_dirs["alpha"])).json()["version"] == 2
    assert admin.delete("/admin/adapters/up-del").status_code == 200
    assert admin.get("/admin/adapters/up-del").status_code == 404
    assert client.post("/v1/completions", json={"prompt": "x", "adapter": "up-del"}).status_code == 404
    assert admin.delete("/admin/adapters/up-del").status_code == 404


@pytest.fixture
def tenant_keys(server):
    keys = {}
    for tenant in ("acme", "globex"):
        out = server.cli("keys", "create", "--tenant", tenant)
        assert out.returncode == 0, out.stderr
        keys[tenant] = out.stdout.split()[-1]
    yield keys
    for key in json.loads(server.cli("keys", "list").stdout):
        server.cli("keys", "revoke", key["id"])
    # Revoking every key leaves /v1 closed (keys fail closed); the session's server goes back to never having had
    # one, as the other tests expect.
    (Path(server.env["LORAPLEX_STATE_DIR"]) / "keys.json").unlink()


def test_tenants_cannot_see_each_other(admin, server, tenant_keys):
    src = server.adapter_dirs["alpha"]
    assert upload(admin, "acme-only", archive(src), tenant="acme").status_code == 201
    assert upload(admin, "globex-only", archive(src), tenant="globex").status_code == 201
    assert upload(admin, "globex-public", archive(src), tenant="globex", public="true").status_code == 201

    def call(key, adapter):
        return httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"prompt": "x", "max_tokens": 2, "adapter": adapter})

    def models(key):
        r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        return {m["id"] for m in r.json()["data"]}

    acme, globex = tenant_keys["acme"], tenant_keys["globex"]
    assert call(acme, "acme-only").status_code == 200
    assert call(acme, "globex-public").status_code == 200
    assert call(globex, "acme-only@1").status_code == 404
    for ref in ("globex-only", "globex-only@1", "globex-only@latest"):
        hidden, missing = call(acme, ref), call(acme, ref.replace("globex-only", "never-existed"))
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json() == json.loads(missing.text.replace("never-existed", "globex-only"))
    assert "globex-only" not in models(acme) and {"acme-only", "globex-public"} <= models(acme)
    assert "acme-only" not in models(globex) and "alpha" not in models(globex)
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert call("lpx-not-a-key", "acme-only").status_code == 401
    assert call(server.env["LORAPLEX_ADMIN_TOKEN"], "globex-only").status_code == 200
    key_id = next(k["id"] for k in json.loads(server.cli("keys", "list").stdout) if k["tenant"] == "acme")
    assert server.cli("keys", "revoke", key_id).returncode == 0
    assert call(acme, "acme-only").status_code == 401
    raw = (Path(server.env["LORAPLEX_STATE_DIR"]) / "keys.json").read_text()
    assert globex not in raw and acme not in raw
    assert globex not in server.log.read_text()


def test_audit_log_records_admin_actions(admin, server):
    assert upload(admin, "up-audit", archive(server.adapter_dirs["alpha"])).status_code == 201
    admin.put("/admin/adapters/up-audit/aliases/stable", json={"version": 1})
    upload(admin, "up-audit", b"junk")
    admin.delete("/admin/adapters/up-audit")
    lines = [json.loads(line) for line in (Path(server.env["LORAPLEX_STATE_DIR"]) / "audit.log").read_text().splitlines()]
    mine = [(e["action"], e["version"], e["result"].split(":")[0]) for e in lines if e["adapter"] == "up-audit"]
    assert mine == [("upload", 1, "ok"), ("alias", 1, "ok"), ("upload", None, "refused"), ("delete", None, "ok")]
    upload_entry = next(e for e in lines if e["adapter"] == "up-audit")
    assert upload_entry["actor"] == "admin-token" and len(upload_entry["sha256"]) == 64  # named, not an address
