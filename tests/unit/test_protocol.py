"""Every request field is bounded: an out-of-range value is a 400 naming the field, before any engine work."""

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from server.app import create_admin_app, create_app
from server.auth import KeyStore
from server.config import Settings
from server.protocol import MAX_MESSAGES, MAX_PROMPTS, MAX_STOP_CHARS, MAX_STOPS, MAX_TEXT_CHARS

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client(tmp_path):
    # No `with`: the lifespan (and so the engine) never starts; validation answers before any handler runs,
    # and only the key check, which runs first, needs part of the gateway.
    app = create_app(Settings(state_dir=tmp_path, registry=tmp_path / "r"))
    app.state.gateway = SimpleNamespace(keys=KeyStore(tmp_path))
    return TestClient(app)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (MAX_TEXT_CHARS + 1)}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a"] * (MAX_STOPS + 1)}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": "s" * (MAX_STOP_CHARS + 1)}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "n": 17}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": -0.1}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.01}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2**64}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "adapter": "a" * 257}, "adapter"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ("/v1/completions", {"prompt": ["x"] * (MAX_PROMPTS + 1)}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "model": "m" * 257}, "model"),
    ("/v1/completions", {}, "prompt"),
])
def test_out_of_range_fields_are_400_naming_the_field(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param), error
    assert error["type"] == "invalid_request_error"


def test_cors_is_off_by_default(client):
    r = client.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_allows_only_configured_origins(tmp_path):
    app = create_app(Settings(state_dir=tmp_path, cors_origins="https://ok.example"))
    c = TestClient(app)
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = c.options("/v1/chat/completions", headers={"Origin": "https://ok.example", **preflight})
    assert ok.headers["access-control-allow-origin"] == "https://ok.example"
    bad = c.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in bad.headers


def test_admin_port_moves_admin_off_the_main_app(tmp_path):
    settings = Settings(state_dir=tmp_path, admin_port=9001)
    main = create_app(settings)
    paths = {r.path for r in main.routes}
    assert not any(p.startswith("/admin") for p in paths)
    admin_paths = {r.path for r in create_admin_app(settings, main).routes}
    assert "/admin/adapters" in admin_paths and not any(p.startswith("/v1") for p in admin_paths)
    assert settings.server_url == "http://127.0.0.1:9001"


def test_admin_port_must_differ_from_port():
    with pytest.raises(ValueError, match="admin_port"):
        Settings(port=8000, admin_port=8000)
