"""Hostile input on the real server: schema fuzzing, bounds, CORS, and /admin on a port of its own."""

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.engine.process import free_port
from tests.helpers.e2e import ADMIN_TOKEN, LOADER, start_gateway

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


@pytest.fixture(scope="module")
def split_gateway(server, tmp_path_factory):
    """A gateway on the session's engine with /admin on its own port and a registry of its own."""
    tmp = tmp_path_factory.mktemp("split")
    admin_port = free_port()
    proc, url = start_gateway(server, tmp, LORAPLEX_ADMIN_PORT=str(admin_port),
                              LORAPLEX_REGISTRY=str(tmp / "registry"))
    yield url, f"http://127.0.0.1:{admin_port}", tmp
    proc.kill()
    proc.wait()


def test_admin_answers_only_on_its_own_port(split_gateway, server):
    url, admin_url, tmp = split_gateway
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(f"{url}/admin/adapters", headers=auth).status_code == 404
    assert httpx.get(f"{admin_url}/admin/adapters", headers=auth).status_code == 200
    assert httpx.get(f"{admin_url}/admin/adapters").status_code == 401
    assert httpx.get(f"{admin_url}/v1/models").status_code == 404
    assert httpx.get(f"{url}/v1/models").status_code == 200
    port = admin_url.rsplit(":", 1)[1]
    env = {**server.env, "LORAPLEX_ADMIN_PORT": port, "LORAPLEX_STATE_DIR": str(tmp / "state")}
    listed = subprocess.run([*LOADER, "adapters", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.strip() == "[]", listed.stderr


@pytest.mark.parametrize("target", ["api", "admin"])
def test_schema_fuzzing_finds_no_server_errors(split_gateway, target):
    """Schemathesis generates valid and invalid bodies from the OpenAPI schema: no 5xx, every response as
    documented (status, content type, body schema)."""
    url, admin_url, _ = split_gateway
    base = url if target == "api" else admin_url
    r = subprocess.run(
        [SCHEMATHESIS, "run", f"{base}/openapi.json", "-H", f"Authorization: Bearer {ADMIN_TOKEN}",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                     "response_schema_conformance",
         # One worker: hypothesis compiling lambdas in several threads trips a CPython 3.11 compiler bug.
         "--phases", "examples,coverage,fuzzing", "--max-examples", "40", "--workers", "1",
         # A generated body may ask for the whole context with no stop; that can outlast schemathesis's default
         # 10 s on a slow day, which it reports as a network error although the server answers in the end.
         "--request-timeout", "120"],
        capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "generated" in r.stdout


def test_max_tokens_beyond_the_context_is_refused(client):
    r = client.post("/v1/completions", json={"prompt": "Ada", "max_tokens": 1025})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and "1024" in err["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_completion_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_engine_refusals_keep_openai_error_shape(client):
    """A prompt longer than the context passes our checks and is refused by vLLM; the body is still ours."""
    r = client.post("/v1/completions", json={"prompt": "Ada " * 2000, "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and isinstance(err["code"], str)


def test_cors_is_off(server):
    r = httpx.options(f"{server.url}/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{server.url}/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
